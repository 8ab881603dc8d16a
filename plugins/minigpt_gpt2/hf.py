"""Hugging Face GPT-2 checkpoints in and out of minigpt models: the ``weights`` component ``gpt2.hf``.

The translation goes through the *canonical model state*: the model's own state dict in the book's
layout (the GPT-2 capability's contract: blocks with ``att``, ``ff``, ``norm1``, ``norm2``, a
feed-forward ``layers.0`` / ``layers.2``), where each attention contributes its canonical
W_query / W_key / W_value / out_proj tensors. A component whose weights are laid out otherwise
provides its own mapping with ``canonical_state()`` / ``load_canonical_state()``: attentions (a
fused QKV matrix, torch's MultiheadAttention) and blocks alike. A block's canonical names are
``att.<the attention's canonical names>``, ``norm1.scale`` / ``norm1.shift``, ``norm2.scale`` /
``norm2.shift``, ``ff.layers.0.weight`` / ``.bias`` (C -> hidden) and ``ff.layers.2.*``
(hidden -> C); a torch.nn.LayerNorm's ``weight`` / ``bias`` count as ``scale`` / ``shift``.

Hugging Face GPT-2 stores its projections as ``Conv1D`` (``y = x @ W + b``, W of shape (in, out));
nn.Linear stores (out, in), hence the transposes. ``c_attn`` is q, k and v concatenated along the
output dimension.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from minigpt_core.plugin import (
    CanonicalStateProtocol,
    CanonicalStateSource,
    CheckpointError,
    PretrainedError,
    attention_canonical_state,
    load_attention_canonical_state,
    model_weights,
)

__all__ = ["GPT2Weights", "gpt2_model_section"]

# Activations Hugging Face names that are all GPT-2's tanh approximation of GELU.
_TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
# Slots whose components must be GPT-2 compatible for the weights to mean the same thing.
_GPT2_SLOTS = ("attention", "norm", "activation", "feedforward", "positional", "block")
_QKV = ("W_query", "W_key", "W_value")
_GLOBAL_NAMES = [("wte.weight", "tok_emb.weight"), ("wpe.weight", "pos_emb.weight"),
                 ("ln_f.weight", "final_norm.scale"), ("ln_f.bias", "final_norm.shift")]


def _layer_names(i: int) -> list[tuple[str, str, bool]]:
    """(HF name without 'transformer.', canonical name, is a Conv1D weight to transpose)."""
    h, b = f"h.{i}.", f"trf_blocks.{i}."
    return [
        (h + "ln_1.weight", b + "norm1.scale", False), (h + "ln_1.bias", b + "norm1.shift", False),
        (h + "attn.c_proj.weight", b + "att.out_proj.weight", True),
        (h + "attn.c_proj.bias", b + "att.out_proj.bias", False),
        (h + "ln_2.weight", b + "norm2.scale", False), (h + "ln_2.bias", b + "norm2.shift", False),
        (h + "mlp.c_fc.weight", b + "ff.layers.0.weight", True), (h + "mlp.c_fc.bias", b + "ff.layers.0.bias", False),
        (h + "mlp.c_proj.weight", b + "ff.layers.2.weight", True),
        (h + "mlp.c_proj.bias", b + "ff.layers.2.bias", False),
    ]


# -- canonical model state -----------------------------------------------------------------
def _layer_norm_names(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """torch.nn.LayerNorm names its gain and bias weight / bias where the book's LayerNorm says
    scale / shift; it computes the same function (a missing bias is a zero one)."""
    for name, sub in module.named_modules():
        key = f"{prefix}{name}." if name else prefix
        if isinstance(sub, nn.LayerNorm) and f"{key}weight" in state:
            weight, bias = state.pop(f"{key}weight"), state.pop(f"{key}bias", None)
            state[f"{key}scale"] = weight
            state[f"{key}shift"] = torch.zeros_like(weight) if bias is None else bias
    return state


def _block_canonical_state(block: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(block, CanonicalStateSource):  # a block with its own layout maps itself
        return block.canonical_state()
    att = getattr(block, "att", None)
    if att is None:
        raise PretrainedError(
            f"The block {type(block).__name__} has no `att` attribute and no canonical_state() method, so its "
            f"weights cannot be mapped onto GPT-2's; use a GPT-2 compatible block such as book.pre_norm.")
    state = {k: v.detach().cpu() for k, v in block.state_dict().items()
             if not k.startswith("att.") and not k.endswith(".mask")}
    state.update({f"att.{k}": v.detach().cpu() for k, v in attention_canonical_state(att).items()})
    return _layer_norm_names(block, state)


def _load_block_canonical_state(block: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    if isinstance(block, CanonicalStateProtocol):
        block.load_canonical_state(state)
        return
    rest = {k: v for k, v in state.items() if not k.startswith("att.")}
    own = _layer_norm_names(block, {k: v for k, v in block.state_dict().items()
                                    if not k.startswith("att.") and not k.endswith(".mask")})
    _check_keys(own, rest, where)
    for name, sub in block.named_modules():  # back to torch.nn.LayerNorm's names where the block uses it
        if isinstance(sub, nn.LayerNorm) and f"{name}.scale" in rest:
            rest[f"{name}.weight"] = rest.pop(f"{name}.scale")
            shift = rest.pop(f"{name}.shift")
            if sub.bias is not None:
                rest[f"{name}.bias"] = shift
    block.load_state_dict(rest, strict=False)
    try:
        load_attention_canonical_state(block.att, {k[4:]: v for k, v in state.items() if k.startswith("att.")})
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"The attention of {where} cannot take these weights: {exc}") from None


def _check_keys(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], where: str) -> None:
    missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in given.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"The weights do not fit {where}: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong "
            f"shapes {wrong[:5]}. The components outside attention must use GPT-2's layout (those that "
            f"declare the gpt2 capability, e.g. book.layernorm, book.feedforward, book.learned, book.pre_norm).")


def canonical_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every block (and its attention) in the canonical layout."""
    state = {k: v for k, v in model_weights(model).items() if not k.startswith("trf_blocks.")}
    state = _layer_norm_names(model.final_norm, state, "final_norm.")
    for i, block in enumerate(model.trf_blocks):
        state.update({f"trf_blocks.{i}.{k}": v for k, v in _block_canonical_state(block).items()})
    return state


