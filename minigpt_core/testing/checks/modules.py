"""The declaration check (every kind), then the checks of a component as a module: forward passes,
gradients, determinism, batches, state dicts, causality, the KV cache, attention weights,
equivalence with the book's classes, positions."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load, save
from torch import nn

from ...base.contracts import CanonicalStateSource
from ...base.registry import KINDS
from ...model.gpt import LayerKVCache
from ...model.interop import attention_canonical_state, load_attention_canonical_state
from ..subject import MODULE_KINDS, SEQUENCE_KINDS, CheckSkipped, Subject
from .registry import (
    CHECKS,
    REFERENCE_ATTENTION,
    REFERENCE_COMPONENTS,
    _attention_declares,
    _aux_loss,
    _declares,
    _expect_close,
    _expected_shape,
    _max_diff,
    conformance_check,
)


# -- every kind ------------------------------------------------------------------------------
@conformance_check("declaration", "expected failures name existing checks; params validate", KINDS)
def check_declaration(s: Subject) -> None:
    unknown = sorted(set(s.entry.expected_failures) - set(CHECKS))
    if unknown:
        raise s.fail(f"expected_failures names unknown check(s) {unknown}; checks are: {', '.join(CHECKS)}")
    empty = [k for k, reason in s.entry.expected_failures.items() if not str(reason).strip()]
    if empty:
        raise s.fail(f"expected_failures {empty} need a reason")
    s.validated_params()


# -- modules ---------------------------------------------------------------------------------
@conformance_check("forward_fp32", "float32 input gives a finite float32 output of the right shape", MODULE_KINDS)
def check_forward_fp32(s: Subject) -> None:
    module = s.build_module()
    x = s.inputs()
    y = module(x)
    if not isinstance(y, torch.Tensor):
        raise s.fail(f"forward returned {type(y).__name__}, not a tensor")
    if tuple(y.shape) != _expected_shape(s, x):
        raise s.fail(f"output shape {tuple(y.shape)} for input {tuple(x.shape)}; expected {_expected_shape(s, x)}")
    if y.dtype != torch.float32:
        raise s.fail(f"float32 input gave a {y.dtype} output")
    if not torch.isfinite(y).all():
        raise s.fail("output has NaN or inf")


@conformance_check("forward_bf16", "in bfloat16 the output stays bfloat16, finite and close to float32", MODULE_KINDS)
def check_forward_bf16(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs()
    with torch.no_grad():
        want = module(x)
        module = module.to(torch.bfloat16)
        got = module(x.to(torch.bfloat16) if x.is_floating_point() else x)
    if got.dtype != torch.bfloat16:
        raise s.fail(f"bfloat16 module and input gave a {got.dtype} output")
    if not torch.isfinite(got).all():
        raise s.fail("bfloat16 output has NaN or inf")
    # bfloat16 keeps 8 significant bits; a few roundings compound to a few percent.
    diff = _max_diff(got, want)
    if diff > 0.05 * (1 + want.abs().max().item()):
        raise s.fail(f"bfloat16 output differs from float32 by up to {diff:.3g}")


@conformance_check("gradients", "a backward pass gives every parameter (and the input) a finite, non-zero gradient",
                   MODULE_KINDS)
def check_gradients(s: Subject) -> None:
    module = s.build_module().train()
    x = s.inputs()
    if x.is_floating_point():
        x.requires_grad_(True)
    elif not any(True for _ in module.parameters()):
        raise CheckSkipped(f"{s.label} has no parameters and takes integer positions: nothing to differentiate")
    y = module(x)
    # A random projection, not a plain sum: the sum of a normalised vector has no gradient.
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    loss = (y * w).sum()
    aux = _aux_loss(module)
    (loss if aux is None else loss + aux).backward()
    for name, p in module.named_parameters():
        if p.grad is None:
            raise s.fail(f"parameter '{name}' gets no gradient (is it used in forward?)")
        if not torch.isfinite(p.grad).all():
            raise s.fail(f"parameter '{name}' has a NaN or inf gradient")
        if not p.grad.abs().sum() > 0:
            raise s.fail(f"parameter '{name}' gets an all-zero gradient")
    if x.requires_grad and (x.grad is None or not torch.isfinite(x.grad).all() or not x.grad.abs().sum() > 0):
        raise s.fail("the input gets no (or a zero or non-finite) gradient")


@conformance_check("determinism", "in eval mode the same input gives the identical output twice", MODULE_KINDS)
def check_determinism(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs()
    with torch.no_grad():
        a, b = module(x), module(x)
    if not torch.equal(a, b):
        raise s.fail(f"two eval-mode calls on the same input differ by up to {_max_diff(a, b):.3g}")


@conformance_check("batch_independence", "each sequence's output is the same alone as in a batch", SEQUENCE_KINDS)
def check_batch_independence(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs(batch=3)
    with torch.no_grad():
        batched = module(x)
        for i in range(x.shape[0]):
            alone = module(x[i:i + 1])
            diff = _max_diff(alone[0], batched[i])
            if diff > 1e-5 * (1 + batched.abs().max().item()):
                raise s.fail(f"sequence {i} gives a different output in a batch of {x.shape[0]} than alone "
                             f"(up to {diff:.3g}): the batch leaks between sequences")


@conformance_check("state_dict", "state_dict -> safetensors -> load_state_dict(strict) reproduces the outputs",
                   MODULE_KINDS)
def check_state_dict(s: Subject) -> None:
    source = s.build_module(seed=0).eval()
    target = s.build_module(seed=1).eval()
    blob = save({k: v.detach().contiguous().clone() for k, v in source.state_dict().items()})
    missing, unexpected = target.load_state_dict(load(blob), strict=False)
    if missing or unexpected:
        raise s.fail(f"state dict does not load into a fresh instance: missing {missing}, unexpected {unexpected}")
    x = s.inputs()
    with torch.no_grad():
        want, got = source(x), target(x)
    if not torch.equal(want, got):
        raise s.fail(f"after loading the state dict the output differs by up to {_max_diff(want, got):.3g}: "
                     f"some state is not in state_dict()")


@conformance_check("causality", "changing the input at a position leaves every earlier output unchanged",
                   SEQUENCE_KINDS, when=_attention_declares("causal"))
def check_causality(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs(batch=2, t=8)
    with torch.no_grad():
        base = module(x)
        # Exact up to rounding: a matrix product over a different set of rows (a mixture of experts
        # routing the changed token elsewhere) may round differently in the last bits.
        tol = 1e-6 * (1 + base.abs().max().item())
        for j in range(1, x.shape[1]):
            changed = x.clone()
            changed[:, j] = torch.randn(changed[:, j].shape, generator=torch.Generator().manual_seed(j)).to(x.device)
            out = module(changed)
            moved = (out[:, :j] - base[:, :j]).abs().flatten(2).amax(dim=(0, 2))  # (j,) earlier positions
            if (moved > tol).any():
                i = int((moved > tol).nonzero()[0])
                raise s.fail(f"not causal: changing only the input at position {j} changed the output at "
                             f"earlier position {i} (by up to {moved[i].item():.3g}); position {i} sees the future")


@conformance_check("kv_cache", "decoding in pieces with a KV cache gives the full forward pass's outputs",
                   {"attention", "block"}, when=_attention_declares("kv_cache"))
def check_kv_cache(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs(batch=2, t=8)
    cache = LayerKVCache(max_len=s.model_spec().context_length)
    pieces = [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]  # a prompt, single tokens, a multi-token step
    with torch.no_grad():
        full = module(x)
        for start, end in pieces:
            got = module(x[:, start:end], kv_cache=cache)
            want = full[:, start:end]
            diff = _max_diff(got, want) if got.shape == want.shape else math.inf
            if diff > 1e-5 * (1 + want.abs().max().item()):
                raise s.fail(f"with a KV cache, positions {start}..{end - 1} (after {start} cached) differ from "
                             f"the full forward pass by up to {diff:.3g}")


@conformance_check("attention_weights", "return_weights gives (B, H, T, T) rows summing to 1, zero on the future",
                   {"attention"}, when=_declares("attn_weights"))
def check_attention_weights(s: Subject) -> None:
    module = s.build_module().eval()
    x = s.inputs(batch=2, t=8)
    with torch.no_grad():
        plain = module(x)
        out = module(x, return_weights=True)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise s.fail("forward(x, return_weights=True) must return (output, weights)")
    y, w = out
    _expect_close(s, y, plain, "output with return_weights=True")
    b, t = x.shape[:2]
    if w.dim() != 4 or w.shape[0] != b or w.shape[2:] != (t, t):
        raise s.fail(f"weights have shape {tuple(w.shape)}; expected (B={b}, heads, {t}, {t})")
    _expect_close(s, w.sum(-1), torch.ones_like(w.sum(-1)), "attention weight rows' sums")
    if s.entry.has("causal") and w.triu(1).abs().max() > 0:
        raise s.fail("attention weights are non-zero above the diagonal: weight on future positions")


def _canonical_or_skip(s: Subject, module: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The module's weights in the canonical layout, and whether it can load them back (gpt2 attentions).

    A multi-head attention without the gpt2 capability can still be compared when it maps its own
    weights onto the canonical layout (``canonical_state()``; e.g. a head-concatenating wrapper,
    whose output projection is the identity).
    """
    if s.entry.has("gpt2") or isinstance(module, CanonicalStateSource):
        return attention_canonical_state(module), s.entry.has("gpt2")
    raise CheckSkipped(f"{s.label} has no canonical (GPT-2) weight layout to copy weights through")


