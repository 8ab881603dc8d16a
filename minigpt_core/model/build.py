"""Building the GPT a spec describes: refused before allocation when it cannot fit, then seeded."""

from __future__ import annotations

import torch

from ..spec import ExperimentSpec, ModelSpec
from .gpt import GPT
from .memory import check_model_fits

__all__ = ["build_model"]


def build_model(spec: ExperimentSpec | ModelSpec, *, seed: int | None = None) -> GPT:
    """Build the GPT a spec describes, from the components it was resolved to.

    A bare model section needs no tokenizer or dataset. With an :class:`ExperimentSpec`,
    ``torch.manual_seed(spec.seed)`` runs first (pass ``seed=`` to override) so the same spec
    always gives the same initial weights.
    """
    model_spec = spec.model if isinstance(spec, ExperimentSpec) else spec
    components = model_spec.components
    if isinstance(spec, ExperimentSpec):
        seed = spec.seed if seed is None else seed
    device = torch.get_default_device()
    if device.type != "meta":  # refuse a model that cannot fit before allocating it
        check_model_fits(model_spec, training=False, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT(model_spec, components)
