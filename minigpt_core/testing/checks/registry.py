"""The registry of conformance checks, and the helpers the checks share.

A check declares the kinds it applies to and, where it depends on a declared capability, a
predicate on the entry; registering one with :func:`conformance_check` makes every matching component run
it, in ``minigpt check`` and in ``parametrize_component_checks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ...base.contracts import AuxLossProtocol
from ...base.registry import ComponentEntry
from ..subject import Subject

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


def _expected_shape(s: Subject, x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], s.model_spec().emb_dim) if s.entry.kind == "positional" else tuple(x.shape)
