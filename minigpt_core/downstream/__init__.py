"""Downstream evaluation: minigpt checkpoints through EleutherAI's lm-evaluation-harness (``lm_eval``).

- ``adapter``: the lm_eval model type ``minigpt`` (:class:`~minigpt_core.downstream.adapter.MinigptLM`);
- ``tasks``: the lm_eval tasks that ship with minigpt (``lm_eval_tasks/``) and resolving task names;
- ``build_tasks``: how the shipped tasks' data is built (deterministic, offline);
- ``run``: ``minigpt evaluate`` (lm_eval's ``simple_evaluate``, ``RUN/eval/<task>.json``, W&B).

Importing this package imports no lm_eval: :func:`register` adds ``minigpt`` to lm_eval's model
registry (a lazy entry: the adapter module loads when lm_eval asks for the model).
"""

from __future__ import annotations

__all__ = ["register", "MODEL_NAME"]

MODEL_NAME = "minigpt"
_TARGET = "minigpt_core.downstream.adapter:MinigptLM"


def register() -> None:
    """Make ``minigpt`` an lm_eval model type in this process (``simple_evaluate(model="minigpt", ...)``)."""
    import lm_eval.models  # noqa: F401  lm_eval's own table first (get_model reads it only into an empty registry)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_TARGET)
