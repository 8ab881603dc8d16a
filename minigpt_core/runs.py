"""Reading finished or running runs back: their metrics.jsonl and a one-line summary of each.

Everything that looks at runs after the fact (``minigpt runs``, ``diff``, ``plot``, ablation
reports) reads them through here, so a report can be rebuilt at any time from the run
directories alone and every command agrees on what "final" and "best" mean.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .base import toml as _toml
from .base.errors import MinigptError
from .base.reading import SPEC_LIMIT, read_text_bounded
from .base.toml import flatten as _flatten
from .checkpoints.layout import CHECKPOINTS_DIR, META_FILE, TRAINER_FILE, list_checkpoints
from .downstream.results import EVAL_DIR, TaskScore, primary, read_eval_dir
from .train.lock import LOCK_FILE, lock_holder
from .train.loggers import METRICS_FILE
from .viz.curves import metric_series

__all__ = ["read_metrics", "metric_series", "RunSummary", "summarize_run", "iter_run_dirs", "STATUSES",
           "NotARunError", "is_run_dir", "resolve_run", "read_spec", "spec_differences", "diff_specs",
           "MANIFEST_FILE", "AblationCell", "read_manifest", "ablation_cells", "iter_ablation_dirs"]

# What summarize_run says about a run: a trainer holds its lock / its last session wrote a
# finished, interrupted, failed or diverged event (or ended without one: killed) / nothing logged.
STATUSES = ("running", "finished", "interrupted", "failed", "diverged", "empty")
_SESSION_EVENTS = ("start", "resume", "branch")
_END_EVENTS = ("finished", "interrupted", "failed", "diverged")


def _read_record(path: Path) -> str:
    # ValueError, like a corrupt file: a listing skips what it cannot read instead of failing on it.
    return read_text_bounded(path, "run record", SPEC_LIMIT, ValueError)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` in order ([] if there is none).

    A last line cut short by a crash or a full disk is skipped, not an error: the lines
    before it were flushed whole. So is a line that parses but is no record the trainer writes
    (see _is_record): one odd line must not take a run, or a listing of runs, down with it.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _is_record(record):
            records.append(record)
    return records


_COUNTER_MAX = 2**63  # steps and tokens are int64 counters; a bigger int is no count (and overflows a float)
_TIME_MAX = 1e11  # unix seconds (the year 5138): datetime refuses much beyond its year 9999
_COUNTERS = ("step", "total_steps", "recompiles")  # non-negative ints where present
_TEXTS = ("event", "label", "error")  # strings (label and error may be null)


def _finite(v: Any) -> bool:
    """A real number every reader can turn into a float and print; a bool is no number here."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < _COUNTER_MAX if isinstance(v, int) else math.isfinite(v)


def _is_record(record: Any) -> bool:
    """A JSON object whose fields the readers use have the types the trainer writes: counters are
    non-negative ints, the time a plausible unix time, metrics (``split/name``) finite numbers or null
    (how a NaN is logged). Other fields are not looked at: plugins and events log what they like."""
    if not isinstance(record, dict):
        return False
    for key in _COUNTERS:
        if key in record and not (_finite(record[key]) and isinstance(record[key], int) and record[key] >= 0):
            return False
    if "time" in record and not (_finite(record["time"]) and 0 <= record["time"] < _TIME_MAX):
        return False
    if "compile_seconds" in record and not _finite(record["compile_seconds"]):
        return False
    for key in _TEXTS:
        if key in record and not (isinstance(record[key], str) or (key != "event" and record[key] is None)):
            return False
    for key, value in record.items():
        if "/" in key and not key.startswith("sample/") and value is not None and not _finite(value):
            return False
    return True



@dataclass
class RunSummary:
    """What a table of runs shows about one run, all read from its metrics.jsonl."""

    run_dir: Path
    steps: int = 0  # last optimizer step logged
    tokens: int = 0  # training tokens seen at that step
    final_val_loss: float | None = None  # the last evaluation
    best_val_loss: float | None = None
    final_train_loss: float | None = None
    tokens_per_s: float | None = None  # median of the logged windows (robust to the first, slow one)
    peak_memory_mb: float | None = None
    started: float | None = None  # unix time of the first record
    updated: float | None = None  # unix time of the last record
    events: list[str] = field(default_factory=list)  # start, resume, branch, interrupted, finished, failed, ...
    status: str = "empty"  # one of STATUSES, for the last session of the run
    total_steps: int | None = None  # the planned steps (as of the last session)
    label: str | None = None  # `minigpt train --label`
    error: str | None = None  # the last session's error message, if it failed
    train_time_s: float | None = None  # seconds spent in training sessions (a resumed run's pauses left out)
    killed: bool = False  # interrupted without a word: no end event and no live lock (SIGKILL, power cut)
    holder: dict[str, Any] | None = None  # a running run's lock holder: pid, host, started
    compile_s: float | None = None  # train.compile: the last session's first (compiling) step, in seconds
    recompiles: int | None = None  # train.compile: recompilations after that step (0 is right)
    # `minigpt evaluate`'s results in RUN/eval/: task -> its headline score (accuracy where it has one)
    evaluations: dict[str, TaskScore] = field(default_factory=dict)

    @property
    def wall_time_s(self) -> float | None:
        return None if self.started is None or self.updated is None else self.updated - self.started


