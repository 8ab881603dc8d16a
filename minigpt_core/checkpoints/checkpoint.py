"""Model checkpoints: a directory with safetensors weights, the resolved spec and metadata.

    CKPT/model.safetensors   weights (a tied output head is stored once, as tok_emb.weight)
    CKPT/spec.toml           the resolved experiment spec: enough to rebuild the model
    CKPT/meta.json           minigpt and plugin versions, the sha256 of the two files above,
                             and whatever the writer adds

Every file is written to a temporary name and renamed into place, so a crash never
leaves a half-written file under the real name. Loading never unpickles anything:
safetensors, TOML and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..base import toml as _toml
from ..base.errors import CheckpointError, MinigptError
from ..base.loader import get_registry, is_plugin_file
from ..base.registry import ComponentRegistry
from ..base.version import __version__
from ..model.weights import load_model_state, model_state_for_saving
from .layout import META_FILE, SPEC_FILE, WEIGHTS_FILE, read_record
from ..spec import ExperimentSpec, dump_spec, parse_spec

__all__ = [
    "WEIGHTS_FILE",
    "SPEC_FILE",
    "META_FILE",
    "atomic_write_bytes",
    "save_model",
    "read_meta",
    "read_record",
    "file_sha256",
    "verify_files",
    "model_state_for_saving",
    "load_model_state",
    "check_plugin_files",
    "shard_file",
    "load_checkpoint_weights",
]



def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plugin_versions(registry: ComponentRegistry) -> dict[str, str]:
    """Each loaded plugin's distribution and version (or its file's hash), as a checkpoint records them."""
    return {p.name: f"file sha256:{p.sha256}" if p.sha256 else f"{p.distribution or '-'} {p.version or '-'}"
            for p in registry.plugins}


def _local_plugin_record(spec: ExperimentSpec) -> dict[str, Any]:
    """For each plugin the spec lists: its file's sha256 and the components it provided, so a later
    load can say which components a missing or changed file took with it."""
    reg = spec.registry
    out = {}
    for ref in spec.plugins:
        info = next((p for p in reg.plugins if p.local_ref == ref), None)
        if info is not None:
            out[ref] = {"sha256": info.sha256,
                        "components": [f"{e.kind} {e.name}" for e in reg.entries() if e.plugin == info.name]}
    return out


def check_plugin_files(directory: str | Path, data: dict[str, Any],
                       registry: ComponentRegistry | None = None) -> dict[str, Any]:
    """Before a checkpoint's raw spec is parsed: a plugin file it lists that is gone is a
    CheckpointError naming the components it provided (unless those are loaded now, e.g. by
    --plugin from a new place); a file whose content changed since is a warning."""
    refs = data.get("plugins")
    if not isinstance(refs, list) or not refs:
        return data
    try:
        meta = json.loads(read_record(Path(directory) / META_FILE))
        recorded = meta.get("local_plugins") or {}
    except (OSError, ValueError, AttributeError, CheckpointError):
        recorded = {}
    kept = []
    for ref in refs:
        rec = recorded.get(ref) if isinstance(recorded, dict) and isinstance(ref, str) else None
        rec = rec if isinstance(rec, dict) else {}
        sha = rec.get("sha256")
        if not (isinstance(ref, str) and is_plugin_file(ref)):
            kept.append(ref)
            continue
        comps = [tuple(c.split(" ", 1)) for c in rec.get("components") or [] if " " in c]
        if not Path(ref).is_file():
            reg = registry or get_registry()
            if comps and all(c in reg for c in comps):
                import warnings

                warnings.warn(f"the plugin file {ref} that {directory} was built with no longer exists; using "
                              + ", ".join(f"{k} '{n}' from {reg.get(k, n).source}" for k, n in comps),
                              stacklevel=2)
                continue
            what = " and ".join(f"{k} '{n}'" for k, n in comps) or "the components"
            hashed = f" (sha256 {sha[:16]}...)" if sha else ""
            raise CheckpointError(
                f"The {what} of the checkpoint {directory} came from the plugin file {ref}{hashed}, which no "
                f"longer exists. Restore the file there, or pass its new location with --plugin PATH (or "
                f"MINIGPT_PLUGIN_PATH)."
            )
        if sha and file_sha256(Path(ref)) != sha:
            import warnings

            warnings.warn(f"the plugin file {ref} changed since {directory} was written (sha256 {sha[:16]}... "
                          f"then, {file_sha256(Path(ref))[:16]}... now): the model is built with the current "
                          f"code, which may not match the trained weights", stacklevel=2)
        kept.append(ref)
    return {**data, "plugins": kept}


def save_model(model: torch.nn.Module, spec: ExperimentSpec, directory: str | Path,
               meta: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
               weights_file: bool = True) -> Path:
    """Write weights, spec and metadata into ``directory`` (created if needed).

    ``state``: the weights to write instead of ``model.state_dict()`` (see model_state_for_saving).
    ``weights_file=False``: spec and metadata only (a sharded checkpoint's processes write the weights).
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = save(model_state_for_saving(model, state)) if weights_file else None
    spec_bytes = dump_spec(spec).encode("utf-8")
    if spec.plugins:
        meta = {"local_plugins": _local_plugin_record(spec), **(meta or {})}
    # The hashes let every load (sample, eval, export, init_from) notice a damaged file, also in
    # checkpoints that have no trainer.json (e.g. written by import-hf).
    full_meta = {"minigpt_version": __version__, "torch_version": torch.__version__,
                 "plugins": plugin_versions(spec.registry), **(meta or {}),
                 "sha256": {SPEC_FILE: hashlib.sha256(spec_bytes).hexdigest()}}
    if weights is not None:
        full_meta["sha256"] = {WEIGHTS_FILE: hashlib.sha256(weights).hexdigest(), **full_meta["sha256"]}
        # Weights first, metadata last: a directory whose meta.json exists is complete.
        atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    atomic_write_bytes(directory / SPEC_FILE, spec_bytes)
    atomic_write_bytes(directory / META_FILE, json.dumps(full_meta, indent=2).encode("utf-8"))
    return directory


# meta.json's keys that minigpt reads, and the JSON type each must have when present (None is allowed).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "sha256": (dict,), "plugins": (dict,), "local_plugins": (dict,), "tokenizer": (dict,),
    "quantization": (dict,), "minigpt_version": (str,), "torch_version": (str,),
}


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, not an object"
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and not isinstance(value, types):
            return f"its {key!r} is a {type(value).__name__}, not a {types[0].__name__}"
    hashes = meta.get("sha256") or {}
    bad = [k for k, v in hashes.items() if not isinstance(v, str)]
    if bad:
        return f"its sha256 record of {bad[0]} is not a string"
    return None


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json as a mapping, checked before anything reads it: against trainer.json's sha256 when the
    checkpoint has one (training checkpoints), and for its shape (a CheckpointError either way)."""
    directory = Path(directory)
    path = directory / META_FILE
    try:
        text = read_record(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} is not a complete minigpt checkpoint: {META_FILE} is missing (the write "
            f"was interrupted, or this is not a checkpoint directory)."
        ) from None
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    trainer = directory / "trainer.json"  # train.state.TRAINER_FILE (not imported: a cycle)
    if trainer.is_file():
        verify_files(directory, _trainer_hashes(trainer), (META_FILE,), trainer.name)
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); use an earlier checkpoint.") from None
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}. Use another checkpoint of the run (or re-create "
                              f"this one).")
    return meta


def _trainer_hashes(trainer: Path) -> Any:
    try:
        return json.loads(read_record(trainer))["sha256"]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{trainer} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              f"use another checkpoint of the run.") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(directory: Path, hashes: Any, names: tuple[str, ...], recorded_in: str) -> None:
    """Check each of ``names`` that ``hashes`` records; a mismatch is a CheckpointError naming the file."""
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{directory / recorded_in} is corrupt: its sha256 record is not a mapping.")
    for name in names:
        expected = hashes.get(name)
        if expected is None:
            continue
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} is missing.")
        actual = file_sha256(file)
        if actual != expected:
            raise CheckpointError(
                f"{file} is truncated or corrupt: its sha256 is {actual[:16]}..., {recorded_in} recorded "
                f"{expected[:16]}... ({file.stat().st_size:,} bytes now). Use another checkpoint of the run "
                f"(or restore this file from a copy)."
            )


def _verify_model_files(directory: Path, meta: dict[str, Any]) -> None:
    """Hash-check the files a model load reads: against trainer.json (training checkpoints, which
    also covers meta.json) or else meta.json's own record. Checkpoints older than these records
    carry no hashes and load unchecked."""
    trainer = directory / "trainer.json"  # train.state.TRAINER_FILE (not imported: a cycle)
    if trainer.is_file():
        verify_files(directory, _trainer_hashes(trainer), (META_FILE, SPEC_FILE, WEIGHTS_FILE), trainer.name)
    elif "sha256" in meta:
        verify_files(directory, meta["sha256"], (SPEC_FILE, WEIGHTS_FILE), META_FILE)


def load_spec_from_checkpoint(directory: str | Path, registry: ComponentRegistry | None = None) -> ExperimentSpec:
    path = Path(directory) / SPEC_FILE
    try:
        data = _toml.loads(read_record(path))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {SPEC_FILE}; it is not a minigpt checkpoint.") from None
    except (_toml.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); use an earlier checkpoint.") from None
    data = check_plugin_files(directory, data, registry)
    try:
        return parse_spec(data, source=str(path), registry=registry)
    except MinigptError as exc:
        raise CheckpointError(
            f"The spec stored in {directory} cannot be used here: {exc} (a plugin the run used may "
            f"be missing; `minigpt plugins` lists what is installed)."
        ) from None


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; it is not a complete checkpoint.") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({exc}); use an earlier checkpoint or re-export it."
        ) from None


def shard_file(kind: str, rank: int, world_size: int) -> str:
    """``kind`` ("model" or "optimizer") shard file of process ``rank`` in a sharded training checkpoint."""
    return f"{kind}-shard-{rank:05d}-of-{world_size:05d}.safetensors"


def load_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``; for a sharded training checkpoint (train.sharded_checkpoint), the full
    tensors put together from every process's hash-checked shard file (FSDP2 splits along dim 0)."""
    if not (directory / WEIGHTS_FILE).is_file():
        try:
            trainer = json.loads(read_record(directory / "trainer.json"))
            record, hashes = trainer.get("sharded"), trainer["sha256"]
            names = [shard_file("model", r, int(record["world_size"])) for r in range(int(record["world_size"]))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError):
            record = None
        if record:
            verify_files(directory, hashes, tuple(names), "trainer.json")
            parts = [load_weights_file(directory / name) for name in names]
            try:
                return {k: torch.cat([p[k] for p in parts]) if v["sharded"] else parts[0][k]
                        for k, v in record["layout"].items()}
            except (KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"The shard files of {directory} do not fit together ({exc}); use another "
                                      f"checkpoint of the run.") from None
    return load_weights_file(directory / WEIGHTS_FILE)


