"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..spec import TrainSpec

__all__ = ["param_groups", "build_optimizer", "lr_at"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and norm gains (1-D) do not, as in GPT-2 and nanoGPT."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainSpec, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel (one launch for all parameters) exists for CUDA and, in recent torch, CPU/MPS.
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps")
    kwargs = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    groups = param_groups(model, train.weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # e.g. an older torch without fused CPU AdamW
            pass
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, train: TrainSpec, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then decay to min_lr."""
    min_lr = train.lr / 10 if train.min_lr is None else train.min_lr
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    if train.schedule == "constant":
        return train.lr
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    if train.schedule == "linear":
        return train.lr + (min_lr - train.lr) * progress
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - min_lr)
