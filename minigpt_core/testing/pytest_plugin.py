"""minigpt's pytest plugin (the ``pytest11`` entry point ``minigpt``): fixtures for testing components.

- ``minigpt_registry``: a registry freshly loaded from the installed plugins, which is also the
  process-wide one (``get_registry()``, the CLI) for the duration of the test.
- ``register_component(kind, name, factory, **declared)``: add a component for this test only.
- ``tiny_spec(**overrides)`` / ``tiny_model(seed=0, **overrides)``: the conformance checks' tiny
  model section (or GPT), with slots given as a name or ``{"name": ..., "params": {...}}``.
- ``assert_conforms(kind, name, params=None, checks=None)``: run the conformance checks on one
  component; fails the test with every failing check's message.

Importing this module imports its package, ``minigpt_core.testing`` (the checks, and with them
torch and the core), so the imports below cost nothing more.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import pytest
import torch

from minigpt_core.base import loader as _plugins
from minigpt_core.model.build import build_model
from minigpt_core.model.gpt import GPT
from minigpt_core.spec import MODEL_SLOTS, ModelSpec, resolve_components
from minigpt_core.testing import TINY_MODEL, check_component
from minigpt_core.testing.subject import seeded


@pytest.fixture
def minigpt_registry():
    registry = _plugins.load_registry()
    before = _plugins._default
    _plugins._default = registry
    try:
        yield registry
    finally:
        _plugins._default = before


@pytest.fixture
def register_component(minigpt_registry) -> Callable[..., Any]:
    """Add a component to this test's registry; it is gone after the test."""
    def register(kind: str, name: str, factory: Callable[..., Any], *, description: str | None = None,
                 **declared: Any):
        return minigpt_registry.add(kind, name, factory, description=description or f"test component {name}",
                                    plugin=declared.pop("plugin", "<test>"), **declared)
    return register


@pytest.fixture
def tiny_spec() -> Callable[..., Any]:
    def make(**overrides: Any) -> ModelSpec:
        fields = {**TINY_MODEL}
        for key, value in overrides.items():
            fields[key] = {"name": value} if key in MODEL_SLOTS and isinstance(value, str) else value
        return ModelSpec(**fields)
    return make


@pytest.fixture
def tiny_model(minigpt_registry, tiny_spec) -> Callable[..., Any]:
    def make(seed: int = 0, **overrides: Any) -> GPT:
        model = tiny_spec(**overrides)
        resolve_components(model, minigpt_registry)  # the model section alone: no tokenizer or dataset needed
        with seeded(seed, torch.device("cpu")):
            return build_model(model)
    return make


@pytest.fixture
def assert_conforms(minigpt_registry) -> Callable[..., Any]:
    def check(kind: str, name: str, params: Mapping[str, Any] | None = None,
              checks: Iterable[str] | None = None, device: str = "cpu"):
        results = check_component(minigpt_registry.get(kind, name), registry=minigpt_registry, params=params,
                                  checks=checks, device=device)
        bad = [r for r in results if not r.ok]
        if bad:
            pytest.fail("\n".join(f"{r.check}: {r.message}" for r in bad), pytrace=False)
        return results
    return check
