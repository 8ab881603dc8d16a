"""The training metrics logged every ``train.log_every`` steps: loss, speed, MFU, memory, and the
torch.compile time (the first step compiles; it is timed apart from the speed)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from .compile import compiled_graphs
from ..base.distributed import DistEnv
from .flops import mfu

__all__ = ["Speedometer", "peak_memory_mb", "train_metrics"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Speedometer:
    """Tokens per second over the steps since the last log, leaving out the time the loop spent
    evaluating, sampling and saving (``pause``/``resume``) and the compiling first step."""

    def __init__(self, compiling: bool, flops_per_token: float, peak_flops: float):
        self.flops_per_token = flops_per_token  # for MFU
        self.peak_flops = peak_flops  # of one process
        self.compiling = compiling  # this process's next step compiles the model
        self.compile_seconds: float | None = None  # the first step's time when compiled
        self.compile_step: int | None = None
        self._graphs_after_warmup = 0
        self.restart()

    def restart(self) -> None:
        self._start, self._tokens, self._paused = time.perf_counter(), 0, 0.0

    def stepped(self, tokens: int, step: int, loss: torch.Tensor) -> float | None:
        """After a step: its tokens count, unless it compiled: then its time (returned) is the compile time."""
        if not self.compiling:
            self._tokens += tokens
            return None
        self.compiling = False
        float(loss)  # wait for the device, so the time is the step's
        self.compile_seconds = time.perf_counter() - self._start
        self.compile_step = step
        self._graphs_after_warmup = compiled_graphs()
        return self.compile_seconds

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self._start - self._paused
        return self._tokens / max(elapsed, 1e-9)

    @property
    def steady(self) -> bool:
        """False while the window holds only the compiling step: no steady speed yet."""
        return bool(self._tokens)

    def pause(self) -> float:
        return time.perf_counter()

    def resume(self, since: float) -> None:
        self._paused += time.perf_counter() - since

    def recompiles(self) -> int:
        return compiled_graphs() - self._graphs_after_warmup


def train_metrics(stats: dict[str, Any], loss: float, tok_s: float, steady: bool, *, tokens: int, epoch: int,
                  flops_per_token: float, peak_flops: float, device: torch.device, env: DistEnv) -> dict[str, float]:
    """train/* of a logged step (``loss``: the processes' mean, already read)."""
    metrics = {"train/loss": loss, "train/lr": stats["lr"], "train/grad_norm": float(stats["grad_norm"]),
               "train/tokens_per_s": tok_s, "train/tokens": tokens, "train/epoch": epoch,
               "train/mfu": mfu(flops_per_token, tok_s, peak_flops * env.world_size),
               "train/peak_memory_mb": peak_memory_mb(device)}
    if not steady:  # only the compiling step since the last log
        del metrics["train/tokens_per_s"], metrics["train/mfu"]
    return metrics
