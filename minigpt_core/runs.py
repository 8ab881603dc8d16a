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

from .train.loggers import METRICS_FILE

__all__ = ["read_metrics", "metric_series", "RunSummary", "summarize_run", "iter_run_dirs"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` in order ([] if there is none).

    A last line cut short by a crash or a full disk is skipped, not an error: the lines
    before it were flushed whole.
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
        if isinstance(record, dict):
            records.append(record)
    return records


def metric_series(records: list[dict[str, Any]], key: str, x: str = "train/tokens") -> tuple[list[float], list[float]]:
    """(xs, ys) of every record with a finite ``key``, x taken from ``x`` (falling back to the step).

    Validation records carry the training tokens seen so far, so curves of runs with different
    batch sizes line up on the same axis. A resumed run's records after a rewind replace the
    ones they repeat (the last value for a step wins).
    """
    by_step: dict[int, tuple[float, float]] = {}
    last_x: float | None = None
    for r in records:
        if x in r and isinstance(r[x], (int, float)):
            last_x = float(r[x])
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step[int(r.get("step", 0))] = (float(r[x]) if isinstance(r.get(x), (int, float))
                                              else (last_x if last_x is not None else float(r.get("step", 0))), float(v))
    pts = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in pts], [p[1] for p in pts]


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
    events: list[str] = field(default_factory=list)  # start, resume, branch, interrupted, ...

    @property
    def wall_time_s(self) -> float | None:
        return None if self.started is None or self.updated is None else self.updated - self.started


def summarize_run(run_dir: str | Path, records: list[dict[str, Any]] | None = None) -> RunSummary:
    records = read_metrics(run_dir) if records is None else records
    out = RunSummary(Path(run_dir))
    speeds: list[float] = []
    for r in records:
        t = r.get("time")
        if isinstance(t, (int, float)):
            out.started = t if out.started is None else out.started
            out.updated = t
        if "event" in r:
            out.events.append(str(r["event"]))
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
    return out


def iter_run_dirs(root: str | Path) -> Iterator[Path]:
    """Every run directory (one holding spec.toml or metrics.jsonl) under ``root``, sorted, ``root`` included."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted({p.parent for pattern in ("spec.toml", METRICS_FILE) for p in root.rglob(pattern)}):
        if "checkpoints" not in path.relative_to(root).parts:  # a checkpoint's own spec.toml is not a run
            yield path
