"""What ``minigpt evaluate`` writes, read back: ``RUN/eval/<task>.json``, one file per task.

Each file is lm_eval's own results format (what ``lm_eval --output_path`` writes: ``results``,
``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ...) for
that one task, plus a ``minigpt`` entry (the checkpoint, its step, the limit). Plain JSON, read
without torch or lm_eval: ``minigpt runs`` and ablation reports use this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EVAL_DIR", "PRIMARY_METRICS", "TaskScore", "task_scores", "primary", "read_eval_dir", "eval_file_name"]

EVAL_DIR = "eval"  # RUN/eval/<task>.json
# The number a table shows for a task: its accuracy where it has one (lm_eval's names).
PRIMARY_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "perplexity")


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None
    filter: str = "none"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def task_scores(task: str, entry: dict[str, Any]) -> list[TaskScore]:
    """Every metric of one task's entry of lm_eval's ``results`` ("acc,none": 0.5, "acc_stderr,none": ...)."""
    out = []
    for key, value in entry.items():
        metric, sep, flt = key.partition(",")
        if not sep or metric.endswith("_stderr"):
            continue
        number = _number(value)
        if number is None:
            continue
        out.append(TaskScore(task, metric, number, _number(entry.get(f"{metric}_stderr,{flt}")), flt))
    return out


def primary(scores: list[TaskScore]) -> TaskScore | None:
    """The task's headline number: the first of PRIMARY_METRICS it has (else its first metric)."""
    for name in PRIMARY_METRICS:
        for s in scores:
            if s.metric == name:
                return s
    return scores[0] if scores else None


def eval_file_name(task: str) -> str:
    """``<task>.json``; a task given as a path keeps only its file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(task).name) + ".json"


def read_eval_dir(directory: str | Path) -> dict[str, list[TaskScore]]:
    """task -> its scores, from every ``<task>.json`` in ``directory`` (a file that cannot be read is skipped)."""
    out: dict[str, list[TaskScore]] = {}
    directory = Path(directory)
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            results = data["results"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(results, dict):
            continue
        for task, entry in results.items():
            if isinstance(entry, dict):
                scores = task_scores(task, entry)
                if scores:
                    out[task] = scores
    return out
