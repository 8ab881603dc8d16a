"""One optimizer step, apart from the loop around it (Lightning's ``training_step``).

A global batch of ``train.batch_size`` sequences is split into ``micro_batch_size`` pieces per
process; gradients of the pieces are accumulated (without the all-reduce until the last one) and
the loss is their mean, so the same spec gives the same optimisation with 1, 2 or N processes.
What a micro-batch's loss is belongs to the task (tasks/): the step only asks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import BatchSampler
from ..base.errors import SpecError
from ..spec import TrainSpec
from ..base.device import autocast
from ..base.distributed import gradient_sync
from .divergence import DivergenceWatch
from .optim import lr_at

__all__ = ["Batching", "Engine", "plan_batches", "train_step"]


@dataclass
class Batching:
    """How a step's global batch is cut up, and how many steps the run has."""

    micro_batch: int  # sequences per forward pass on one process
    accum: int  # forward passes per process and step
    seq_len: int  # tokens a sequence trains on
    tokens_per_step: int
    total_steps: int


def plan_batches(t: TrainSpec, seq_len: int, world: int) -> Batching:
    micro = t.micro_batch_size or t.batch_size // world
    if t.batch_size % (micro * world):
        raise SpecError([("train.batch_size", f"{t.batch_size} sequences cannot be split into micro-batches "
                          f"of {micro} on {world} process(es); make it a multiple of "
                          f"{micro * world} or change train.micro_batch_size")])
    tokens_per_step = t.batch_size * seq_len
    budgets = [t.max_steps or math.inf, math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else math.inf]
    return Batching(micro, t.batch_size // (micro * world), seq_len, tokens_per_step, int(min(budgets)))


@dataclass
class Engine:
    """The model in its three forms and what trains it."""

    model: nn.Module  # the plain GPT: checkpoints, evaluation, sampling
    wrapped: nn.Module  # DDP / FSDP2 around it (the model itself in one process)
    forward: nn.Module  # what the step calls: ``wrapped``, compiled with train.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler  # this process's share of each global batch
    fsdp: bool  # several processes with FSDP2: every rank takes part in each forward
    sharded: bool  # FSDP2 with train.sharded_checkpoint: each rank saves its own shard
    n_params: int
    finetune: Any = None  # what [finetune] froze and adapted (minigpt_core.finetune), or None
    init_from: dict[str, Any] | None = None  # what init_from resolved to (assembly.init_from_record), or None

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation and sampling run (uncompiled; under FSDP the wrapped model)."""
        return self.wrapped if self.fsdp else self.model


def train_step(engine: Engine, task: Any, batching: Batching, t: TrainSpec, device: torch.device,
               watch: DivergenceWatch, step: int) -> dict[str, Any]:
    """Step ``step`` (0-based): learning rate, batch, accumulated backward passes, clipping, update.
    Returns the loss (a device tensor: reading it waits), the learning rate and the gradient norm."""
    lr = lr_at(step, t, batching.total_steps)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    rows = task.train_rows(engine.sampler.next_batch())  # this rank's rows of the global batch
    batch = torch.from_numpy(rows).to(device, non_blocking=True)
    loss_sum = torch.zeros((), device=device)
    aux_sum = None
    micro, accum = batching.micro_batch, batching.accum
    for i in range(accum):
        piece = batch[i * micro:(i + 1) * micro]
        with gradient_sync(engine.wrapped, t.strategy, sync=i == accum - 1):
            loss = task.training_loss(engine.forward, piece, autocast(device, t.precision))
            aux = engine.model.aux_loss()  # e.g. a mixture-of-experts balance term, else None
            total = loss if aux is None else loss + aux
            engine.scaler.scale(total / accum).backward()
        loss_sum += loss.detach() / accum
        if aux is not None:
            aux_sum = (aux_sum if aux_sum is not None else 0) + aux.detach() / accum
    engine.scaler.unscale_(engine.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(engine.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    watch.record(step, loss_sum, norm, engine.scaler.is_enabled())
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    engine.optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss_sum, "lr": lr, "grad_norm": norm}
    if aux_sum is not None:
        out["aux_loss"] = aux_sum
    return out
