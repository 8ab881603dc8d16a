"""Divergence: a run whose loss, gradient norm, weights or validation loss went NaN or infinite stops
with one message that says where, what was saved and what to change; nothing non-finite is saved.

The step records the first non-finite step on the device (no synchronisation); the loop checks it
only where it waits for the device anyway (logging, evaluation, saving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from ..spec import TrainSpec
from ..base.distributed import DistEnv
from ..checkpoints.state import list_checkpoints

__all__ = ["Divergence", "DivergenceWatch"]


@dataclass
class Divergence:
    at: int  # the first step that went non-finite
    what: str  # what did: "the training loss", "the weights"...


class DivergenceWatch:
    """The first non-finite step of a run, and the message it stops with."""

    def __init__(self, device: torch.device, env: DistEnv):
        self._env = env
        self._device = device
        # 2 * (first step with a non-finite loss or grad norm) + (1 if the loss itself), 0 while finite
        self._code = torch.zeros((), dtype=torch.int64, device=device)
        self.last_finite: tuple[int, float] | None = None  # (step, training loss) last logged finite
        self.diverged = False  # set when the run stopped for it: the diverged event is the run's last word

    def record(self, step: int, loss: torch.Tensor, norm: torch.Tensor, scaler_enabled: bool) -> None:
        """After the backward pass of step ``step`` (0-based): remember it if it went non-finite."""
        # fp16: an inf gradient is the scaler's business (it skips the step); only the loss counts.
        loss_ok = torch.isfinite(loss)
        ok = loss_ok if scaler_enabled else loss_ok & torch.isfinite(norm)
        code = 2 * (step + 1) + (~loss_ok).long()
        self._code = torch.where((self._code == 0) & ~ok, code, self._code)

    def logged(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.last_finite = (step, loss)

    def check(self, step: int, model: nn.Module, *, metrics: dict[str, float] | None = None,
              val_loss: float | None = None) -> Divergence | None:
        """What went non-finite, if anything (on every process alike). Without
        ``metrics`` and ``val_loss`` (before a save) the weights themselves are checked too."""
        code = int(self._code.item())  # waits for the device: called only where metrics/saves do anyway
        weights_bad = False
        if code == 0 and val_loss is None and metrics is None:  # before a save: the weights themselves
            local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
            weights_bad = not bool(torch.stack([torch.isfinite(t).all() for t in local]).all())
        val_bad = val_loss is not None and not math.isfinite(val_loss)
        if not self._env.any(code != 0 or weights_bad or val_bad, self._device):
            return None
        if code:
            at, what = code // 2, "the training loss" if code % 2 else "the gradient norm"
        elif val_bad:
            at, what = step, f"the validation loss ({val_loss})"
        else:
            at, what = step, "the weights" if weights_bad else "the loss on another process"
        return Divergence(at, what)

    def message(self, found: Divergence, t: TrainSpec, checkpoints: Path) -> str:
        """What the run stops with: where, what was saved, what to change."""
        last = (f"the last finite training loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
                if self.last_finite else "no finite training loss was logged")
        saved = list_checkpoints(checkpoints)
        kept = (f"Nothing was saved after the divergence: the latest checkpoint {saved[-1][1]} holds finite weights; "
                f"a resume keeps the run's learning rate, so to go on from those weights with a lower one, start "
                f"a new run with `--set init_from={saved[-1][1]}`." if saved
                else "No checkpoint was saved.")
        return (
            f"Training diverged at step {found.at}: {found.what} became NaN or infinite ({last}). {kept} Lower "
            f"train.lr (now {t.lr:g}), raise train.warmup_steps (now {t.warmup_steps}), keep train.grad_clip "
            f"on (now {t.grad_clip:g})"
            + (", or train in bf16 (fp16 overflows more easily)." if t.precision == "fp16" else ".")
        )