def summarize_run(run_dir: str | Path, records: list[dict[str, Any]] | None = None) -> RunSummary:
    """The run's numbers and status, from its metrics.jsonl and (for ``running``) its lock."""
    records = read_metrics(run_dir) if records is None else records
    out = RunSummary(Path(run_dir))
    speeds: list[float] = []
    ended: str | None = None  # how the last session ended
    session: float | None = None  # when it started
    out.train_time_s = 0.0 if records else None
    for r in records:
        t = r.get("time")
        if isinstance(t, (int, float)):
            out.started = t if out.started is None else out.started
            if session is None or (r.get("event") in _SESSION_EVENTS and out.updated is not None):
                if session is not None:  # close the previous session
                    out.train_time_s += max(0.0, out.updated - session)
                session = t
            out.updated = t
        if "event" in r:
            event = str(r["event"])
            out.events.append(event)
            if event in _SESSION_EVENTS:
                ended, out.error = None, None
                out.label = r.get("label") or out.label
            elif event in _END_EVENTS and ended != "diverged":  # a divergence also ends in a failed event
                ended = event
            if event == "failed" or event == "diverged":
                out.error = str(r.get("error") or out.error or "") or None
            if isinstance(r.get("total_steps"), int):
                out.total_steps = r["total_steps"]
            if isinstance(r.get("step"), int):
                out.steps = max(out.steps, r["step"])
            if isinstance(r.get("compile_seconds"), (int, float)):
                out.compile_s = float(r["compile_seconds"])
            if isinstance(r.get("recompiles"), int):
                out.recompiles = r["recompiles"]
            continue
        step = r.get("step")
        if isinstance(step, int):
            out.steps = max(out.steps, step)
        if isinstance(r.get("train/tokens"), (int, float)):
            out.tokens = int(r["train/tokens"])
        if isinstance(r.get("train/loss"), (int, float)):
            out.final_train_loss = float(r["train/loss"])
        if isinstance(r.get("train/tokens_per_s"), (int, float)):
            speeds.append(float(r["train/tokens_per_s"]))
        if isinstance(r.get("train/peak_memory_mb"), (int, float)):
            out.peak_memory_mb = max(out.peak_memory_mb or 0.0, float(r["train/peak_memory_mb"]))
        v = r.get("val/loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.final_val_loss = float(v)
            out.best_val_loss = float(v) if out.best_val_loss is None else min(out.best_val_loss, float(v))
    if speeds:
        speeds.sort()
        out.tokens_per_s = speeds[len(speeds) // 2]
    if session is not None and out.updated is not None:
        out.train_time_s += max(0.0, out.updated - session)
    if out.total_steps is None:
        out.total_steps = _checkpoint_total_steps(Path(run_dir))
    out.evaluations = {t: p for t, scores in read_eval_dir(Path(run_dir) / EVAL_DIR).items()
                       if (p := primary(scores)) is not None}
    out.holder = lock_holder(run_dir)
    if out.holder is not None:
        out.status = "running"
    elif ended is not None:
        out.status = ended
    elif records:
        # No end event: killed, or a run from before minigpt wrote a finished event.
        done = out.total_steps is not None and out.steps >= out.total_steps
        out.status, out.killed = ("finished", False) if done else ("interrupted", True)
    return out


def _checkpoint_total_steps(run_dir: Path) -> int | None:
    """The planned steps recorded in the run's latest checkpoint (runs whose events do not say)."""
    found = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    if not found:
        return None
    try:
        total = json.loads(_read_record(found[-1][1] / TRAINER_FILE)).get("total_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return total if isinstance(total, int) else None


def iter_run_dirs(root: str | Path) -> Iterator[Path]:
    """Every run directory (see is_run_dir) under ``root``, sorted, ``root`` included."""
    root = Path(root)
    if not root.is_dir():
        return
    found = {p.parent for pattern in ("spec.toml", METRICS_FILE, LOCK_FILE) for p in root.rglob(pattern)}
    for path in sorted(found):
        if "checkpoints" not in path.relative_to(root).parts and is_run_dir(path):  # a checkpoint's spec is no run
            yield path


# -- which directory is a run ---------------------------------------------------------------
class NotARunError(MinigptError):
    """A path given as a run is not one."""


def is_run_dir(path: str | Path) -> bool:
    """A directory the trainer made: metrics.jsonl, the run's lock (taken first, while the data loads),
    or spec.toml beside checkpoints/; an experiment file that happens to be called spec.toml is not a run."""
    path = Path(path)
    if not path.is_dir() or path.parent.name == CHECKPOINTS_DIR:
        return False
    return (path / METRICS_FILE).is_file() or (path / LOCK_FILE).is_file() or (
        (path / "spec.toml").is_file() and (path / CHECKPOINTS_DIR).is_dir())


def resolve_run(path: str | Path) -> Path:
    """A run directory from a run, one of its checkpoints, or an experiment directory (its latest run)."""
    path = Path(path)
    if not path.exists():
        raise NotARunError(f"{path} does not exist. Give a run directory (runs/NAME/20261127-184000), an "
                           f"experiment directory (runs/NAME: its latest run) or a checkpoint; `minigpt runs` "
                           f"lists them.")
    if (path / META_FILE).is_file() or (path / TRAINER_FILE).is_file():  # a checkpoint: its run
        run = path.resolve().parent.parent
        if is_run_dir(run):
            return run
    if path.name == CHECKPOINTS_DIR and is_run_dir(path.parent):
        return path.parent
    if is_run_dir(path):
        return path
    runs = sorted(p for p in path.iterdir() if is_run_dir(p)) if path.is_dir() else []
    if runs:  # run directories are named by start time: the last is the latest
        return runs[-1]
    raise NotARunError(f"{path} is not a run: a run directory holds spec.toml and metrics.jsonl (what `minigpt "
                       f"train` writes under train.out_dir/NAME/), and an experiment directory holds run "
                       f"directories. Give one of those (or a checkpoint); `minigpt runs DIR` lists the runs "
                       f"under a directory (default ./runs).")


# -- specs --------------------------------------------------------------------------------
def read_spec(run_dir: str | Path) -> dict[str, Any]:
    """The run's spec.toml as dotted field -> value ({} if it has none or it cannot be read).

    Read as plain TOML, not validated: a run made with a plugin that is gone still compares.
    """
    try:
        data = _toml.loads(_read_record(Path(run_dir) / "spec.toml"))
    except (OSError, ValueError):
        return {}
    return _flatten(data)


def diff_specs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (a's value, b's value) where two flattened specs differ (None: the field is absent)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# Fields that differ between any two runs without saying anything about the experiment.
_NOT_A_DIFFERENCE = ("train.out_dir", "description")


def spec_differences(specs: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """For each of several flattened specs: the fields whose value is not the same in all of them.

    This is what ``minigpt runs`` shows for the runs of one experiment: what was changed
    from run to run (with --set or an edited file), whatever the experiment file says today.
    """
    known = [s for s in specs.values() if s]  # a run without a spec.toml yet differs in nothing
    keys = sorted({k for spec in known for k in spec} - set(_NOT_A_DIFFERENCE))
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in known}) > 1]
    return {name: {k: spec.get(k) for k in varying} if spec else {} for name, spec in specs.items()}


# -- ablations ------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"  # written by `minigpt ablate` in runs/<ablation>/


@dataclass
class AblationCell:
    """One variant x seed of an ablation, with its status as the manifest says and the run confirms."""

    variant: str
    seed: int | None
    status: str  # done, failed, running, interrupted, pending (or what the manifest says)
    run_dir: Path | None  # the cell's run (its latest, for a cell directory of runs); None before it starts
    error: str | None = None
    summary: RunSummary | None = None


def read_manifest(ablation_dir: str | Path) -> dict[str, Any] | None:
    """The ablation's manifest.json (None if there is none or it is unreadable)."""
    try:
        data = json.loads(_read_record(Path(ablation_dir) / MANIFEST_FILE))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cell_run(ablation_dir: Path, value: Any) -> Path | None:
    if not value:
        return None
    given = Path(str(value))
    candidates = [given] if given.is_absolute() else [ablation_dir / given, Path.cwd() / given]
    if ablation_dir.name in given.parts:  # recorded relative to another directory: re-anchor it here
        rest = given.parts[len(given.parts) - given.parts[::-1].index(ablation_dir.name):]
        candidates.append(ablation_dir.joinpath(*rest))
    for path in candidates:
        if is_run_dir(path):
            return path
        if path.is_dir():
            runs = [p for p in iter_run_dirs(path) if p != path]
            if runs:
                return runs[-1]
    return None


def ablation_cells(ablation_dir: str | Path) -> list[AblationCell]:
    """The cells of an ablation in manifest order; a cell the manifest calls running whose process is gone
    is ``interrupted``, and one whose run's lock is held is ``running``."""
    ablation_dir = Path(ablation_dir)
    manifest = read_manifest(ablation_dir) or {}
    cells = []
    for c in manifest.get("cells") or []:
        if not isinstance(c, dict):
            continue
        run = _cell_run(ablation_dir, c.get("run_dir"))
        summary = summarize_run(run) if run is not None else None
        status = str(c.get("status") or "pending")
        if summary is not None and summary.status == "running":
            status = "running"
        elif status == "running" or (status == "pending" and summary is not None and summary.status != "empty"):
            status = "interrupted"
        seed = c.get("seed")
        cells.append(AblationCell(str(c.get("variant", "?")), seed if isinstance(seed, int) else None, status, run,
                                  str(c["error"]) if c.get("error") else None, summary))
    return cells


def iter_ablation_dirs(root: str | Path) -> Iterator[Path]:
    """Every ablation directory (one holding manifest.json) under ``root``, sorted, ``root`` included."""
    root = Path(root)
    if root.is_dir():
        yield from sorted(p.parent for p in root.rglob(MANIFEST_FILE)
                          if "checkpoints" not in p.relative_to(root).parts)
