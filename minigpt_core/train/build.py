"""Set-up of a run: the model (new, from init_from, from a checkpoint, or on the meta device shard by
shard), the task's data, the batch geometry, the wrapped and compiled model, optimizer and sampler."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..base.version import __version__
from ..model.weights import load_model_state
from ..checkpoints.checkpoint import plugin_versions
from ..data import BatchSampler
from ..base.errors import CheckpointError, MinigptError
from ..finetune import apply_finetune, base_record, finetune_active
from ..assembly import restore_finetuned
from ..model.memory import check_model_fits
from ..assembly import INIT_FROM_KEY, load_init_from
from ..spec import ExperimentSpec
from ..model.summary import summarize
from ..tasks import Task, build_task_model
from ..base.device import make_grad_scaler
from ..base.distributed import DistEnv, wrap_model
from .meta_init import build_meta_model, load_local_shards, materialise
from .optim import build_optimizer
from ..checkpoints.state import LoadedState
from .step import Batching, Engine, plan_batches

__all__ = ["build_run", "meta_build", "run_config"]


def meta_build(spec: ExperimentSpec, loaded: LoadedState | None, env: DistEnv) -> bool:
    """Whether the model is built on the meta device and materialised shard by shard: a fresh
    run with train.meta_init, or a resume from a sharded checkpoint (under torchrun, FSDP2)."""
    sharded = loaded is not None and bool(loaded.trainer.get("sharded"))
    fsdp = env.enabled and spec.train.strategy == "fsdp"
    if sharded and not fsdp:
        raise CheckpointError(
            f"{loaded.directory} is a sharded checkpoint: resume it under torchrun with "
            f"train.strategy = \"fsdp\" and {loaded.trainer['sharded']['world_size']} processes.")
    t = spec.train
    if not fsdp:
        return False
    if (sharded or t.meta_init or t.sharded_checkpoint) and (spec.task != "lm" or finetune_active(spec)):
        raise MinigptError(
            "train.meta_init and train.sharded_checkpoint work on a language model built from its spec; this "
            "run fine-tunes ([finetune]) or trains a task head. Drop train.meta_init and "
            "train.sharded_checkpoint for it (FSDP then gathers the full state for each checkpoint).")
    if t.meta_init and spec.init_from is not None and loaded is None:
        raise MinigptError(
            f"train.meta_init initialises a new model shard by shard, but this run loads its weights from "
            f"init_from ({spec.init_from}). Drop train.meta_init, or init_from to train from scratch.")
    return sharded or t.meta_init and loaded is None


def build_run(spec: ExperimentSpec, task: Task, loaded: LoadedState | None, env: DistEnv, device: torch.device,
              write: Callable[[str], None], progress: bool) -> tuple[ExperimentSpec, Engine, Batching, float]:
    """(the spec as trained: init_from and the data may fill it in, the engine, the batch geometry,
    the model's training FLOPs per token); the task's data is read into ``task.data``."""
    # -- model ---------------------------------------------------------------------------
    meta = meta_build(spec, loaded, env)  # FSDP2: built on the meta device, each process fills its shard
    if (spec.init_from is None or loaded is not None) and not meta:  # refuse what cannot fit
        check_model_fits(spec.model, training=True, device=device)
    finetune = recorder = None
    # What init_from resolved to when the run began ("runs/quickstart" follows that experiment's latest
    # run): in the banner, the start event and every checkpoint's meta.json, kept across resumes.
    init_from: dict[str, Any] | None = loaded.meta.get(INIT_FROM_KEY) if loaded is not None else None
    if meta:
        model, recorder = build_meta_model(spec)
    elif loaded is None:
        init_from = {}
        model, spec = load_init_from(spec, record=init_from)
        if task.reads_data_first:  # the data decides the head (its classes), so it comes first
            task.load_data(spec, tokenizer_state=None, write=write)
            model = task.attach_head(model)
        if finetune_active(spec):  # after the head: a new head always trains
            finetune = apply_finetune(model, spec, base=base_record(spec.init_from))
    elif finetune_active(spec):
        model, finetune = restore_finetuned(spec, loaded.model_state, loaded.meta, str(loaded.directory))
    else:
        model = build_task_model(spec)
        load_model_state(model, loaded.model_state, str(loaded.directory))
    t = spec.train
    flops_per_token = summarize(model).flops_per_token
    n_params = sum(p.numel() for p in model.parameters())

    # -- data and batch geometry --------------------------------------------------------------
    if task.data is None:
        task.load_data(spec, tokenizer_state=loaded.meta.get("tokenizer") if loaded else None, write=write,
                       env=env, progress=progress)
    split = task.data.split
    batching = plan_batches(t, split.length - 1, env.world_size)

    # -- device, wrapping, optimizer -----------------------------------------------------------
    model = model if meta else model.to(device)  # the plain GPT: checkpoints, evaluation...
    if hasattr(model, "activation_checkpointing"):  # before wrapping: FSDP2 / DDP hook the blocks as they are
        model.activation_checkpointing = bool(t.activation_checkpointing)
    wrapped = wrap_model(model, t.strategy, env, device)
    fsdp = env.enabled and t.strategy == "fsdp"
    if meta:
        if loaded is not None:
            load_local_shards(model, loaded.model_state, device, str(loaded.directory))
        else:
            materialise(model, recorder, device)
    # Only the training forward is compiled: evaluation and sampling use the plain model (train/compile.py).
    forward = torch.compile(wrapped) if t.compile else wrapped
    engine = Engine(model, wrapped, forward, build_optimizer(model, t, device), make_grad_scaler(device, t.precision),
                    BatchSampler(len(split.train), t.batch_size, seed=spec.seed, shuffle=spec.data.shuffle,
                                 rank=env.rank, world_size=env.world_size),
                    fsdp=fsdp, sharded=fsdp and t.sharded_checkpoint, n_params=n_params, finetune=finetune,
                    init_from=init_from or None)
    return spec, engine, batching, flops_per_token


def run_config(spec: ExperimentSpec, engine: Engine, batching: Batching, data: Any, env: DistEnv,
               device: torch.device) -> dict[str, Any]:
    """The W&B run's config: the spec and what the run made of it."""
    return {**spec.model_dump(mode="json"), "plugins": plugin_versions(spec.registry),
            "minigpt_version": __version__, "torch_version": torch.__version__,
            "world_size": env.world_size, "device": str(device), "parameters": engine.n_params,
            "tokens_per_step": batching.tokens_per_step, "micro_batch_size": batching.micro_batch,
            "grad_accumulation": batching.accum, "data_source": data.source,
            "tokenizer_vocab": data.tokenizer.n_vocab, **(spec.wandb.config or {})}
