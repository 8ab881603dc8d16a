"""Training checkpoints: a model checkpoint directory plus everything needed to resume exactly.

    RUN/checkpoints/step_00000500/
        model.safetensors  spec.toml  meta.json    the model checkpoint (minigpt_core.checkpoints.checkpoint);
                                                   meta.json also holds the tokenizer state
        optimizer.safetensors                      optimizer tensors, keyed by parameter name
        rng.safetensors                            every process's torch RNG states
        trainer.json                               step, tokens, data position, schedule, best
                                                   validation loss, scaler, W&B run id, optimizer
                                                   hyper-parameters, sha256 of every other file
    With train.sharded_checkpoint (FSDP2), model.safetensors and optimizer.safetensors are replaced by
        model-shard-RRRRR-of-NNNNN.safetensors      process R's local shard of every tensor (its own
        optimizer-shard-RRRRR-of-NNNNN.safetensors  file, written by that process), and trainer.json's
                                                   "sharded" record: world size, full shapes
    RUN/checkpoints/latest -> step_00000500        symlinks (where the filesystem has them)
    RUN/checkpoints/best   -> step_00000400

A checkpoint is written into a temporary directory and renamed into place, so a crash (even
SIGKILL) leaves either the whole checkpoint or none of it; deleting renames to a hidden name first.
Only complete checkpoints (trainer.json and every file it hashes) are listed, resolved or linked.
Loading verifies the hashes and reads only safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    META_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    atomic_write_bytes,
    file_sha256,
    load_weights_file,
    read_meta,
    read_record,
    save_model,
    shard_file,
    verify_files,
)
from .layout import _OLD_DIR, _STEP_DIR, CHECKPOINTS_DIR, TRAINER_FILE, _complete, list_checkpoints
from ..base.disk import NO_SPACE as _NO_SPACE
from ..base.disk import disk_full_error
from ..base.errors import CheckpointError

__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINER_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "LoadedState",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "pick_checkpoint",
    "verify_checkpoint",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "begin_checkpoint",
    "shard_file",
    "write_shard",
]

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
_HASHED = (WEIGHTS_FILE, SPEC_FILE, META_FILE, OPTIMIZER_FILE, RNG_FILE)


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


# -- optimizer state <-> safetensors + JSON ------------------------------------------------
def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict into tensors ("name/key") and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, per_param in osd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    for name, values in rest["scalars"].items():
        state.setdefault(name, {}).update(values)
    # JSON turned tuples (betas) into lists; optimizers expect what they were given.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- writing -------------------------------------------------------------------------------
def begin_checkpoint(root: Path, step: int) -> Path:
    """The temporary directory that checkpoint ``step`` is written into (by several processes when
    sharded); :func:`save_checkpoint` with ``tmp=`` completes it, or removes it on failure."""
    root.mkdir(parents=True, exist_ok=True)
    _recover(root)
    return Path(tempfile.mkdtemp(prefix=f".{_step_name(step)}.", suffix=".tmp", dir=root))


def write_shard(tmp: Path, rank: int, world_size: int, model_state: dict[str, torch.Tensor],
                optimizer_state: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """This process's shard files in ``tmp``; returns {file: sha256} and the optimizer's JSON part."""
    from safetensors.torch import save

    tensors, rest = flatten_optimizer_state(optimizer_state)
    hashes = {}
    for kind, data in (("model", model_state), ("optimizer", tensors)):
        name = shard_file(kind, rank, world_size)
        atomic_write_bytes(tmp / name, save(data))
        hashes[name] = file_sha256(tmp / name)
    return hashes, rest


def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module, spec, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], rng_states: list[dict[str, torch.Tensor]],
                    trainer: dict[str, Any], meta: dict[str, Any], keep_last: int = 2,
                    best_step: int | None = None, tmp: Path | None = None,
                    shards: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, update latest/best, prune old ones.

    Sharded (``shards``: {"files": {name: sha256}, "optimizer": JSON part, "world_size", "layout"}):
    the processes already wrote their shard files into ``tmp`` (from :func:`begin_checkpoint`);
    ``model_state`` and ``optimizer_state`` are not used.
    """
    from safetensors.torch import save

    final = root / _step_name(step)
    if tmp is None:
        tmp = begin_checkpoint(root, step)
    try:
        save_model(model, spec, tmp, meta=meta, state=model_state, weights_file=shards is None)
        if shards is None:
            tensors, rest = flatten_optimizer_state(optimizer_state)
            atomic_write_bytes(tmp / OPTIMIZER_FILE, save(tensors))
        else:
            rest = shards["optimizer"]
        rng = {f"{kind}/{rank}": t.contiguous() for rank, states in enumerate(rng_states)
               for kind, t in states.items()}
        atomic_write_bytes(tmp / RNG_FILE, save(rng))
        hashed = _HASHED if shards is None else (SPEC_FILE, META_FILE, RNG_FILE)
        record = {**trainer, "step": step, "optimizer": rest,
                  "sha256": {**{name: file_sha256(tmp / name) for name in hashed}, **(shards or {}).get("files", {})}}
        if shards is not None:
            record["sharded"] = {"world_size": shards["world_size"], "layout": shards["layout"]}
        atomic_write_bytes(tmp / TRAINER_FILE, json.dumps(record, indent=1).encode("utf-8"))
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a scheduled save)
            # Killed between the two renames, only .old holds the step: listing reads it there and
            # recovery renames it back (never deletes it).
            old = final.with_name(f".{final.name}.old")
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            need = sum(t.numel() * t.element_size() for t in [
                *(model_state if model_state or shards else model.state_dict()).values(),
                *(v for per_param in optimizer_state["state"].values() for v in per_param.values()
                  if torch.is_tensor(v))])
            raise disk_full_error(final, need, exc) from None
        raise
    _link(root / "latest", final.name)
    if best_step is not None and (root / _step_name(best_step)).is_dir():
        _link(root / "best", _step_name(best_step))
    _prune(root, keep_last, best_step)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported (Windows)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically; skipped where symlinks are not allowed."""
    tmp = link.with_name(f".{link.name}.tmp")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:
        pass


def _remove(path: Path) -> None:
    """Delete a directory so that a kill part-way never leaves a partial one under a listed name."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name.lstrip('.')}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)  # atomic: the name is gone before any file is
    shutil.rmtree(doomed, ignore_errors=True)


