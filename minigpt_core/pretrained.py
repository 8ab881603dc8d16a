"""GPT-2 weights in and out: Hugging Face checkpoints <-> minigpt models, and ``init_from``.

Every transfer goes through the *canonical model state*: the model's own state dict in the
book's layout, where each attention layer contributes its canonical W_query / W_key / W_value /
out_proj tensors (:mod:`minigpt_core.interop`). So any registered attention that declares the
``gpt2`` capability and speaks the canonical layout (fused QKV, SDPA, ...) imports and exports
Hugging Face GPT-2 weights unchanged.

Hugging Face GPT-2 stores its projections as ``Conv1D`` (``y = x @ W + b``, W of shape
(in, out)); nn.Linear stores (out, in), hence the transposes. ``c_attn`` is q, k and v
concatenated along the output dimension.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import torch

from .checkpoint import (
    _unwrap,
    atomic_write_bytes,
    load_model,
    load_weights_file,
    model_state_for_saving,
)
from .errors import CheckpointError, MinigptError
from .interop import attention_canonical_state, load_attention_canonical_state
from .model import GPT, build_model
from .registry import ComponentRegistry
from .spec import MODEL_SLOTS, ExperimentSpec, ModelSpec, parse_spec, resolve_components

__all__ = [
    "HF_PREFIX",
    "PretrainedError",
    "canonical_model_state",
    "load_canonical_model_state",
    "gpt2_model_section",
    "read_hf_checkpoint",
    "resolve_hf_source",
    "import_hf",
    "hf_state_from_model",
    "export_hf",
    "load_init_from",
    "init_from_model",
]

HF_PREFIX = "hf:"  # init_from = "hf:PATH_OR_HUB_ID"
# Activations Hugging Face names that are all GPT-2's tanh approximation of GELU.
_TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
# Slots whose components must be GPT-2 compatible for the weights to mean the same thing.
_GPT2_SLOTS = tuple(s for s in MODEL_SLOTS if s != "init")


class PretrainedError(MinigptError):
    """Weights cannot move between minigpt and Hugging Face GPT-2 (incompatible model, no hub access)."""


# -- canonical model state -----------------------------------------------------------------
def _attention_prefix(i: int) -> str:
    return f"trf_blocks.{i}.att."


def _blocks_attention(model: GPT) -> list[torch.nn.Module]:
    try:
        return [block.att for block in model.trf_blocks]
    except AttributeError:
        raise PretrainedError(
            f"The block component '{model.spec.block.name}' has no `att` attribute, so its attention "
            f"weights cannot be mapped; GPT-2 weights need a GPT-2 compatible block such as book.pre_norm."
        ) from None


def canonical_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every attention layer in the canonical (book) layout."""
    model = _unwrap(model)
    state = model_state_for_saving(model)
    for i, att in enumerate(_blocks_attention(model)):
        prefix = _attention_prefix(i)
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v.detach().cpu() for k, v in attention_canonical_state(att).items()})
    return state


def load_canonical_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a canonical model state; each attention converts its canonical tensors itself."""
    model = _unwrap(model)
    attentions = _blocks_attention(model)
    prefixes = tuple(_attention_prefix(i) for i in range(len(attentions)))
    own = {k: v for k, v in model_state_for_saving(model).items() if not k.startswith(prefixes)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing, unexpected = sorted(own.keys() - rest.keys()), sorted(rest.keys() - own.keys())
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in rest.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"The weights from {source} do not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {wrong[:5]}. The components outside attention must "
            f"use the book's GPT-2 layout (book.layernorm, book.feedforward, book.learned, book.pre_norm)."
        )
    with torch.no_grad():
        model.load_state_dict(rest, strict=False)
        for prefix, att in zip(prefixes, attentions):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                load_attention_canonical_state(att, sub)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise CheckpointError(
                    f"Attention '{model.spec.attention.name}' ({prefix.rstrip('.')}) cannot take the "
                    f"attention weights from {source}: {exc}"
                ) from None


# -- Hugging Face layout -------------------------------------------------------------------
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


_QKV = ("W_query", "W_key", "W_value")
_GLOBAL_NAMES = [("wte.weight", "tok_emb.weight"), ("wpe.weight", "pos_emb.weight"),
                 ("ln_f.weight", "final_norm.scale"), ("ln_f.bias", "final_norm.shift")]


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
            w = take(f"{theirs}")
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
            f"probably another architecture or a GPT-2 with a different head."
        )
    return out


def _book_norm_names(model: GPT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.nn.LayerNorm (torch.layernorm) names its gain and bias weight / bias where the book's
    LayerNorm says scale / shift; it computes the same function (a missing bias is a zero one)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and f"{name}.weight" in state:
            weight, bias = state.pop(f"{name}.weight"), state.pop(f"{name}.bias", None)
            state[f"{name}.scale"] = weight
            state[f"{name}.shift"] = torch.zeros_like(weight) if bias is None else bias
    return state


def hf_state_from_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names (q/k/v biases are zeros when the model has none)."""
    model = _unwrap(model)
    state = _book_norm_names(model, canonical_model_state(model))
    n_layers = len(model.trf_blocks)
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
            f"to Hugging Face GPT-2."
        )
    return out


