"""The component under test: one registry entry, built at tiny sizes for the conformance checks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from pydantic import ValidationError

from ..base.errors import MinigptError
from ..model.gpt import GPT, BuildContext
from ..base.registry import ComponentEntry, ComponentRegistry
from ..base.errors import SpecError
from ..spec import MODEL_SLOTS, ComponentSlot, ModelSpec, ResolvedComponent, resolve_components

__all__ = ["TINY_MODEL", "MODULE_KINDS", "SEQUENCE_KINDS", "CheckFailed", "CheckSkipped", "ConformanceError",
           "Subject"]

# Small enough that every check of every component runs in a fraction of a second on a CPU; four
# heads so grouped-query variants have groups; q/k/v biases on so weight copies cover them.
TINY_MODEL: dict[str, Any] = dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                                  drop_rate=0.0, qkv_bias=True)

# Kinds whose factory returns an nn.Module; sequence kinds map (B, T, C) -> (B, T, C).
MODULE_KINDS = frozenset({"attention", "norm", "activation", "feedforward", "positional", "block"})
SEQUENCE_KINDS = frozenset({"attention", "norm", "activation", "feedforward", "block"})


class ConformanceError(MinigptError):
    """The checks were asked for something that does not exist (a check name, a component pattern)."""


class CheckFailed(AssertionError):
    """A conformance check found a problem; the message names the component and what went wrong."""


class CheckSkipped(Exception):
    """The check does not apply to this component as built (e.g. a positional factory returning None)."""


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for a block without disturbing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class Subject:
    """An entry with the params, registry and device it is checked with."""

    entry: ComponentEntry
    registry: ComponentRegistry
    params: Mapping[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    @property
    def label(self) -> str:
        return f"{self.entry.kind} '{self.entry.name}'"

    def fail(self, message: str) -> CheckFailed:
        return CheckFailed(f"{self.label}: {message}")

    def validated_params(self):
        try:
            return self.entry.make_params(self.params)
        except ValidationError as exc:
            missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
            if missing and not self.params:
                raise CheckSkipped(f"{self.label} has required params ({', '.join(missing)}) and the checks "
                                   f"have no values for them; check it with run_checks(..., params={{...}})")
            raise self.fail(f"params {dict(self.params)} do not validate: {exc}") from None

    # -- model kinds -----------------------------------------------------------------------
    def model_spec(self, **overrides: Any) -> ModelSpec:
        """The tiny model section, with this entry in its slot when it is a model component."""
        fields = {**TINY_MODEL, **overrides}
        if self.entry.kind in MODEL_SLOTS:
            fields[self.entry.kind] = ComponentSlot(name=self.entry.name, params=dict(self.params))
        return ModelSpec(**fields)

    def components(self, model: ModelSpec) -> dict[str, ResolvedComponent]:
        """The model section resolved as a spec is (:func:`resolve_components`), with this entry in
        its slot even where the registry has no such entry, and teaching attentions that declare
        they cannot serve a language model let through so they can be checked."""
        if self.entry.kind in MODEL_SLOTS:
            self.validated_params()  # required params the checks have no values for: skip, not fail
        try:
            return resolve_components(model, self.registry, entries={(self.entry.kind, self.entry.name): self.entry},
                                      for_lm=False)
        except SpecError as exc:
            raise self.fail(f"cannot be built at the checks' tiny sizes: {exc}") from None

    def build(self, seed: int = 0, **model_overrides: Any) -> Any:
        """This component as its factory makes it, on the device, in train mode."""
        model = self.model_spec(**model_overrides)
        ctx = BuildContext(model, self.components(model), layer_idx=0)
        with seeded(seed, self.device):
            built = ctx.build(self.entry.kind)
        return built.to(self.device) if isinstance(built, torch.nn.Module) else built

    def build_module(self, seed: int = 0, **model_overrides: Any) -> torch.nn.Module:
        module = self.build(seed, **model_overrides)
        if module is None and self.entry.kind == "positional":
            raise CheckSkipped(f"{self.label} builds no module (no absolute positions)")
        if not isinstance(module, torch.nn.Module):
            raise self.fail(f"factory returned {type(module).__name__}, not an nn.Module")
        return module

    def tiny_gpt(self, seed: int = 0, **model_overrides: Any) -> GPT:
        model = self.model_spec(**model_overrides)
        components = self.components(model)
        with seeded(seed, self.device):
            return GPT(model, components).to(self.device)

    def inputs(self, batch: int = 3, t: int = 8, seed: int = 1) -> torch.Tensor:
        """(B, T, C) activations, or (T,) positions for a positional embedding."""
        if self.entry.kind == "positional":
            return torch.arange(t, device=self.device)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, t, TINY_MODEL["emb_dim"], generator=gen).to(self.device)
