"""What validate and train print about a spec beyond its errors: warnings and one-line descriptions."""

from __future__ import annotations

from ..base.loader import get_registry
from .resolution import MODEL_SLOTS
from .schema import ExperimentSpec


def attention_weights_message(attention: str, registry=None) -> str:
    """Why ``attention`` gives no weights, and which registered attentions can."""
    registry = registry or get_registry()
    able = [e.name for e in registry.entries("attention") if e.has("attn_weights")]
    return (f"attention '{attention}' does not declare the attn_weights capability, so it cannot return its "
            f"attention weights (fused kernels compute none). Attentions that can: {', '.join(able) or 'none'}. "
            f"Train or load a model with one of them (`minigpt components attention` lists them).")


def describe_components(model) -> str:
    """Every component slot of a model section, for the one-line descriptions of validate and train."""
    return ", ".join(f"{slot} {getattr(model, slot).name}" for slot in MODEL_SLOTS)


def spec_warnings(spec: ExperimentSpec, total_steps: int | None = None) -> list[str]:
    """Settings that are valid but almost certainly not what was meant (printed by validate and train)."""
    out = []
    t = spec.train
    steps = total_steps if total_steps is not None else t.max_steps
    if steps is not None and t.warmup_steps > steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) is longer than the run ({steps} steps): the learning "
                   f"rate never reaches its peak train.lr ({t.lr:g}); lower train.warmup_steps")
    components = spec.model.components
    att, pos = components["attention"].entry, components["positional"].entry
    if t.log_attention_every and not att.has("attn_weights"):
        out.append(f"train.log_attention_every is set, but no attention maps will be drawn: "
                   f"{attention_weights_message(att.name, spec.registry)}")
    if att.has("positions") and pos.has("absolute"):
        out.append(f"attention '{att.name}' encodes positions itself, and positional '{pos.name}' adds "
                   f"absolute position embeddings on top: the model gets positions twice. Set "
                   f"[model.positional] name = \"modern.none\" unless that is the experiment")
    return out
