"""The conformance checks. Each takes a :class:`Subject` and raises CheckFailed (or CheckSkipped).

A check declares the kinds it applies to and, where it depends on a declared capability, a
predicate on the entry; registering one with :func:`conformance_check` makes every matching component run
it, in ``minigpt check`` and in ``parametrize_component_checks``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..base.contracts import AuxLossProtocol, CanonicalStateSource
from ..model.interop import attention_canonical_state, load_attention_canonical_state
from ..model.gpt import LayerKVCache
from ..base.registry import KINDS, ComponentEntry
from ..spec import MODEL_SLOTS
from .subject import MODULE_KINDS, SEQUENCE_KINDS, CheckSkipped, Subject

__all__ = ["Check", "CHECKS", "conformance_check", "applicable_checks", "REFERENCE_ATTENTION", "REFERENCE_COMPONENTS"]

# The attention the equivalence check compares against (the book's MultiHeadAttention).
REFERENCE_ATTENTION = "book.multihead"
# GPT-2's other functions: a gpt2 norm or activation must compute what the book's does.
REFERENCE_COMPONENTS = {"attention": REFERENCE_ATTENTION, "norm": "book.layernorm", "activation": "book.gelu"}


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    fn: Callable[[Subject], None]
    kinds: frozenset[str]
    when: Callable[[ComponentEntry], bool] | None = None  # e.g. only attentions declaring 'causal'
    for_lm: bool = False  # builds a language model: not for entries marked not_for_lm

    def applies(self, entry: ComponentEntry) -> bool:
        if entry.kind not in self.kinds:
            return False
        if self.name in entry.expected_failures:
            return True  # run it, so a declared failure that stops happening is reported
        if self.when is not None and not self.when(entry):
            return False
        return not (self.for_lm and entry.not_for_lm)


CHECKS: dict[str, Check] = {}


def conformance_check(name: str, description: str, kinds: Iterable[str], *,
                      when: Callable[[ComponentEntry], bool] | None = None, for_lm: bool = False):
    """Register a check function; every registered component of ``kinds`` runs it from then on.

    ``when`` narrows it to entries that declare something (a capability); ``for_lm`` skips
    components marked not for language models. A check that an entry lists in its
    ``expected_failures`` always runs on it, so a fixed failure shows up as an unexpected pass.
    """
    def wrap(fn: Callable[[Subject], None]) -> Callable[[Subject], None]:
        if name in CHECKS:
            raise ValueError(f"a conformance check named {name!r} already exists")
        CHECKS[name] = Check(name, description, fn, frozenset(kinds), when, for_lm)
        return fn
    return wrap


def _declares(capability: str) -> Callable[[ComponentEntry], bool]:
    return lambda e: e.has(capability)


def _attention_declares(capability: str) -> Callable[[ComponentEntry], bool]:
    # Other kinds (norms, feed-forwards, blocks) must always pass the check.
    return lambda e: e.kind != "attention" or e.has(capability)


def applicable_checks(entry: ComponentEntry, names: Iterable[str] | None = None) -> list[Check]:
    wanted = set(names) if names is not None else None
    return [c for c in CHECKS.values() if c.applies(entry) and (wanted is None or c.name in wanted)]


# -- helpers ---------------------------------------------------------------------------------
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _aux_loss(module: nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in module.modules() if isinstance(m, AuxLossProtocol) and isinstance(m.aux_loss, torch.Tensor)]
    return torch.stack([l.float() for l in losses]).sum() if losses else None


def _expect_close(s: Subject, got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    if got.shape != want.shape:
        raise s.fail(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = _max_diff(got, want)
    if not diff <= atol * (1 + want.abs().max().item()):
        raise s.fail(f"{what}: differs by up to {diff:.3g} (tolerance {atol:g})")


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
def _expected_shape(s: Subject, x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], s.model_spec().emb_dim) if s.entry.kind == "positional" else tuple(x.shape)


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
    from safetensors.torch import load, save

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


@conformance_check("compiles", "torch.compile(fullgraph=True) traces it with no graph break, matches eager "
                   "outputs and gradients, and recompiles neither at the next training step nor after an "
                   "eval-mode pass (as evaluation runs); or it declares not_compilable and train.compile "
                   "refuses it with that reason", MODULE_KINDS)
def check_compiles(s: Subject) -> None:
    from ..train.compile import compiled_graphs

    if s.entry.not_compilable:
        _check_compile_refused(s)
        return
    # The "eager" backend runs dynamo's tracing and guards (where graph breaks and recompiles come
    # from) without inductor's code generation, which takes seconds even at these sizes.
    import torch._dynamo
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    module = s.build_module().train()
    eager = s.build_module().train()  # the same weights (same seed), never compiled
    x = s.inputs()
    w = torch.randn(_expected_shape(s, x), generator=torch.Generator().manual_seed(2)).to(s.device)

    def step(m: nn.Module, plain: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        plain.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True) if x.is_floating_point() else x
        y = m(inp)
        loss = (y * w).sum()
        aux = _aux_loss(plain)
        if loss.requires_grad:  # a fixed table of positions has nothing to differentiate
            (loss if aux is None else loss + aux).backward()
        grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        if inp.requires_grad:
            grads["<input>"] = inp.grad
        return y.detach(), grads

    torch._dynamo.reset()  # a fresh cache: other modules' graphs count against its size limit
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    try:
        try:
            got, grads = step(compiled, module)
        except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as exc:
            raise s.fail(f"torch.compile(fullgraph=True) cannot trace it in one graph: {_brief(exc)}. Fix the "
                         f"graph break, or declare not_compilable='<why>' when registering it") from None
        want, want_grads = step(eager, eager)
        _expect_close(s, got, want, "compiled output (training mode)")
        for name, g in want_grads.items():
            if name not in grads:
                raise s.fail(f"compiled, '{name}' gets no gradient")
            _expect_close(s, grads[name], g, f"compiled, the gradient of '{name}'")
        first = compiled_graphs()
        when = "at the second training step"
        # set_stance names the failed guard (torch >= 2.6); older versions have the config flag.
        no_recompiles = torch.compiler.set_stance("fail_on_recompile") if hasattr(torch.compiler, "set_stance") \
            else torch._dynamo.config.patch(error_on_recompile=True)
        with no_recompiles:
            try:
                step(compiled, module)
                when = "after an eval-mode pass (as the trainer's evaluation runs the plain module)"
                module.eval()
                with torch.no_grad():
                    module(x)
                module.train()
                step(compiled, module)
            except RuntimeError as exc:  # set_stance's "detected recompile" error names the failed guard
                raise s.fail(f"torch.compile recompiled {when}: {_brief(exc)}") from None
        if compiled_graphs() != first:
            raise s.fail(f"torch.compile compiled {compiled_graphs() - first} more graph(s) after the first step")
    finally:
        torch._dynamo.reset()


def _brief(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _check_compile_refused(s: Subject) -> None:
    """A component declaring not_compilable: a spec with train.compile = true is refused, with its reason."""
    from ..base.errors import SpecError
    from ..spec import ExperimentSpec, resolve_components

    spec = ExperimentSpec(model=s.model_spec(), train={"compile": True})
    try:
        resolve_components(spec, s.registry, entries={(s.entry.kind, s.entry.name): s.entry}, for_lm=False)
    except SpecError as exc:
        if s.entry.not_compilable in str(exc):
            return
        raise s.fail(f"declares not_compilable, but train.compile = true is refused for another reason: {exc}")
    raise s.fail("declares not_compilable, but a spec with train.compile = true using it is accepted")


# -- whole models ----------------------------------------------------------------------------
@conformance_check("generate_cached", "a tiny GPT decoding with its KV cache gives the full pass's logits and "
                   "the same greedy tokens", {"attention", "block", "positional"},
                   when=_attention_declares("kv_cache"), for_lm=True)
def check_generate_cached(s: Subject) -> None:
    from ..model.generate import generate

    model = s.tiny_gpt().eval()
    if not model.supports_kv_cache:
        raise CheckSkipped(f"the model's attention '{model.spec.attention.name}' has no KV cache")
    idx = torch.randint(0, model.spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(s.device)
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(idx)
        stepped = torch.cat([model(idx[:, :3], kv_cache=cache)] +
                            [model(idx[:, t:t + 1], kv_cache=cache) for t in range(3, 8)], dim=1)
    _expect_close(s, stepped, full, "a GPT's logits decoded one token at a time with its KV cache")
    cached = generate(model, idx[:, :3], 10, use_cache=True)
    uncached = generate(model, idx[:, :3], 10, use_cache=False)
    if not torch.equal(cached, uncached):
        at = int((cached != uncached).any(0).nonzero()[0])
        raise s.fail(f"greedy generation with the KV cache first differs from without it at token {at}")


@conformance_check("trains", "a tiny GPT using it lowers its loss over 20 steps on a fixed batch",
                   MODEL_SLOTS, for_lm=True)
def check_trains(s: Subject) -> None:
    model = s.tiny_gpt().train()
    spec = model.spec
    batch = torch.randint(0, spec.vocab_size, (4, spec.context_length + 1), generator=torch.Generator().manual_seed(4))
    batch = batch.to(s.device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses):
        raise s.fail(f"training loss became non-finite: {losses}")
    if not losses[-1] < 0.9 * losses[0]:
        raise s.fail(f"a tiny GPT using it did not learn a fixed batch: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                     f"over 20 AdamW steps (expected at least a 10% drop)")


@conformance_check("init_reproducible", "the same seed gives the same finite weights; another seed others", {"init"})
def check_init_reproducible(s: Subject) -> None:
    a, b, c = (s.tiny_gpt(seed=seed).state_dict() for seed in (0, 0, 1))
    for name, tensor in a.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise s.fail(f"'{name}' has NaN or inf after initialisation")
        if not torch.equal(tensor, b[name]):
            raise s.fail(f"'{name}' differs between two builds with the same seed")
    if all(torch.equal(a[k], c[k]) for k in a):
        raise s.fail("two different seeds give identical weights")


# -- tokenizers and datasets -----------------------------------------------------------------
SAMPLE_TEXT = "Every effort moves you, 42 times.\nThe quick brown fox jumps over the lazy dog!"


@conformance_check("tokenizer_roundtrip", "decode(encode(text)) == text, ids in range, state() rebuilds it",
                   {"tokenizer"})
def check_tokenizer_roundtrip(s: Subject) -> None:
    from ..model.tokenizers import TokenizerContext, tokenizer_from_state

    tok = s.entry.factory(TokenizerContext(training_text=SAMPLE_TEXT), s.validated_params())
    ids = tok.encode(SAMPLE_TEXT)
    if not ids or not all(isinstance(i, int) and 0 <= i < tok.n_vocab for i in ids):
        raise s.fail(f"encode gave ids outside 0..n_vocab-1 ({tok.n_vocab}) or none at all")
    if tok.decode(ids) != SAMPLE_TEXT:
        raise s.fail(f"decode(encode(text)) gave {tok.decode(ids)!r}, not the text")
    if tok.eot_id is not None and not 0 <= tok.eot_id < tok.n_vocab:
        raise s.fail(f"eot_id {tok.eot_id} is outside 0..{tok.n_vocab - 1}")
    rebuilt = tokenizer_from_state(tok.state(), s.registry)
    if rebuilt.encode(SAMPLE_TEXT) != ids or rebuilt.n_vocab != tok.n_vocab:
        raise s.fail("the tokenizer rebuilt from its state() encodes differently")


@conformance_check("dataset_source", "builds a text or token source whose documents and fingerprint are stable",
                   {"dataset"})
def check_dataset_source(s: Subject) -> None:
    from ..data import DataContext, TextSource, TokenSource

    params = s.validated_params()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = DataContext(cache_dir=Path(tmp))
        source = s.entry.factory(ctx, params)
        if isinstance(source, TokenSource):
            return
        if not isinstance(source, TextSource):
            raise s.fail(f"factory returned {type(source).__name__}, not a TextSource or TokenSource")
        again = s.entry.factory(ctx, params)
        if not source.fingerprint() or source.fingerprint() != again.fingerprint():
            raise s.fail("fingerprint() is empty or changes between two builds of the same source")
        first = [d for d, _ in zip(source.documents(), range(3))]
        if not first or not all(isinstance(d, str) for d in first):
            raise s.fail("documents() yields no documents, or something other than str")
        if first != [d for d, _ in zip(again.documents(), range(3))]:
            raise s.fail("documents() yields a different order on a second read")



@conformance_check("weights_roundtrip", "a model's weights written in the format and read back give the same "
                   "logits; its config reads back as the same shape", {"weights"})
def check_weights_roundtrip(s: Subject) -> None:
    from ..base.errors import PretrainedError

    fmt = s.entry.factory(None, s.validated_params())
    model_spec = s.model_spec()
    try:
        fmt.check(s.components(model_spec), export=True)
    except PretrainedError as exc:
        raise CheckSkipped(f"{s.label} cannot write the tiny model of the checks' default components: {exc}")
    model, fresh = s.tiny_gpt(seed=0).eval(), s.tiny_gpt(seed=1).eval()
    fmt.load_state(fresh, fmt.state(model), f"{s.label}'s own output")
    idx = torch.randint(0, model_spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _expect_close(s, fresh(idx.to(s.device)), model(idx.to(s.device)), "logits after state() -> load_state()")
    section = fmt.model_section(fmt.config(model))
    shape = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights")
    got = {k: section.get(k) for k in shape}
    want = {k: getattr(model_spec, k) for k in shape}
    if got != want:
        raise s.fail(f"model_section(config(model)) describes {got}, but the model is {want}")


# -- adapters --------------------------------------------------------------------------------
def _adapted_gpt(s: Subject) -> tuple[nn.Module, object, torch.Tensor]:
    """A tiny GPT (untied head), the adapter built for it, and a batch of token ids."""
    from ..model.gpt import BuildContext

    model = s.tiny_gpt(seed=0).eval()
    adapter = s.entry.factory(BuildContext(model.spec, s.components(model.spec)), s.validated_params())
    idx = torch.randint(0, model.spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5)).to(s.device)
    return model, adapter, idx


@conformance_check("adapter_identity", "applied to a model, the freshly initialised adapter leaves its logits "
                   "unchanged", {"adapter"})
def check_adapter_identity(s: Subject) -> None:
    model, adapter, idx = _adapted_gpt(s)
    with torch.no_grad():
        before = model(idx)
        names = adapter.apply(model)
        after = model(idx)
    if not names:
        raise s.fail("apply() adapted no module with the default params")
    _expect_close(s, after, before, "logits after apply() at initialisation", atol=1e-6)


@conformance_check("adapter_trainable", "apply() adds parameter_count(model) parameters, all tagged trainable, "
                   "and leaves the base parameters as they were", {"adapter"})
def check_adapter_trainable(s: Subject) -> None:
    from ..finetune import is_marked_trainable

    model, adapter, _ = _adapted_gpt(s)
    expected = adapter.parameter_count(model)
    base = {id(p) for p in model.parameters()}
    n_base = sum(p.numel() for p in model.parameters())
    adapter.apply(model)
    if sum(p.numel() for p in model.parameters() if id(p) in base) != n_base:
        raise s.fail("apply() removed or replaced base parameters")
    tagged = {id(p) for m in model.modules() if is_marked_trainable(m) for p in m.parameters()}
    added = [p for p in model.parameters() if id(p) not in base]
    if sum(p.numel() for p in added) != expected:
        raise s.fail(f"apply() added {sum(p.numel() for p in added):,} parameters; parameter_count() said {expected:,}")
    if any(id(p) not in tagged for p in added):
        raise s.fail("some adapter parameters are not in a module tagged with mark_trainable(), so a frozen base "
                     "would freeze them too")


@conformance_check("adapter_merge", "merge() gives the unmerged output (<= 1e-5), unmerge() restores the base "
                   "weights, unload() leaves the base model's keys with the merged output", {"adapter"})
def check_adapter_merge(s: Subject) -> None:
    model, adapter, idx = _adapted_gpt(s)
    base_keys = set(model.state_dict())
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapter.apply(model)
    added = [p for n, p in model.named_parameters() if n not in base_keys]
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in added:  # a trained adapter: non-zero everywhere
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.1)
        unmerged = model(idx)
        adapter.merge(model)
        merged = model(idx)
        _expect_close(s, merged, unmerged, "logits after merge()")
        adapter.unmerge(model)
        state = model.state_dict()
        base_now = {k: state[k] for k in base_keys if k in state}
        if len(base_now) == len(base_keys):  # the base weights kept their keys (else compared through unload)
            for k, v in base_now.items():
                _expect_close(s, v, base_weights[k], f"{k} after merge() then unmerge()")
        _expect_close(s, model(idx), unmerged, "logits after merge() then unmerge()")
        adapter.unload(model)
        if set(model.state_dict()) != base_keys:
            raise s.fail(f"after unload() the state dict keys differ from the base model's "
                         f"({sorted(set(model.state_dict()) ^ base_keys)[:4]})")
        _expect_close(s, model(idx), unmerged, "logits after unload()")


# -- templates -------------------------------------------------------------------------------
@conformance_check("template_format", "the training text is text(prompt, '') + output, starting with the prompt, "
                   "for examples with and without an input", {"template"})
def check_template_format(s: Subject) -> None:
    template = s.entry.factory(None, s.validated_params())
    for instruction, input_, output in (("Name a colour.", "", "Blue."), ("Spell it.", "Ocassion", "Occasion")):
        prompt = template.prompt(instruction, input_)
        if not isinstance(prompt, str) or instruction not in prompt or input_ not in prompt:
            raise s.fail(f"prompt({instruction!r}, {input_!r}) = {prompt!r} does not hold the instruction and input")
        text, start = template.text(prompt, output), template.text(prompt, "")
        if not start.startswith(prompt):
            raise s.fail(f"text(prompt, '') = {start!r} does not start with the prompt {prompt!r}")
        if text != start + output:
            raise s.fail(f"text(prompt, {output!r}) = {text!r} is not text(prompt, '') + output = "
                         f"{start + output!r}: `minigpt sample --instruction` feeds text(prompt, '') and reads "
                         f"what follows as the response")
