"""Training: the loop, optimizer and schedule, checkpoints and exact resume, loggers, several processes.

The training layer (beside inspection and viz). May import every layer below it: assembly,
fine-tuning, tasks, checkpoints, data, model, spec, base; never runs, ablation, testing or the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Imported on first use (PEP 562 __getattr__ below): `minigpt runs` reads train.lock and
# train.loggers, and importing the package must not import the trainer and torch for them.
# Static tools and import-linter read the imports here.
if TYPE_CHECKING:
    from ..base.device import DeviceError, autocast, select_device
    from ..base.distributed import DistEnv, init_distributed, wrap_model
    from ..tasks.evaluate import evaluate, lm_loss
    from .flops import measure_matmul_peak, mfu
    from .loggers import ConsoleLogger, JsonlLogger, Logger, MultiLogger, WandbLogger
    from .optim import build_optimizer, lr_at, param_groups
    from ..checkpoints.state import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
    from .trainer import TrainResult, Trainer, experiment_dir, train, unigram_entropy

_LAZY = {
    **dict.fromkeys(["DeviceError", "autocast", "select_device"], "..base.device"),
    **dict.fromkeys(["DistEnv", "init_distributed", "wrap_model"], "..base.distributed"),
    **dict.fromkeys(["evaluate", "lm_loss"], "..tasks.evaluate"),
    **dict.fromkeys(["measure_matmul_peak", "mfu"], ".flops"),
    **dict.fromkeys(["ConsoleLogger", "JsonlLogger", "Logger", "MultiLogger", "WandbLogger"], ".loggers"),
    **dict.fromkeys(["build_optimizer", "lr_at", "param_groups"], ".optim"),
    **dict.fromkeys(["list_checkpoints", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"],
                    "..checkpoints.state"),
    **dict.fromkeys(["TrainResult", "Trainer", "experiment_dir", "train", "unigram_entropy"], ".trainer"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DeviceError",
    "select_device",
    "autocast",
    "DistEnv",
    "init_distributed",
    "wrap_model",
    "evaluate",
    "lm_loss",
    "measure_matmul_peak",
    "mfu",
    "Logger",
    "JsonlLogger",
    "ConsoleLogger",
    "WandbLogger",
    "MultiLogger",
    "param_groups",
    "build_optimizer",
    "lr_at",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "Trainer",
    "TrainResult",
    "train",
    "experiment_dir",
    "unigram_entropy",
]