@torch.no_grad()
def load_canonical_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a canonical model state; each block (and attention) converts its canonical tensors itself."""
    outer = {k: v for k, v in state.items() if not k.startswith("trf_blocks.")}
    own = _layer_norm_names(model.final_norm, {k: v for k, v in model_weights(model).items()
                                               if not k.startswith("trf_blocks.")}, "final_norm.")
    _check_keys(own, outer, f"the model ({source})")
    if isinstance(model.final_norm, nn.LayerNorm):
        outer["final_norm.weight"] = outer.pop("final_norm.scale")
        shift = outer.pop("final_norm.shift")
        if model.final_norm.bias is not None:
            outer["final_norm.bias"] = shift
    model.load_state_dict(outer, strict=False)
    for i, block in enumerate(model.trf_blocks):
        prefix = f"trf_blocks.{i}."
        _load_block_canonical_state(block, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                    f"block {i} ({source})")


# -- Hugging Face names ----------------------------------------------------------------------
def _canonical_from_hf(hf: Mapping[str, torch.Tensor], n_layers: int, tied: bool, source: str) -> dict[str, torch.Tensor]:
    # Checkpoints of GPT2LMHeadModel prefix the trunk with "transformer."; GPT2Model's do not.
    sd = {k.removeprefix("transformer."): v for k, v in hf.items()}

    def take(name: str) -> torch.Tensor:
        try:
            return sd.pop(name)
        except KeyError:
            raise CheckpointError(f"{source} has no tensor '{name}'; it is not a complete GPT-2 checkpoint.") from None

    out = {ours: take(theirs) for theirs, ours in _GLOBAL_NAMES}
    for i in range(n_layers):
        for theirs, ours, conv1d in _layer_names(i):
            w = take(theirs)
            out[ours] = w.t().contiguous() if conv1d else w
        w, b = take(f"h.{i}.attn.c_attn.weight"), take(f"h.{i}.attn.c_attn.bias")  # (C, 3C), (3C,)
        for name, w_part, b_part in zip(_QKV, w.chunk(3, dim=1), b.chunk(3)):
            out[f"trf_blocks.{i}.att.{name}.weight"] = w_part.t().contiguous()
            out[f"trf_blocks.{i}.att.{name}.bias"] = b_part.contiguous()
        for buffer in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of older checkpoints
            sd.pop(f"h.{i}.{buffer}", None)
    head = sd.pop("lm_head.weight", None)
    if not tied:
        if head is None:
            raise CheckpointError(f"{source} says its output head is not tied but has no lm_head.weight.")
        out["out_head.weight"] = head
    if sd:
        raise CheckpointError(
            f"{source} holds tensors a GPT-2 language model does not have: {sorted(sd)[:5]}; it is "
            f"probably another architecture or a GPT-2 with a different head.")
    return out


def _hf_from_canonical(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {f"transformer.{theirs}": state.pop(ours) for theirs, ours in _GLOBAL_NAMES}
    for i in range(n_layers):
        for theirs, ours, conv1d in _layer_names(i):
            w = state.pop(ours)
            out[f"transformer.{theirs}"] = w.t().contiguous() if conv1d else w.contiguous()
        ws = [state.pop(f"trf_blocks.{i}.att.{n}.weight") for n in _QKV]
        bs = [state.pop(f"trf_blocks.{i}.att.{n}.bias", None) for n in _QKV]
        bs = [torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b for w, b in zip(ws, bs)]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([w.t() for w in ws], dim=1).contiguous()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(bs).contiguous()
    if "out_head.weight" in state:  # untied head
        out["lm_head.weight"] = state.pop("out_head.weight").contiguous()
    if state:
        raise PretrainedError(
            f"The model has weights GPT-2 has no place for: {sorted(state)[:5]}; it cannot be exported "
            f"to Hugging Face GPT-2.")
    return out


def gpt2_model_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[model]`` table of a minigpt spec for a Hugging Face GPT-2 ``config.json``."""
    def refuse(why: str) -> PretrainedError:
        return PretrainedError(f"This Hugging Face checkpoint is not a plain GPT-2: {why}.")

    if config.get("model_type") != "gpt2":
        raise refuse(f"model_type is {config.get('model_type')!r}, not 'gpt2'")
    act = config.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise refuse(f"activation_function {act!r} is not GPT-2's tanh GELU ({', '.join(sorted(_TANH_GELU))})")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse("its attention scores are not scaled by 1/sqrt(head_dim) (scale_attn_* options)")
    if config.get("add_cross_attention", False):
        raise refuse("it has cross-attention layers")
    emb = config["n_embd"]
    n_inner = config.get("n_inner") or 4 * emb
    if n_inner % emb:
        raise refuse(f"n_inner ({n_inner}) is not a multiple of n_embd ({emb})")
    feedforward: dict[str, Any] = {"name": "book.feedforward"}
    if n_inner != 4 * emb:
        feedforward["params"] = {"expansion": n_inner // emb}
    return {
        "vocab_size": config["vocab_size"], "context_length": config["n_positions"], "emb_dim": emb,
        "n_heads": config["n_head"], "n_layers": config["n_layer"],
        "drop_rate": config.get("resid_pdrop", 0.1), "qkv_bias": True,
        "tie_weights": bool(config.get("tie_word_embeddings", True)),
        # GPT-2's function on fused kernels (`minigpt import-hf --book`: the book's classes instead).
        "attention": {"name": "torch.sdpa"},
        "norm": {"name": "torch.layernorm", "params": {"eps": config.get("layer_norm_epsilon", 1e-5)}},
        "activation": {"name": "torch.gelu_tanh"}, "feedforward": feedforward, "positional": {"name": "book.learned"},
        "block": {"name": "book.pre_norm"}, "init": {"name": "gpt2.normal"},
    }


class GPT2Weights:
    """transformers' GPT2LMHeadModel / GPT2Model checkpoints (see minigpt_core.plugin.WeightsProtocol)."""

    model_type = "gpt2"
    architectures = ("GPT2LMHeadModel",)

    def model_section(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return gpt2_model_section(config)

    def check(self, components: Mapping[str, Any], *, export: bool) -> None:
        slots = _GPT2_SLOTS if export else ("attention",)
        for slot in slots:
            entry = components[slot].entry
            if not entry.has("gpt2"):
                what = ("this model cannot be exported as Hugging Face GPT-2. Only models whose "
                        f"{', '.join(_GPT2_SLOTS)} components are all GPT-2 compatible can be" if export else
                        "GPT-2 weights cannot be loaded into it. Use an attention listed with capability gpt2 "
                        "by `minigpt components attention` (e.g. book.multihead)")
                raise PretrainedError(f"model.{slot}: '{entry.name}' is not GPT-2 compatible (it does not declare "
                                      f"the gpt2 capability), so {what}.")

    def load_state(self, model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
        spec = model.spec
        canonical = _canonical_from_hf(state, spec.n_layers, spec.tie_weights, source)
        load_canonical_model_state(model, canonical, source)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _hf_from_canonical(canonical_model_state(model), len(model.trf_blocks))

    def transfer(self, source_model: nn.Module, target_model: nn.Module, where: str) -> None:
        load_canonical_model_state(target_model, canonical_model_state(source_model), where)

    def config(self, model: nn.Module) -> dict[str, Any]:
        s = model.spec
        eps = getattr(model.final_norm, "eps", 1e-5)
        ff = getattr(model.trf_blocks[0], "ff", None)
        first = getattr(ff, "layers", [None])[0]
        hidden = getattr(first, "out_features", 4 * s.emb_dim)
        has_eot = s.vocab_size >= 50257  # GPT-2's <|endoftext|> id exists
        return {
            "architectures": list(self.architectures), "model_type": self.model_type,
            "vocab_size": s.vocab_size, "n_positions": model.pos_emb.num_embeddings, "n_embd": s.emb_dim,
            "n_layer": s.n_layers, "n_head": s.n_heads, "n_inner": None if hidden == 4 * s.emb_dim else hidden,
            "activation_function": "gelu_new", "layer_norm_epsilon": eps,
            "resid_pdrop": s.drop_rate, "embd_pdrop": s.drop_rate, "attn_pdrop": s.drop_rate,
            "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
            "bos_token_id": 50256 if has_eot else None, "eos_token_id": 50256 if has_eot else None,
            "tie_word_embeddings": s.tie_weights, "dtype": "float32",
        }