def _norm_roles(module: nn.Module) -> dict[str, nn.Parameter]:
    """A LayerNorm's gain and shift under one name each (the book's scale/shift, torch's weight/bias)."""
    names = {"scale": "gain", "weight": "gain", "shift": "shift", "bias": "shift"}
    return {names[n]: p for n, p in module.named_parameters() if n in names}


@torch.no_grad()
def _check_same_function(s: Subject, reference: Subject) -> None:
    """A gpt2 norm or activation against the book's: same output (and, for a norm, after copying its gain/shift)."""
    x = s.inputs() * 3  # spread well into GELU's curved part
    candidate, ref = s.build_module(seed=0).eval(), reference.build_module(seed=1).eval()
    if s.entry.kind == "norm":
        theirs, mine = _norm_roles(ref), _norm_roles(candidate)
        gen = torch.Generator().manual_seed(3)
        for role, p in mine.items():  # random, not the ones/zeros both start with
            p.copy_(torch.randn(p.shape, generator=gen).to(p))
            theirs[role].copy_(p)
        for role in set(theirs) - set(mine):  # e.g. a norm without shift: the reference's is zero
            theirs[role].zero_()
    _expect_close(s, candidate(x), ref(x), f"compared with {reference.label}, output")


@conformance_check("equivalence", f"equals the book's component ({REFERENCE_ATTENTION}, book.layernorm, book.gelu; "
                   f"<= 1e-5) after copying weights through the canonical layout", {"attention", "norm", "activation"},
                   when=lambda e: e.has("gpt2") or (e.kind == "attention" and e.has("multihead")))
