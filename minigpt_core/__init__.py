"""minigpt core: registries, plugin loading, experiment specs and GPT assembly.

Importing it loads the base layer, the spec and the plugin API (minigpt_core.plugin), not torch:
the model's names (``GPT``, ``build_model``, ...) load it on first use (PEP 562 ``__getattr__``),
so commands that only read files (``minigpt runs``, ``--help``) start in a fraction of a second.
Never the trainer, tasks or the libraries of figures, statistics, adapters, quantization and W&B
(tests/test_architecture.py). docs/architecture.md describes the layers.
"""

from __future__ import annotations

from .base.hookspecs import hookimpl, hookspec
from .base.loader import (
    ENTRY_POINT_GROUP,
    PLUGINS_ENV_VAR,
    PluginFailure,
    PluginInfo,
    get_registry,
    load_registry,
    reset_registry,
)
from .base.errors import (
    CheckpointError,
    DuplicateComponentError,
    MinigptError,
    PluginLoadWarning,
    SpecError,
    UnknownComponentError,
)
from .base.registry import CAPABILITIES, KINDS, ComponentEntry, ComponentRegistry, NoParams
from .spec import (
    PRESETS,
    ComponentSlot,
    ExperimentSpec,
    ModelSpec,
    dump_spec,
    load_spec,
    parse_spec,
    resolve_components,
    spec_from_preset,
)
from typing import TYPE_CHECKING

from . import plugin  # the public plugin API, as `minigpt_core.plugin`
from .base.version import __version__

__all__ = [
    "__version__",
    # plugins
    "hookimpl",
    "hookspec",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV_VAR",
    "PluginInfo",
    "PluginFailure",
    "load_registry",
    "get_registry",
    "reset_registry",
    # registry
    "KINDS",
    "CAPABILITIES",
    "ComponentEntry",
    "ComponentRegistry",
    "NoParams",
    # specs
    "PRESETS",
    "ComponentSlot",
    "ModelSpec",
    "ExperimentSpec",
    "load_spec",
    "parse_spec",
    "spec_from_preset",
    "dump_spec",
    "resolve_components",
    # models
    "GPT",
    "BuildContext",
    "KVCache",
    "LayerKVCache",
    "build_model",
    "mark_residual_projection",
    "ParameterSummary",
    "summarize",
    # errors
    "MinigptError",
    "SpecError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "CheckpointError",
    "PluginLoadWarning",
]

# The names that need torch, imported on first use (static tools and import-linter see them here).
if TYPE_CHECKING:
    from .model.build import build_model
    from .model.gpt import GPT, BuildContext, KVCache, LayerKVCache, mark_residual_projection
    from .model.summary import ParameterSummary, summarize

_LAZY = {
    "GPT": ".model.gpt", "BuildContext": ".model.gpt", "KVCache": ".model.gpt", "LayerKVCache": ".model.gpt",
    "mark_residual_projection": ".model.gpt", "build_model": ".model.build",
    "ParameterSummary": ".model.summary", "summarize": ".model.summary",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
