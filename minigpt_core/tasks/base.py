"""The interface the trainer drives a task through (a strategy: the loop stays one for every task)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ["Task", "FinalReport"]


@dataclass
class FinalReport:
    """A task's results at the end of a completed run: metrics to log, the fields of its event in
    metrics.jsonl (named after the task) and the text the run prints."""

    metrics: dict[str, float]
    fields: dict[str, Any]
    text: str


class Task:
    """One task's data, head, loss and evaluation; the trainer calls these hooks in this order.

    A task sees only what it is given: the spec, the model to run, and the micro-batch size,
    device, precision and processes of an evaluation; never the trainer.

    A batch is one integer tensor (B, W) so the trainer can cut it into micro-batches and move it
    as it does token windows; how its columns are laid out is the task's business.
    """

    name = "task"
    # Whether the loss is a mean over tokens, so that exp(loss) is a perplexity worth reporting
    # (a classifier's loss is over classes: its exp means nothing).
    per_token_loss = True
    # Whether a new run reads its data before the model is built (the data decides the head:
    # a classifier's classes), rather than after.
    reads_data_first = True

    def __init__(self, spec):
        self.spec = spec
        self.data: Any = None  # what load_data read

    def load_data(self, spec, *, tokenizer_state: dict[str, Any] | None = None,
                  write: Callable[[str], None] = print, env=None, progress: bool = False) -> Any:
        """Read, tokenize and split the data; may fill in fields of ``spec`` a run must store
        (e.g. inferred classes). The result has ``tokenizer``, ``source``, and ``split`` with
        ``train`` (an array of rows, one per example), ``length`` and ``describe()``."""
        raise NotImplementedError

    def attach_head(self, model: nn.Module) -> nn.Module:
        """Replace or add the task's head on a built language model; deterministic from the spec's seed."""
        return model

    def train_rows(self, idx: np.ndarray) -> np.ndarray:
        """The training split's rows (B, W) at ``idx`` (the sampler's indices)."""
        return self.data.split.train[idx]

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """The token ids the model reads from a batch."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of a (micro-)batch, in fp32."""
        raise NotImplementedError

    def training_loss(self, forward: nn.Module, batch: torch.Tensor, amp: AbstractContextManager) -> torch.Tensor:
        """The loss of one micro-batch through the training forward (``amp``: its autocast)."""
        with amp:
            logits = forward(self.inputs(batch))  # (B, T, V)
        return self.loss(logits, batch)

    def baseline_loss(self) -> float:
        """The loss of a model that ignores its input (reported as the data's entropy)."""
        return float("nan")

    def describe_baseline(self, value: float) -> str:
        """The run's line about :meth:`baseline_loss`."""
        return f"class entropy of the training split: {value:.3f} nats (the loss of a model that ignores the text)"

    def evaluate(self, model: nn.Module, split: str, *, micro_batch: int, device: torch.device,
                 precision: str = "fp32", env=None) -> tuple[float, dict[str, float]]:
        """(loss, metrics named ``split/...``) over a whole split, shared out over ``env``'s processes."""
        raise NotImplementedError

    def sample_prompt(self) -> str | None:
        """The text the trainer's periodic samples continue (up to :meth:`sample_eos`), or None: the
        task's model writes no text."""
        return None

    def sample_eos(self) -> int | None:
        """The id a sample ends at (None: it runs to its length)."""
        return None

    def finish(self, model: nn.Module, *, micro_batch: int, device: torch.device, precision: str = "fp32",
               env=None, progress: bool = False) -> FinalReport | None:
        """At the end of a completed run (on every process): final metrics on every split
        (``progress``: show a progress bar, where stderr is a terminal)."""
        return None
