"""The interface the trainer drives a task through."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Task"]


class Task:
    """One task's data, head, loss and evaluation; the trainer calls these hooks in this order.

    A batch is one integer tensor (B, W) so the trainer can cut it into micro-batches and move it
    as it does token windows; how its columns are laid out is the task's business.
    """

    name = "task"

    def __init__(self, spec):
        self.spec = spec

    def load_data(self, spec, *, tokenizer_state: dict[str, Any] | None, write: Callable[[str], None]) -> Any:
        """Read, tokenize and split the data; may fill in fields of ``spec`` a run must store
        (e.g. inferred classes). The result has ``tokenizer``, ``source``, and ``split`` with
        ``train`` (an array of rows, one per example), ``length`` and ``describe()``."""
        raise NotImplementedError

    def attach_head(self, model: nn.Module) -> nn.Module:
        """Replace or add the task's head on a built language model; deterministic from the spec's seed."""
        return model

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """The token ids the model reads from a batch."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of a (micro-)batch, in fp32."""
        raise NotImplementedError

    def baseline_loss(self) -> float:
        """The loss of a model that ignores its input (reported as the data's entropy)."""
        return float("nan")

    def describe_baseline(self, value: float) -> str:
        """The run's line about :meth:`baseline_loss`."""
        return f"class entropy of the training split: {value:.3f} nats (the loss of a model that ignores the text)"

    def evaluate(self, model: nn.Module, split: str, **kwargs) -> tuple[float, dict[str, float]]:
        """(loss, metrics named ``split/...``) over a whole split."""
        raise NotImplementedError

    def sample_prompt(self) -> str | None:
        """The text the trainer's periodic samples continue (up to the end-of-text id), or None: the
        task's model writes no text."""
        return None

    def finish(self, trainer) -> None:
        """At the end of a completed run: final metrics on every split, printed and logged."""
