"""Validation loss over a fixed set of windows, shared by the training loop and ``minigpt eval``."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import TokenCorpus
from ..base.device import autocast
from ..base.distributed import DistEnv

__all__ = ["eval_windows", "evaluate", "lm_loss", "unigram_entropy"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits (B, T, V), targets (B, T); the loss in fp32 whatever the autocast dtype
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def eval_windows(n_windows: int, wanted: int, world_size: int = 1) -> np.ndarray:
    """Indices of ``wanted`` windows spread evenly over all of them; a multiple of world_size."""
    k = min(wanted, n_windows)
    k = max(world_size, k - k % world_size)
    return np.unique(np.linspace(0, n_windows - 1, k).round().astype(np.int64))[:k]


@torch.no_grad()
def evaluate(model: nn.Module, corpus: TokenCorpus, starts: np.ndarray, length: int, *, micro_batch: int,
             device: torch.device, precision: str = "fp32", env: DistEnv | None = None,
             progress: Callable[[int], None] | None = None) -> float:
    """Mean next-token loss (nats) over the windows at ``starts``, split evenly over processes.

    ``progress`` is called with the number of windows each forward pass evaluated (a progress bar).

    Every process runs the same number of forward passes (FSDP needs all of them in each).
    """
    env = env or DistEnv()
    mine = starts[env.rank::env.world_size]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i in range(0, len(mine), micro_batch):
            batch = torch.from_numpy(corpus.windows(mine[i:i + micro_batch], length)).to(device)
            with autocast(device, precision):
                logits = model(batch[:, :-1])
            total += lm_loss(logits, batch[:, 1:], reduction="sum").double()
            count += batch[:, 1:].numel()
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    total, count = env.sum(total), env.sum(count)
    return float(total / count) if count > 0 else math.nan


def unigram_entropy(parts: list[np.ndarray], n_vocab: int, max_tokens: int = 100_000_000) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    counts = np.zeros(n_vocab, dtype=np.int64)
    seen = 0
    for part in parts:
        take = part[: max_tokens - seen]
        counts += np.bincount(np.asarray(take), minlength=n_vocab)[:n_vocab]
        seen += len(take)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
