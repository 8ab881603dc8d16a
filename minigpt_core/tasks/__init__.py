"""Training tasks besides next-token prediction: what the data is, the head, the loss, the metrics.

The trainer stays one loop for every task: each task, language modelling (lm.py, the default)
included, is a :class:`Task` strategy that the trainer asks, at a few fixed points, for its data,
its head, the loss of a micro-batch, its evaluation and its final report, passing it only what
that needs (the spec, the model, micro-batch size, device, precision and processes), never the
trainer. The two fine-tuning tasks (classification.py, instruction.py) share supervised.py. A new
task is a ``Task`` subclass added to :data:`TASK_CLASSES` plus its section in the spec.

The tasks layer. May import checkpoints, data, model, spec and base; never the trainer, which drives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base.errors import MinigptError
from ..model.build import build_model
from .base import FinalReport, Task

if TYPE_CHECKING:
    from torch import nn

    from ..spec import ExperimentSpec

__all__ = ["Task", "FinalReport", "get_task", "training_task", "build_task_model", "require_lm", "check_init_from_task", "TASK_CLASSES",
           "TOKEN_TASKS"]


def _classification():
    from .classification import ClassificationTask

    return ClassificationTask


def _instruction():
    from .instruction import InstructionTask

    return InstructionTask


def _lm():
    from .lm import LMTask

    return LMTask


# Loaded when first used: each task module pulls in what its data and evaluation need.
TASK_CLASSES = {"lm": _lm, "classification": _classification, "instruction": _instruction}

# Tasks whose model still predicts the next token (its output head is the language model's).
TOKEN_TASKS = ("lm", "instruction")


def get_task(spec: "ExperimentSpec") -> Task | None:
    """The spec's task, or None for a language model (the trainer's own code path)."""
    if spec.task == "lm":
        return None
    return TASK_CLASSES[spec.task]()(spec)


def training_task(spec: "ExperimentSpec") -> Task:
    """The strategy a training run of ``spec`` drives (a language model's included)."""
    return TASK_CLASSES[spec.task]()(spec)


def build_task_model(spec: "ExperimentSpec", **kwargs) -> "nn.Module":
    """``build_model`` plus the task's head: what a checkpoint of ``spec`` holds weights for."""
    model = build_model(spec, **kwargs)
    task = get_task(spec)
    return model if task is None else task.attach_head(model)


def require_lm(spec: "ExperimentSpec", where: object, what: str) -> None:
    """Refuse a fine-tuned (non-lm) checkpoint where a language model is needed (sampling, export, init_from)."""
    if spec.task not in TOKEN_TASKS:
        raise MinigptError(
            f"{where} is a {spec.task} model (task = {spec.task!r}): its head predicts classes, not tokens, "
            f"so it cannot be used for {what}. Use `minigpt classify` with it, or the language model it was "
            f"fine-tuned from" + (f" ({spec.init_from})." if spec.init_from else "."))


def check_init_from_task(loaded: "ExperimentSpec", spec: "ExperimentSpec", where: object) -> None:
    """Whether a run of ``spec`` can start from a checkpoint of ``loaded``: a model that predicts tokens
    (lm, instruction) always; a classifier only for the same task, with the same classes (its head is
    kept and trains on)."""
    if loaded.task in TOKEN_TASKS:
        return
    origin = f" ({loaded.init_from})" if loaded.init_from else ""
    if spec.task != loaded.task:
        raise MinigptError(
            f"init_from = {str(where)!r} is a {loaded.task} model (task = {loaded.task!r}), but this experiment's "
            f"task is {spec.task!r}: a run starts from a language model, or from a model of its own task to go on "
            f"fine-tuning it. Start from the language model it was fine-tuned from{origin}, or set task = "
            f"{loaded.task!r}.")
    if loaded.task == "classification":
        theirs, mine = list(loaded.classification.classes or []), spec.classification.classes
        if mine is not None and list(mine) != theirs:
            raise MinigptError(
                f"init_from = {str(where)!r} is a classifier of the classes {theirs}, but classification.classes "
                f"is {list(mine)}: its head has one output per class, in this order. To go on fine-tuning it, "
                f"declare the same classes in the same order (or leave classes out: they are then the "
                f"checkpoint's); to train a new head for other classes, start from the language model it was "
                f"fine-tuned from{origin}.")