def _recover(root: Path) -> None:
    """Tidy what killed writes, re-saves and deletions left; never deletes a complete checkpoint."""
    if not root.is_dir():
        return
    for child in list(root.iterdir()):
        if child.is_symlink():
            continue
        m = _OLD_DIR.match(child.name)
        if m and not (root / m.group(1)).exists() and _complete(child):
            os.replace(child, root / m.group(1))  # killed between the renames of a re-save: put it back
        elif child.name.startswith(".step_") and child.is_dir():
            # temp, .deleting, or an .old whose step is in place; a finished temp dir is never promoted:
            # listing did not show it, so a run may already have resumed from an earlier step
            shutil.rmtree(child, ignore_errors=True)
        elif _STEP_DIR.match(child.name) and child.is_dir() and not _complete(child):
            _remove(child)  # an old-style deletion killed part-way


def _prune(root: Path, keep_last: int, best_step: int | None) -> None:
    steps = [s for s, _ in list_checkpoints(root)]
    keep = set(steps[-keep_last:]) | ({best_step} if best_step is not None else set())
    for s in steps:
        if s not in keep:
            _remove(root / _step_name(s))
    _recover(root)


# -- finding -------------------------------------------------------------------------------
def _runs(experiment_dir: Path) -> list[Path]:
    return sorted(p for p in experiment_dir.iterdir() if p.is_dir() and list_checkpoints(p / CHECKPOINTS_DIR)) \
        if experiment_dir.is_dir() else []


def resolve_checkpoint(path: str | Path, prefer: str = "latest") -> Path:
    """A checkpoint directory from a checkpoint, a run directory or an experiment directory.

    In a run, ``prefer`` picks ``latest`` or ``best`` (falling back to the latest).
    """
    path = Path(path)
    if path.is_symlink() and path.name in ("latest", "best") and path.parent.name == CHECKPOINTS_DIR:
        if _complete(path):  # checkpoints/latest -> step_...
            return path.resolve()
        path, prefer = path.parent, path.name  # its target was pruned or is incomplete: fall back
    if (path / META_FILE).is_file() or (path / TRAINER_FILE).is_file():
        return path
    root = path if path.name == CHECKPOINTS_DIR else path / CHECKPOINTS_DIR
    if not root.is_dir():
        runs = _runs(path)
        if not runs:
            raise CheckpointError(
                f"No checkpoint at {path}: it is neither a checkpoint directory, nor a run directory "
                f"with {CHECKPOINTS_DIR}/, nor a directory of runs. Pass a path such as "
                f"runs/NAME/RUN/{CHECKPOINTS_DIR}/step_00000100 (or runs/NAME for its latest run)."
            )
        root = runs[-1] / CHECKPOINTS_DIR
    found = list_checkpoints(root)
    best = root / "best"
    if prefer == "best" and best.is_dir() and best.resolve() in {p.resolve() for _, p in found}:
        return best.resolve()
    if not found:
        raise CheckpointError(f"{root} holds no complete checkpoint (a run killed before its first save "
                              f"leaves none).")
    return found[-1][1]