def gpt2_model_section(config: Mapping[str, Any], attention: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
        "attention": dict(attention or {"name": "book.multihead"}),
        "norm": {"name": "book.layernorm", "params": {"eps": config.get("layer_norm_epsilon", 1e-5)}},
        "activation": {"name": "book.gelu"}, "feedforward": feedforward, "positional": {"name": "book.learned"},
        "block": {"name": "book.pre_norm"}, "init": {"name": "gpt2.normal"},
    }


def read_hf_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights (model.safetensors, sharded safetensors, or pytorch_model.bin)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json; it is not a Hugging Face checkpoint directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / 'config.json'} is corrupt ({exc}).") from None
    if (directory / "model.safetensors").is_file():
        return config, load_weights_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index} is corrupt ({exc}).") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_weights_file(directory / shard))
        return config, state
    if (directory / "pytorch_model.bin").is_file():
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects.
            return config, torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(
                f"{directory / 'pytorch_model.bin'} cannot be loaded safely ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); it is corrupt or holds more than tensors. "
                f"Convert it to model.safetensors with a trusted tool."
            ) from None
    raise CheckpointError(
        f"{directory} has a config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin."
    )


# -- Hugging Face Hub ----------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why no TCP connection to the hub (or the proxy the environment names) opens, or None if one does.

    huggingface_hub retries a failed request five times with backoff (about 25 s, longer when
    packets are dropped); one short probe first makes an offline machine fail in seconds.
    """
    url = urlsplit(endpoint)
    target = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (p.hostname, p.port or 80)
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {target[0]}:{target[1]}: {exc.strerror or exc}"
    return None


def _hub_download(repo_id: str, cache_dir: str | Path | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise PretrainedError(
            f"'{repo_id}' is not a local directory, and loading it from the Hugging Face Hub needs "
            f"huggingface_hub: `pip install 'minigpt[hf]'`. Or download the model elsewhere and pass "
            f"its directory (config.json + model.safetensors)."
        ) from None
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE")

    def fetch(filename: str, local_only: bool) -> Path:
        # etag_timeout bounds the metadata request, so an unreachable hub fails in seconds, not hangs.
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir,
                                                    local_files_only=local_only, etag_timeout=10))

    def fetch_model(local_only: bool) -> Path:
        config = fetch("config.json", local_only)
        for weights in ("model.safetensors", "pytorch_model.bin"):
            try:
                fetch(weights, local_only)
                return config.parent
            except huggingface_hub.errors.EntryNotFoundError:
                continue
        raise PretrainedError(f"The Hub repository '{repo_id}' has no model.safetensors or pytorch_model.bin.")

    try:
        return fetch_model(local_only=True)  # already in the local cache: no network at all
    except (huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.EntryNotFoundError):
        pass
    if offline:
        raise PretrainedError(
            f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot "
            f"be downloaded. Run once with network access (unset HF_HUB_OFFLINE), or pass the path of a "
            f"directory holding its config.json and model.safetensors."
        )
    offline_hint = (
        f"Download it where there is network (`hf download {repo_id}`) and copy the Hugging Face cache "
        f"here, or pass the path of a directory with its config.json and model.safetensors."
    )
    why = _unreachable(constants.ENDPOINT)
    if why:
        raise PretrainedError(
            f"'{repo_id}' is not in the local Hugging Face cache and this machine looks offline "
            f"({why}). {offline_hint}"
        )
    try:
        return fetch_model(local_only=False)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise PretrainedError(f"There is no Hugging Face Hub model '{repo_id}' (or it is private).") from None
    except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError, OSError) as exc:
        raise PretrainedError(
            f"Cannot download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}): this machine "
            f"looks offline or the Hub is unreachable. {offline_hint}"
        ) from None


def resolve_hf_source(source: str, cache_dir: str | Path | None = None) -> Path:
    """A local Hugging Face checkpoint directory for ``source``: a path, or a hub id such as ``gpt2``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the Hugging Face checkpoint directory that holds it.")
    if not _HUB_ID.match(source) or ".." in source:
        raise CheckpointError(
            f"No Hugging Face checkpoint directory at {source}. Pass a directory holding config.json and "
            f"model.safetensors (or pytorch_model.bin), e.g. one written by save_pretrained, or a hub id "
            f"such as gpt2 when online."
        )
    return _hub_download(source, cache_dir)


