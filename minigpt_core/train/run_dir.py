"""Where a run lives: a new run directory, the run of the checkpoint it resumes, or a branch of it.

Rank 0 decides and holds the run's lock (``RUN/.lock``, see lock.py); the other processes follow
its decision or raise the same error. A run that never started leaves no empty directory behind.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..base.disk import reporting_full_disk
from ..checkpoints.checkpoint import atomic_write_bytes
from ..base.errors import CheckpointError, MinigptError
from ..spec import ExperimentSpec, dump_spec
from ..base.distributed import DistEnv
from .lock import RunLock
from ..checkpoints.state import list_checkpoints, verify_checkpoint

__all__ = ["BRANCH_FILE", "RunPlace", "experiment_dir", "label_slug", "new_run_dir", "later_checkpoints",
           "place_run", "remove_unstarted", "report_run_dir"]

BRANCH_FILE = "branch.json"  # in a run that resumed from an earlier checkpoint of another run


def experiment_dir(spec: ExperimentSpec) -> Path:
    """Where the runs of this experiment go: train.out_dir/name (one sub-directory per run)."""
    return Path(spec.train.out_dir).expanduser() / spec.name


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")


def label_slug(label: str) -> str:
    """The directory suffix of a run's ``--label``: spaces become '-'; the rest must already be slug-safe."""
    slug = re.sub(r"\s+", "-", label.strip())
    if not _LABEL.fullmatch(slug):
        bad = sorted({c for c in slug if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        shown = label if len(label) <= 40 else label[:40] + f"... ({len(label)} characters)"
        why = (f"it holds {', '.join(repr(c) for c in bad)}" if bad else
               "it is empty" if not slug else "it is longer than 60 characters" if len(slug) > 60
               else "it starts with '.', '_' or '-'")
        raise MinigptError(f"--label {shown!r} cannot name a run directory: {why}. A label is 1 to 60 letters, "
                           f"digits, '.', '_', '-' or spaces (which become '-'), starting with a letter or digit, "
                           f"e.g. --label lr-3e-4 or --label 'rope swiglu'.")
    return slug


def new_run_dir(spec: ExperimentSpec, base: Path | None = None, label: str | None = None) -> Path:
    """A new, empty run directory under ``base`` (default the experiment's directory), named by its start time."""
    base = experiment_dir(spec) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run = base / ((stamp if n == 1 else f"{stamp}-{n}") + (f"-{label}" if label else ""))
        try:
            run.mkdir()  # atomic: of two processes starting in the same second, one gets -2
        except FileExistsError:
            continue
        return run
    raise MinigptError(f"{base} already holds 10,000 runs started at {stamp}.")


def later_checkpoints(ckpt: Path) -> tuple[list[Path], list[Path]]:
    """The intact and the corrupt checkpoints of ``ckpt``'s run after it."""
    found = list_checkpoints(ckpt.parent)
    mine = [s for s, path in found if path.resolve() == ckpt.resolve()]
    intact: list[Path] = []
    corrupt: list[Path] = []
    for s, path in found:
        if mine and s > mine[0]:
            try:
                verify_checkpoint(path)
                intact.append(path)
            except CheckpointError:
                corrupt.append(path)
    return intact, corrupt


@dataclass
class RunPlace:
    """The run directory a training process writes to, and what it holds there."""

    run_dir: Path
    parent: Path | None = None  # the checkpoint a branch started from
    label: str | None = None  # --label, if it named this run's directory
    note: str | None = None  # what rank 0 has to say about its choice
    lock: RunLock | None = None  # rank 0's

    def release(self, remove: bool = False) -> None:
        if self.lock is not None:
            self.lock.release(remove=remove)
            self.lock = None

    def origin(self, step: int, resumed: bool) -> str:
        if self.parent is not None:
            return f"a branch of {self.parent}, resumed at step {step}"
        return f"resumed at step {step}" if resumed else "new"

    def write_spec(self, spec: ExperimentSpec) -> None:
        """spec.toml: the run's own spec, what a resume reads."""
        with reporting_full_disk(self.run_dir / "spec.toml"):
            atomic_write_bytes(self.run_dir / "spec.toml", dump_spec(spec).encode("utf-8"))

    def write_branch(self, step: int) -> None:
        """branch.json, in a branch: where it came from."""
        if self.parent is not None:
            record = {"parent_checkpoint": str(self.parent.resolve()),
                      "parent_run": str(self.parent.parent.parent.resolve()), "step": step}
            atomic_write_bytes(self.run_dir / BRANCH_FILE, (json.dumps(record, indent=1) + "\n").encode("utf-8"))


def _claim(spec: ExperimentSpec, ckpt: Path | None, label: str | None) -> RunPlace:
    """Rank 0's choice, with the run's lock held."""
    slug = label_slug(label) if label is not None else None
    if ckpt is None:
        run = new_run_dir(spec, label=slug)
        return RunPlace(run, label=label, lock=RunLock(run).acquire())
    run = ckpt.parent.parent
    later, corrupt = later_checkpoints(ckpt)
    lock = None
    if not later:
        lock = RunLock(run).acquire()
        later, corrupt = later_checkpoints(ckpt)  # again, now that nobody else can add one
        if later:
            lock.release()
            lock = None
    if not later:
        notes = [f"note: {', '.join(p.name for p in corrupt)} after {ckpt.name} fail(s) verification and "
                 f"will be rewritten"] if corrupt else []
        if label is not None:
            notes.append(f"note: --label {label!r} is not used: the run continues in its own directory "
                         f"{run} (a label names a new run directory: a new run, or a branch)")
        return RunPlace(run, note="\n".join(notes) or None, lock=lock)
    # Resuming from an earlier checkpoint: the later ones stay as they are, the new steps go elsewhere.
    branch = new_run_dir(spec, base=run.parent, label=slug)
    return RunPlace(branch, parent=ckpt, label=label, lock=RunLock(branch).acquire(),
                    note=f"branch: {ckpt} is not the latest checkpoint of {run} (it has {later[-1].name}); training "
                         f"continues from it in the new run directory {branch} and leaves {run} as it is")


def place_run(spec: ExperimentSpec, ckpt: Path | None, label: str | None, env: DistEnv) -> RunPlace:
    """Where this run goes: rank 0 claims it (taking the lock), every process gets the same answer."""
    where: tuple[str, str | None, str | None, str | None] | MinigptError = ("", None, None, None)
    place = None
    if env.is_main:
        try:
            place = _claim(spec, ckpt, label)
            where = (str(place.run_dir), str(place.parent) if place.parent else None, place.label, place.note)
        except MinigptError as exc:
            where = exc
    where = env.broadcast(where)
    if isinstance(where, MinigptError):
        raise where from None
    if place is None:
        run, parent, label, note = where
        place = RunPlace(Path(run), Path(parent) if parent else None, label, note)
    return place


def report_run_dir(place: RunPlace, path: str | Path) -> None:
    """Rank 0: write the run directory's absolute path to ``path`` (train --run-dir-file). The caller that
    started this process learns from it which run is its own, whatever else appears beside it."""
    try:
        with reporting_full_disk(Path(path)):
            atomic_write_bytes(Path(path), (str(place.run_dir.resolve()) + "\n").encode("utf-8"))
    except OSError as exc:
        raise MinigptError(f"--run-dir-file {path} cannot be written ({exc.strerror or exc}); give a file in an "
                           f"existing, writable directory.") from None


def remove_unstarted(place: RunPlace, created: bool, made: list[Path], env: DistEnv) -> None:
    """After a failed set-up: drop the lock, and a new run directory that is still empty with the
    parent directories this run made (``made``, deepest first)."""
    place.release(remove=created)
    if created and env.is_main and place.run_dir.is_dir() and not any(place.run_dir.iterdir()):
        place.run_dir.rmdir()
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