def pick_checkpoint(path: str | Path) -> tuple[Path, str]:
    """The checkpoint that sample, eval, export-hf and init_from load, and which one it is.

    One rule for all of them: a checkpoint directory as given; in a run (or an experiment's latest
    run) its best checkpoint when it has one, else its latest. The label is "as given", "best" or
    "latest", for the line each command prints.
    """
    path = Path(path)
    ckpt = resolve_checkpoint(path, prefer="best")
    if (path / META_FILE).is_file() or (path / TRAINER_FILE).is_file():
        return ckpt, "as given"
    best = ckpt.parent / "best"
    return ckpt, "best" if best.is_dir() and best.resolve() == ckpt.resolve() else "latest"


# -- reading -------------------------------------------------------------------------------
@dataclass
class LoadedState:
    directory: Path
    trainer: dict[str, Any]
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_states: dict[int, dict[str, torch.Tensor]]  # rank -> {"cpu": ..., "cuda": ...}


def _previous_hint(directory: Path) -> str:
    earlier = [p for s, p in list_checkpoints(directory.parent) if p.name < directory.name]
    for candidate in reversed(earlier):
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return f" The previous checkpoint {candidate} is intact: resume from it with --resume {candidate}."
    return ""


def verify_checkpoint(directory: Path, skip: Any = None) -> dict[str, Any]:
    """trainer.json, after checking every file against its recorded sha256 (but ``skip(name)``)."""
    path = directory / TRAINER_FILE
    try:
        trainer = json.loads(read_record(path))
        hashes = trainer["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a training checkpoint ({TRAINER_FILE} is missing).") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}).") from None
    names = tuple(n for n in hashes if not (skip and skip(n))) if isinstance(hashes, dict) else ()
    verify_files(directory, hashes, names, TRAINER_FILE)
    return trainer


def _sharded_world(directory: Path) -> int | None:
    try:
        record = json.loads(read_record(directory / TRAINER_FILE)).get("sharded")
        return int(record["world_size"]) if record else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError):
        return None  # verify_checkpoint says what is wrong


def load_checkpoint(directory: str | Path, rank: int = 0, world_size: int = 1) -> LoadedState:
    """Read and verify a training checkpoint; raise CheckpointError naming an intact earlier one.

    A sharded checkpoint: only process ``rank``'s shard files are read (and hash-checked), and
    ``world_size`` must be the one that wrote it.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    world = _sharded_world(directory)
    if world is not None and world != world_size:
        raise CheckpointError(
            f"Cannot resume from {directory}: it is a sharded checkpoint (train.sharded_checkpoint) whose "
            f"weights and optimizer state are split into {world} shards, one per process of the run that wrote "
            f"it, and this run has {world_size} process(es). Resume it with the same number of processes "
            f"(torchrun --nproc_per_node {world} ... with train.strategy = \"fsdp\").")
    mine = {shard_file(k, rank, world) for k in ("model", "optimizer")} if world else set()
    try:
        trainer = verify_checkpoint(directory, skip=lambda n: bool(world) and "-shard-" in n and n not in mine)
        meta = read_meta(directory)
        model_file, optim_file = (WEIGHTS_FILE, OPTIMIZER_FILE) if world is None else \
            (shard_file("model", rank, world), shard_file("optimizer", rank, world))
        model_state = load_weights_file(directory / model_file)
        optimizer_state = unflatten_optimizer_state(load_weights_file(directory / optim_file),
                                                    trainer["optimizer"])
        rng: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in load_file(str(directory / RNG_FILE)).items():
            kind, _, rank = key.partition("/")
            rng.setdefault(int(rank), {})[kind] = t
    except CheckpointError as exc:
        raise CheckpointError(f"Cannot resume from {directory}: {exc}{_previous_hint(directory)}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Cannot resume from {directory}: {type(exc).__name__}: {exc}."
                              f"{_previous_hint(directory)}") from None
    return LoadedState(directory, trainer, meta, model_state, optimizer_state, rng)