# -- import / export -------------------------------------------------------------------------
def _check_attention(spec: ExperimentSpec, registry: ComponentRegistry | None) -> None:
    entry = resolve_components(spec, registry)["attention"].entry
    if not entry.has("gpt2"):
        raise PretrainedError(
            f"model.attention: '{entry.name}' does not declare the gpt2 capability, so GPT-2 weights "
            f"cannot be loaded into it. Use an attention listed with capability gpt2 by "
            f"`minigpt components attention` (e.g. book.multihead)."
        )


def import_hf(source: str | Path, registry: ComponentRegistry | None = None, *,
              base: ExperimentSpec | None = None, attention: Mapping[str, Any] | None = None,
              cache_dir: str | Path | None = None) -> tuple[GPT, ExperimentSpec]:
    """Build a minigpt GPT holding a Hugging Face GPT-2 checkpoint (a directory or a hub id).

    The model section comes from the checkpoint's config; everything else (name, tokenizer, data,
    training) from ``base`` when given. ``attention`` picks any GPT-2 compatible attention.
    """
    directory = resolve_hf_source(str(source), cache_dir)
    config, hf_state = read_hf_checkpoint(directory)
    data = base.model_dump(mode="json", exclude_none=True) if base is not None else {"name": "gpt2-import"}
    data.pop("preset", None)
    data["model"] = gpt2_model_section(config, attention)
    spec = parse_spec(data, source=f"{directory}/config.json", registry=registry)
    _check_attention(spec, registry)
    state = _canonical_from_hf(hf_state, spec.model.n_layers, spec.model.tie_weights, str(directory))
    model = build_model(spec, registry)
    load_canonical_model_state(model, state, str(directory))
    return model, spec


def _hf_config(model: GPT) -> dict[str, Any]:
    s = model.spec
    eps = getattr(model.final_norm, "eps", 1e-5)
    hidden = model.trf_blocks[0].ff.layers[0].out_features
    has_eot = s.vocab_size >= 50257  # GPT-2's <|endoftext|> id exists
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": s.vocab_size, "n_positions": model.pos_emb.num_embeddings, "n_embd": s.emb_dim,
        "n_layer": s.n_layers, "n_head": s.n_heads, "n_inner": None if hidden == 4 * s.emb_dim else hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": eps,
        "resid_pdrop": s.drop_rate, "embd_pdrop": s.drop_rate, "attn_pdrop": s.drop_rate,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": 50256 if has_eot else None, "eos_token_id": 50256 if has_eot else None,
        "tie_word_embeddings": s.tie_weights, "dtype": "float32",
    }


def _write_gpt2_tokenizer_files(directory: Path, vocab_dir: str | None) -> bool:
    """GPT-2's vocab.json / merges.txt (the same files as encoder.json / vocab.bpe), so the export
    also loads with transformers' GPT-2 tokenizer. Skipped when the tokenizers plugin is absent."""
    try:
        from minigpt_tokenizers.bpe import packaged_gpt2_dir
    except ImportError:
        return False
    src = Path(vocab_dir) if vocab_dir else packaged_gpt2_dir()
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        atomic_write_bytes(directory / theirs, (src / ours).read_bytes())
    return True


