"""Marking the modules that always train, and selecting modules by name patterns.

Adapters and task heads use these (through minigpt_core.plugin); fine-tuning reads the marks.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Callable

from torch import nn

from ..base.errors import FinetuneError
from .weights import _unwrap

__all__ = ["TRAINABLE_ATTR", "ADAPTER_ATTR", "mark_trainable", "is_marked_trainable", "match_modules", "plain_model"]

TRAINABLE_ATTR = "_minigpt_always_trainable"
ADAPTER_ATTR = "_minigpt_adapter"  # the adapter object applied to a model, kept on the model


def mark_trainable(module: nn.Module) -> nn.Module:
    """Tag a module whose parameters always train, whatever ``[finetune] trainable`` freezes
    (a new classification head, an adapter's own layers)."""
    setattr(module, TRAINABLE_ATTR, True)
    return module


def is_marked_trainable(module: nn.Module) -> bool:
    """Whether :func:`mark_trainable` tagged ``module``."""
    return bool(getattr(module, TRAINABLE_ATTR, False))


def match_modules(model: nn.Module, patterns: list[str], *, where: str,
                  accept: Callable[[nn.Module], bool] = lambda m: isinstance(m, nn.Linear),
                  what: str = "nn.Linear layer") -> list[str]:
    """Names of the modules (``model.named_modules()``) that a pattern matches and ``accept`` takes.

    Patterns are shell-style (``fnmatch``: ``*`` also crosses dots), e.g. ``trf_blocks.*.att.*``,
    ``*.ff.*``, ``out_head``. A pattern that matches none is an error naming the candidates.
    """
    candidates = [n for n, m in model.named_modules() if n and accept(m)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = ", ".join(candidates[:8]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 8 else "")
            raise FinetuneError(
                f"{where}: the pattern {pattern!r} matches no {what} of the model. Patterns are shell-style over "
                f"module names (`*` also matches dots), e.g. \"trf_blocks.*.att.*\" (attention projections), "
                f"\"trf_blocks.*.ff.*\" (feed-forward) or \"out_head\"; the model's are: {shown}.")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def plain_model(model: nn.Module, *, copy_model: bool = True) -> nn.Module:
    """The model with its adapter merged into the base weights and removed (a plain GPT, the base's
    state-dict keys); the model itself when it has no adapter. ``copy_model=False`` changes it in place."""
    model = _unwrap(model)
    adapter = model.__dict__.get(ADAPTER_ATTR)
    if adapter is None:
        return model
    if copy_model:
        model = copy.deepcopy(model)
    adapter.unload(model)
    del model.__dict__[ADAPTER_ATTR]
    return model
