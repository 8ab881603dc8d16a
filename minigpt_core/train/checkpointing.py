"""A run's checkpoints from the loop's side: what a save gathers and writes, what a resume restores.

The files themselves (their layout, hashes, atomic writes, pruning) are state.py's business.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..assembly import INIT_FROM_KEY
from ..base.disk import NO_SPACE, disk_full_error
from ..base.distributed import DistEnv
from ..base.errors import CheckpointError
from ..checkpoints.state import CHECKPOINTS_DIR, LoadedState, begin_checkpoint, save_checkpoint, write_shard
from ..finetune import META_KEY, trainable_state
from ..spec import ExperimentSpec
from .meta_init import local_optimizer_state, local_shards, shard_layout, shard_optimizer_state
from .optim import lr_at
from .step import Engine

__all__ = ["RunProgress", "save_run", "restore_run"]


@dataclass
class RunProgress:
    """Where a run is: what trainer.json keeps beside the model, optimizer and data position."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    best_step: int | None = None
    last_val: float | None = None
    last_sample: str | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)  # a task's metrics of the last evaluation
    wandb_run_id: str | None = None
    entropy: float | None = None  # the data's baseline loss (unigram entropy for a language model)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _write_shards(root: Path, step: int, engine: Engine, env: DistEnv) -> tuple[Path, dict[str, Any]]:
    """Every rank writes its own shard files into the checkpoint directory rank 0 begins (nothing
    is gathered); returns that directory and the record save_checkpoint completes it with."""
    try:  # a failure on any rank is raised on every rank (none waits for the others forever)
        tmp = begin_checkpoint(root, step) if env.is_main else None
    except OSError as exc:
        tmp = exc
    tmp = env.broadcast(tmp)
    if isinstance(tmp, OSError):
        raise disk_full_error(root, 0, tmp) if tmp.errno in NO_SPACE else tmp
    local = local_shards(engine.model)
    try:
        files, rest = write_shard(tmp, env.rank, env.world_size, local,
                                  local_optimizer_state(engine.model, engine.optimizer))
    except OSError as exc:
        files, rest = exc, None
    parts = env.gather(files)
    failed = next((p for p in parts if isinstance(p, OSError)), None)
    if failed is not None:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        need = 3 * sum(t.numel() * t.element_size() for t in local.values())  # weights + AdamW moments
        raise disk_full_error(root, need, failed) if failed.errno in NO_SPACE else failed
    shards = {"files": {k: v for part in parts for k, v in part.items()},
              "optimizer": rest, "world_size": env.world_size, "layout": shard_layout(engine.model)}
    return tmp, shards


def save_run(run_dir: Path, spec: ExperimentSpec, engine: Engine, progress: RunProgress, tokenizer: Any,
             total_steps: int, env: DistEnv, device: torch.device) -> Path | None:
    """A checkpoint at ``progress.step`` (every process takes part; rank 0 returns its path)."""
    # Imported here: torch.distributed.checkpoint pulls in DTensor and sympy (seconds), which every
    # command that imports the trainer without saving would pay for.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # FSDP: every rank takes part in gathering the full tensors; rank 0 writes. Sharded: each
    # rank writes its own shards into the directory rank 0 made, and rank 0 completes it.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if engine.fsdp else StateDictOptions()
    shards = tmp = None
    if engine.sharded:
        tmp, shards = _write_shards(run_dir / CHECKPOINTS_DIR, progress.step, engine, env)
        model_state, optim_state = None, {"state": {}}
    else:
        model_state = get_model_state_dict(engine.model, options=options) if engine.fsdp else None
        optim_state = get_optimizer_state_dict(engine.model, engine.optimizer, options=options)
    rng = env.gather(_rng_state(device))
    path = None
    if env.is_main:
        p, t = progress, spec.train
        trainer = {
            "tokens": p.tokens, "sampler": engine.sampler.state_dict(), "val_loss": p.last_val,
            "best_val_loss": p.best_val, "best_step": p.best_step, "wandb_run_id": p.wandb_run_id,
            "world_size": env.world_size, "scaler": engine.scaler.state_dict(),
            "unigram_entropy": p.entropy, "total_steps": total_steps,
            "schedule": {"lr": lr_at(max(p.step - 1, 0), t, total_steps),
                         "kind": t.schedule, "warmup_steps": t.warmup_steps},
        }
        meta = {"tokenizer": tokenizer.state(), "step": p.step, "val_loss": p.last_val}
        if engine.init_from:
            meta[INIT_FROM_KEY] = engine.init_from
        f = engine.finetune
        if f is not None:
            meta[META_KEY] = {"base": f.base if f.partial else None, "total": f.total, "trainable": f.trainable,
                              "adapter": getattr(f.adapter, "name", None)}
            if f.partial:  # a frozen base named by the checkpoint: only the trainable tensors are saved
                model_state = trainable_state(engine.model, model_state)
        path = save_checkpoint(
            run_dir / CHECKPOINTS_DIR, p.step, model=engine.model, spec=spec, model_state=model_state,
            optimizer_state=optim_state, rng_states=rng, trainer=trainer, meta=meta,
            keep_last=t.keep_last, best_step=p.best_step if t.keep_best else None, tmp=tmp, shards=shards)
    env.barrier()
    return path


def restore_run(loaded: LoadedState, engine: Engine, progress: RunProgress, *, branch: bool, seed: int,
                env: DistEnv, device: torch.device, write: Callable[[str], None]) -> None:
    """Put a resumed run where its checkpoint left it: counters, data position, optimizer, scaler, RNG."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # heavy: see save_run

    tr = loaded.trainer
    progress.step, progress.tokens = tr["step"], tr["tokens"]
    progress.best_val, progress.best_step = tr.get("best_val_loss"), tr.get("best_step")
    progress.last_val, progress.wandb_run_id, progress.entropy = tr.get("val_loss"), tr.get("wandb_run_id"), \
        tr.get("unigram_entropy")
    if branch:
        progress.wandb_run_id = None  # a branch is a W&B run of its own: its steps would overwrite the parent's
    try:
        engine.sampler.load_state_dict(tr["sampler"])
        osd = loaded.optimizer_state
        if loaded.trainer.get("sharded"):  # local shards (the model was built on meta to match)
            osd = shard_optimizer_state(engine.model, osd)
        set_optimizer_state_dict(engine.model, engine.optimizer, osd,
                                 options=StateDictOptions(full_state_dict=engine.fsdp and osd is
                                                          loaded.optimizer_state))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{loaded.directory} does not fit this run: {exc}. Resume with the "
                              f"experiment file (and --set overrides) the checkpoint was made with.") from None
    if tr.get("scaler"):
        engine.scaler.load_state_dict(tr["scaler"])
    mine = loaded.rng_states.get(env.rank)
    if tr.get("world_size") == env.world_size and mine is not None:
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], device)
    else:
        write(f"note: the checkpoint was written by {tr.get('world_size')} process(es), this run has "
              f"{env.world_size}; dropout random streams are re-seeded (the resume is not bitwise)")
        torch.manual_seed(seed + 7919 * progress.step + env.rank)
