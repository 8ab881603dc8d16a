"""Several processes (torchrun): process group, model wrapping (DDP or FSDP2), collectives.

``torchrun --nproc_per_node N -m minigpt train FILE`` sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain ``minigpt train`` is the one-process case of the same code, where every collective is a
no-op.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import MinigptError

__all__ = ["DistEnv", "init_distributed", "wrap_model", "gradient_sync", "shutdown"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # started by torchrun (even with one process): a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) -------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over processes."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is True on any (e.g. one process got Ctrl-C)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every process (only for our own small values)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's value, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device_type: str | None = None) -> DistEnv:
    """Join the torchrun process group if this process was started by torchrun.

    ``torchrun --nproc_per_node 1`` counts: the model is wrapped (DDP or FSDP2) as with more.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise MinigptError("This PyTorch build has no torch.distributed; train with one process.")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistEnv(rank, world_size, local_rank, enabled=True)


def wrap_model(model: nn.Module, strategy: str, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with every transformer block and then the root sharded."""
    if not env.enabled:
        return model
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise MinigptError(
                f"train.strategy = \"fsdp\" needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.6); "
                f"this is torch {torch.__version__}. Upgrade PyTorch or use train.strategy = \"ddp\"."
            ) from None
        for block in model.trf_blocks:
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and head: the root's own parameters
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: nn.Module, strategy: str, sync: bool):
    """Context of one micro-batch: gradient accumulation skips the all-reduce until the last one."""
    if sync:
        if strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: keep unsharded gradients locally
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _release_dtensor_caches() -> None:
    """FSDP2's DTensors leave their device mesh, and through it the process group, in torch's
    global DTensor caches (sharding propagation, redistribution plans, mesh topology); cleared
    best-effort (private torch names that may move between versions)."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return
    clears = [("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
              ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
              ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
              ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear")]
    for module, name in clears:
        try:
            obj = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
            obj()
        except Exception:  # noqa: BLE001 - a torch without this cache has nothing to clear
            pass


def shutdown(barrier: bool = False) -> None:
    """Destroy the process group and with it its threads (gloo: a worker pool and a socket loop).

    The group dies only with its last reference: the wrapped model (FSDP2, DDP) and torch's
    DTensor caches hold it, and left alone its threads run on into interpreter exit, where a
    rank could abort with "terminate called without an active exception". The caller drops its
    model first; here the caches and the reference cycles go, so destroying the group joins its
    threads. ``barrier`` (a clean finish, where every rank gets here): no rank closes its
    connections while a peer may still use them.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        _release_dtensor_caches()
        gc.collect()
        dist.destroy_process_group()