def _write_char_tokenizer_files(directory: Path, chars: str, context_length: int) -> None:
    """A Hugging Face ``tokenizer.json`` with the char tokenizer's ids: every character its own
    token (an empty-pattern split), decoded by concatenation; AutoTokenizer loads it."""
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": {"type": "Fuse"},
        # No unknown token, like minigpt's char tokenizer: a character outside the vocabulary is an error.
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)}, "unk_token": "<unk>"},
    }
    atomic_write_bytes(directory / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False).encode("utf-8"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length}
    atomic_write_bytes(directory / "tokenizer_config.json", json.dumps(config, indent=2).encode("utf-8"))


def export_hf(model: torch.nn.Module, spec: ExperimentSpec, directory: str | Path,
              registry: ComponentRegistry | None = None,
              tokenizer_state: Mapping[str, Any] | None = None) -> Path:
    """Write a directory ``transformers.GPT2LMHeadModel.from_pretrained`` loads with identical logits.

    Tokenizer files come along for the gpt2 tokenizer and for ``char`` (given its saved
    ``tokenizer_state``, as in a checkpoint's meta.json); for any other a warning says that the
    directory has no tokenizer.
    """
    from safetensors.torch import save

    model = _unwrap(model)
    resolved = resolve_components(spec, registry)
    for slot in _GPT2_SLOTS:
        entry = resolved[slot].entry
        if not entry.has("gpt2"):
            raise PretrainedError(
                f"model.{slot}: '{entry.name}' is not GPT-2 compatible (it does not declare the gpt2 "
                f"capability), so this model cannot be exported as Hugging Face GPT-2. Only models "
                f"whose {', '.join(_GPT2_SLOTS)} components are all GPT-2 compatible can be."
            )
    state = {k: v.float() for k, v in hf_state_from_model(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config.json last: a directory with a config is complete.
    atomic_write_bytes(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    name = spec.tokenizer.name
    written = False
    if name == "gpt2":
        written = _write_gpt2_tokenizer_files(directory, spec.tokenizer.params.get("vocab_dir"))
    elif name == "char" and isinstance((tokenizer_state or {}).get("chars"), str):
        _write_char_tokenizer_files(directory, tokenizer_state["chars"], spec.model.context_length)
        written = True
    if not written:
        warnings.warn(
            f"{directory} has no tokenizer files: the model was trained with the {name!r} tokenizer, "
            f"which this export cannot write{' without its saved state' if name == 'char' else ''}. "
            f"Its token ids are that tokenizer's ids, not GPT-2's: encode and decode text with it "
            f"(minigpt_core.tokenizers.tokenizer_from_state of the checkpoint's meta.json 'tokenizer').",
            stacklevel=2)
    atomic_write_bytes(directory / "config.json", json.dumps(_hf_config(model), indent=2).encode("utf-8"))
    return directory


# -- init_from -------------------------------------------------------------------------------
_SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")


def _merge_model_section(spec: ExperimentSpec, imported: ModelSpec, source: str) -> dict[str, Any]:
    """The imported model section, with the file's attention choice and drop_rate when it sets them."""
    mine = spec.model
    chosen = mine.model_fields_set
    merged = imported.model_dump(mode="json")
    ignored = [f"model.{f}={getattr(mine, f)!r}" for f in _SHAPE_FIELDS + tuple(MODEL_SLOTS)
               if f in chosen and f not in ("attention", "init") and getattr(mine, f) != getattr(imported, f)]
    if ignored:
        warnings.warn(
            f"init_from = {source!r} decides the model's architecture; the file's "
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored.", stacklevel=3)
    if "attention" in chosen:
        merged["attention"] = mine.attention.model_dump(mode="json")
    if "drop_rate" in chosen:
        merged["drop_rate"] = mine.drop_rate
    return merged


def init_from_model(spec: ExperimentSpec, registry: ComponentRegistry | None = None) -> ModelSpec:
    """The model section a run with ``init_from`` will have, read cheaply (config files, no weights).

    ``validate`` shows this shape instead of the file's (which init_from overrides). A Hub id that is
    not cached locally is not fetched: the file's own section is returned.
    """
    from . import _toml
    from .checkpoint import SPEC_FILE, check_plugin_files

    source = spec.init_from
    if source is None:
        return spec.model
    if source.startswith(HF_PREFIX):
        directory = Path(source[len(HF_PREFIX):]).expanduser()
        if not (directory / "config.json").is_file():
            return spec.model
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory / 'config.json'} is unreadable or corrupt ({exc}).") from None
        imported = ModelSpec.model_validate(gpt2_model_section(config))
    else:
        if not Path(source).is_dir():
            raise CheckpointError(
                f"init_from = {source!r}: no such checkpoint directory. Use a minigpt checkpoint "
                f"directory (or a run directory: its latest checkpoint), or 'hf:PATH_OR_HUB_ID' for "
                f"Hugging Face GPT-2 weights."
            )
        from .train.state import resolve_checkpoint

        ckpt = resolve_checkpoint(source)
        try:
            saved = _toml.loads((ckpt / SPEC_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, _toml.TOMLDecodeError) as exc:
            raise CheckpointError(f"{ckpt / SPEC_FILE} is unreadable or corrupt ({exc}).") from None
        saved = check_plugin_files(ckpt, saved, registry)  # its plugin files: gone (error) or changed (warning)
        imported = parse_spec(saved, source=str(ckpt / SPEC_FILE), registry=registry).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself warns about ignored fields
        merged = _merge_model_section(spec, imported, source)
    return ModelSpec.model_validate(merged)


def load_init_from(spec: ExperimentSpec, registry: ComponentRegistry | None = None,
                   cache_dir: str | Path | None = None,
                   report: Callable[[str], None] | None = None) -> tuple[GPT, ExperimentSpec]:
    """The model a run starts from, and the spec that describes it.

    ``init_from = "hf:PATH_OR_HUB_ID"`` loads Hugging Face GPT-2 weights; ``init_from = "DIR"`` a
    minigpt checkpoint directory (a run or experiment directory: its best checkpoint, else its
    latest; the files are hash-checked); ``None`` builds the spec's model with its init scheme. The
    model section comes from the weights; the file may still choose any GPT-2 compatible attention
    (``[model.attention]``) and the dropout rate, and all its other sections are kept. ``report``
    receives a line naming the checkpoint used.
    """
    source = spec.init_from
    if source is None:
        return build_model(spec, registry), spec
    if source.startswith(HF_PREFIX):
        directory = resolve_hf_source(source[len(HF_PREFIX):], cache_dir)
        config, hf_state = read_hf_checkpoint(directory)
        imported = ModelSpec.model_validate(gpt2_model_section(config))
        new_spec = _respec(spec, _merge_model_section(spec, imported, source), registry)
        _check_attention(new_spec, registry)
        state = _canonical_from_hf(hf_state, imported.n_layers, imported.tie_weights, str(directory))
    else:
        if not Path(source).is_dir():
            raise CheckpointError(
                f"init_from = {source!r}: no such checkpoint directory. Use a minigpt checkpoint "
                f"directory (or a run directory: its best checkpoint, else its latest), or "
                f"'hf:PATH_OR_HUB_ID' for Hugging Face GPT-2 weights."
            )
        from .train.state import pick_checkpoint  # imported here: the training stack is heavy

        ckpt, which = pick_checkpoint(source)
        if report is not None:
            report(f"init_from checkpoint: {ckpt} ({which})")
        loaded, loaded_spec = load_model(ckpt, registry)
        new_spec = _respec(spec, _merge_model_section(spec, loaded_spec.model, source), registry)
        if new_spec.model.attention == loaded_spec.model.attention:
            model = build_model(new_spec, registry)
            model.load_state_dict(loaded.state_dict())  # same components: same state-dict keys
            return model, new_spec
        # Another attention: only through the canonical layout, which both must speak.
        for s in (loaded_spec, new_spec):
            _check_attention(s, registry)
        state = canonical_model_state(loaded)
    model = build_model(new_spec, registry)
    load_canonical_model_state(model, state, source)
    return model, new_spec


def _respec(spec: ExperimentSpec, model: dict[str, Any], registry: ComponentRegistry | None) -> ExperimentSpec:
    data = spec.model_dump(mode="json", exclude_none=True)
    data.pop("preset", None)  # the model section is complete; a preset would be merged under it
    data["model"] = model
    return parse_spec(data, source=f"init_from {spec.init_from}", registry=registry)
