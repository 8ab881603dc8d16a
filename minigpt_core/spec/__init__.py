"""Experiment specs: Pydantic models, presets, TOML files.

A spec is checked in two passes, both before anything is built:

1. structure (Pydantic, ``spec.schema``): types, ranges, unknown keys, cross-field rules of the model;
2. components (:func:`resolve_components`, ``spec.resolution``): every slot names a registered
   component, its ``params`` validate against that component's own schema, and
   the component's own checks against the model section pass.

All problems come back as one :class:`~minigpt_core.base.errors.SpecError` whose
entries carry dotted paths such as ``model.attention.params.window``.

The second pass happens once: a parsed spec keeps its resolved components and the
registry they came from (``spec.components``, ``spec.registry``), and everything that
builds from a spec (model, tokenizer, data, checkpoints) reads them there instead of
taking a registry argument. A spec changed after parsing is resolved again, against
the same registry, the next time its components are asked for.

The layer above the base layer, in four parts, each importing only those listed after it
(a contract in pyproject.toml): ``files`` (TOML files, presets merged, overrides, the spec's
plugins) and ``advice`` (warnings, one-line descriptions); ``presets``; ``schema`` (the
sections); ``resolution`` (component slots and their lookup). This package re-exports their
public names: import them from ``minigpt_core.spec``.
"""

from __future__ import annotations

from .advice import attention_weights_message, describe_components, spec_warnings
from .files import apply_overrides, dump_spec, load_spec, parse_spec, spec_from_preset
from .presets import BOOK_COMPONENTS, FAST_COMPONENTS, PRESETS
from .resolution import (
    MODEL_SLOTS,
    ComponentSlot,
    ResolvedComponent,
    compile_refusal,
    iter_slots,
    resolve_components,
    slot_field,
    validation_problems,
)
from .schema import (
    TASKS,
    ClassificationSpec,
    DataSpec,
    ExperimentSpec,
    FinetuneSpec,
    InstructionSpec,
    ModelSpec,
    TrainSpec,
    WandbSpec,
)

__all__ = [
    "ComponentSlot",
    "ModelSpec",
    "ExperimentSpec",
    "DataSpec",
    "TrainSpec",
    "WandbSpec",
    "FinetuneSpec",
    "ClassificationSpec",
    "InstructionSpec",
    "TASKS",
    "PRESETS",
    "FAST_COMPONENTS",
    "BOOK_COMPONENTS",
    "MODEL_SLOTS",
    "ResolvedComponent",
    "load_spec",
    "parse_spec",
    "spec_from_preset",
    "dump_spec",
    "resolve_components",
    "apply_overrides",
    "slot_field",
    "iter_slots",
    "spec_warnings",
]
