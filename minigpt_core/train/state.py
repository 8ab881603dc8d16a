"""Training checkpoints: a model checkpoint directory plus everything needed to resume exactly.

    RUN/checkpoints/step_00000500/
        model.safetensors  spec.toml  meta.json    the model checkpoint (minigpt_core.checkpoint);
                                                   meta.json also holds the tokenizer state
        optimizer.safetensors                      optimizer tensors, keyed by parameter name
        rng.safetensors                            every process's torch RNG states
        trainer.json                               step, tokens, data position, schedule, best
                                                   validation loss, scaler, W&B run id, optimizer
                                                   hyper-parameters, sha256 of every other file
    RUN/checkpoints/latest -> step_00000500        symlinks (where the filesystem has them)
    RUN/checkpoints/best   -> step_00000400

A checkpoint is written into a temporary directory and renamed into place, so a crash (even
SIGKILL) leaves either the whole checkpoint or none of it. Loading verifies the hashes and reads
only safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import META_FILE, SPEC_FILE, WEIGHTS_FILE, atomic_write_bytes, load_weights_file, save_model
from ..errors import CheckpointError

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
]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
_HASHED = (WEIGHTS_FILE, SPEC_FILE, META_FILE, OPTIMIZER_FILE, RNG_FILE)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
def save_checkpoint(root: Path, step: int, *, model: torch.nn.Module, spec, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], rng_states: list[dict[str, torch.Tensor]],
                    trainer: dict[str, Any], meta: dict[str, Any], registry=None, keep_last: int = 2,
                    best_step: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, update latest/best, prune old ones."""
    from safetensors.torch import save

    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_model(model, spec, tmp, meta=meta, registry=registry, state=model_state)
        tensors, rest = flatten_optimizer_state(optimizer_state)
        atomic_write_bytes(tmp / OPTIMIZER_FILE, save(tensors))
        rng = {f"{kind}/{rank}": t.contiguous() for rank, states in enumerate(rng_states)
               for kind, t in states.items()}
        atomic_write_bytes(tmp / RNG_FILE, save(rng))
        record = {**trainer, "step": step, "optimizer": rest,
                  "sha256": {name: _sha256(tmp / name) for name in _HASHED}}
        atomic_write_bytes(tmp / TRAINER_FILE, json.dumps(record, indent=1).encode("utf-8"))
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a scheduled save)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def _prune(root: Path, keep_last: int, best_step: int | None) -> None:
    steps = [s for s, _ in list_checkpoints(root)]
    keep = set(steps[-keep_last:]) | ({best_step} if best_step is not None else set())
    for s in steps:
        if s not in keep:
            shutil.rmtree(root / _step_name(s), ignore_errors=True)
    for stale in root.glob(".step_*"):  # temp dirs of writes that were killed
        shutil.rmtree(stale, ignore_errors=True)


# -- finding -------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and not child.is_symlink() and (child / TRAINER_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _runs(experiment_dir: Path) -> list[Path]:
    return sorted(p for p in experiment_dir.iterdir() if p.is_dir() and list_checkpoints(p / CHECKPOINTS_DIR)) \
        if experiment_dir.is_dir() else []


def resolve_checkpoint(path: str | Path, prefer: str = "latest") -> Path:
    """A checkpoint directory from a checkpoint, a run directory or an experiment directory.

    In a run, ``prefer`` picks ``latest`` or ``best`` (falling back to the latest).
    """
    path = Path(path)
    if (path / META_FILE).is_file() or (path / TRAINER_FILE).is_file():
        return path.resolve() if path.is_symlink() else path  # checkpoints/latest -> step_...
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
    if prefer == "best" and (root / "best").is_dir():
        return (root / "best").resolve()
    found = list_checkpoints(root)
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


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """trainer.json, after checking every file against its recorded sha256."""
    path = directory / TRAINER_FILE
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
        hashes = trainer["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a training checkpoint ({TRAINER_FILE} is missing).") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}).") from None
    for name, expected in hashes.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} is missing.")
        actual = _sha256(file)
        if actual != expected:
            raise CheckpointError(
                f"{file} is truncated or corrupt: its sha256 is {actual[:16]}..., the checkpoint recorded "
                f"{expected[:16]}... ({file.stat().st_size:,} bytes now)."
            )
    return trainer


def load_checkpoint(directory: str | Path) -> LoadedState:
    """Read and verify a training checkpoint; raise CheckpointError naming an intact earlier one."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        trainer = verify_checkpoint(directory)
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        model_state = load_weights_file(directory / WEIGHTS_FILE)
        optimizer_state = unflatten_optimizer_state(load_weights_file(directory / OPTIMIZER_FILE),
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