def check_equivalence(s: Subject) -> None:
    ref_name = REFERENCE_COMPONENTS[s.entry.kind]
    if (s.entry.kind, ref_name) not in s.registry:
        raise CheckSkipped(f"the reference {s.entry.kind} {ref_name} is not registered")
    reference = Subject(s.registry.get(s.entry.kind, ref_name), s.registry, device=s.device)
    if s.entry.kind != "attention":
        return _check_same_function(s, reference)
    x = s.inputs()
    for qkv_bias in (False, True):
        candidate = s.build_module(seed=0, qkv_bias=qkv_bias).eval()
        state, loadable = _canonical_or_skip(s, candidate)
        ref = reference.build_module(seed=1, qkv_bias=qkv_bias).eval()
        load_attention_canonical_state(ref, state)
        with torch.no_grad():
            _expect_close(s, candidate(x), ref(x),
                          f"with qkv_bias={qkv_bias}, after copying its weights into {REFERENCE_ATTENTION}, output")
        if loadable:  # and the other way: the reference's weights loaded into a fresh instance
            fresh = s.build_module(seed=2, qkv_bias=qkv_bias).eval()
            load_attention_canonical_state(fresh, attention_canonical_state(ref))
            with torch.no_grad():
                _expect_close(s, fresh(x), ref(x),
                              f"with qkv_bias={qkv_bias}, after loading {REFERENCE_ATTENTION}'s weights, output")


@conformance_check("positions_offset", "positions p.. give the rows p.. of positions 0..", {"positional"})
def check_positions_offset(s: Subject) -> None:
    module = s.build_module().eval()
    with torch.no_grad():
        full = module(torch.arange(8, device=s.device))
        tail = module(torch.arange(5, 8, device=s.device))
    if not torch.equal(full[5:], tail):
        raise s.fail("the embedding of positions 5..7 depends on where the call starts: cached decoding, which "
                     "embeds one position at a time, would see different positions")
