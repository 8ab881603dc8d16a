"""Downstream evaluation: minigpt checkpoints through EleutherAI's lm-evaluation-harness (``lm_eval``).

- ``adapter``: the lm_eval model type ``minigpt`` (:class:`~minigpt_core.downstream.adapter.MinigptLM`);
- ``tasks``: the lm_eval tasks that ship with minigpt (``lm_eval_tasks/``) and resolving task names;
- ``build_tasks``: how the shipped tasks' data is built (deterministic, offline);
- ``run``: ``minigpt evaluate`` (lm_eval's ``simple_evaluate``, ``RUN/eval/<task>.json``, W&B).

Importing this package imports no lm_eval: :func:`register` adds ``minigpt`` to lm_eval's model
registry, by importing the adapter (whose class lm_eval's ``register_model`` decorator registers).
"""

from __future__ import annotations

__all__ = ["register", "MODEL_NAME"]

MODEL_NAME = "minigpt"


def register() -> None:
    """Make ``minigpt`` an lm_eval model type in this process (``simple_evaluate(model="minigpt", ...)``)."""
    from . import adapter  # noqa: F401  lm_eval, torch: only when evaluating
