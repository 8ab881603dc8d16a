"""Language modelling, the default task: next-token loss on windows of a token corpus."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data import TrainingData, load_training_data
from ..base.distributed import DistEnv
from .evaluate import eval_windows, evaluate, unigram_entropy
from .base import Task

__all__ = ["LMTask"]


class LMTask(Task):
    name = "lm"
    reads_data_first = False  # the model is the spec's (or init_from's); the data comes after it

    def load_data(self, spec, *, tokenizer_state: dict[str, Any] | None = None,
                  write: Callable[[str], None] = print, env: DistEnv | None = None,
                  progress: bool = False) -> TrainingData:
        self.spec = spec
        env = env or DistEnv()
        self.data = load_training_data(spec, tokenizer_state=tokenizer_state, progress=progress and env.is_main,
                                       writer=env.local_rank == 0, barrier=env.barrier)
        return self.data

    def train_rows(self, idx: np.ndarray) -> np.ndarray:
        split = self.data.split
        return split.corpus.windows(split.train[idx], split.length)  # (B_local, T + 1)

    def training_loss(self, forward: nn.Module, batch: torch.Tensor, amp: AbstractContextManager) -> torch.Tensor:
        with amp:  # the model's forward takes the loss: head + cross-entropy in chunks
            return forward(batch[:, :-1], targets=batch[:, 1:], loss_chunk=self.spec.train.loss_chunk)

    def baseline_loss(self) -> float:
        return unigram_entropy(self.data.shards.parts, self.data.tokenizer.n_vocab)

    def describe_baseline(self, value: float) -> str:
        return f"unigram entropy of the data: {value:.3f} nats/token (the loss of a model that ignores context)"

    def evaluate(self, model: nn.Module, split: str, *, micro_batch: int, device: torch.device,
                 precision: str = "fp32", env: DistEnv | None = None) -> tuple[float, dict[str, float]]:
        """The loss over ``train.eval_batches`` global batches of validation windows, spread evenly."""
        t, data = self.spec.train, self.data.split
        idx = eval_windows(len(data.val), t.eval_batches * t.batch_size, env.world_size if env else 1)
        return evaluate(model, data.corpus, data.val[idx], data.length, micro_batch=micro_batch, device=device,
                        precision=precision, env=env), {}

    def sample_prompt(self) -> str | None:
        return self.spec.train.sample_prompt
