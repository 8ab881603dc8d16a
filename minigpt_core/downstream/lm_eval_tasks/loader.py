"""Loads the data files of minigpt's shipped lm_eval tasks (``custom_dataset`` of their YAML files).

Standalone on purpose: lm_eval imports this file by its path (``!function loader.pydoc_mc``), so
``lm_eval --include_path`` on this directory works without minigpt. Each line of a task's JSONL
file is one example with a ``split`` field (``test``, or ``validation`` for few-shot examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REBUILD = "python -m minigpt_core.downstream.build_tasks"


class TaskDataMissing(FileNotFoundError):
    """A shipped task's data file is not where its YAML file expects it."""


def data_file(task: str) -> Path:
    return HERE / f"{task}.jsonl"


def read_rows(task: str) -> dict[str, list[dict[str, Any]]]:
    """The task's examples by split, in file order."""
    path = data_file(task)
    if not path.is_file():
        raise TaskDataMissing(f"The data file of the lm_eval task {task}, {path}, is missing. Restore it from the "
                              f"minigpt sources (git checkout -- {path.name}), or rebuild it with `{REBUILD}`.")
    splits: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            splits.setdefault(row.get("split", "test"), []).append(row)
    return splits


def _dataset(task: str):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in read_rows(task).items()})


def pydoc_mc(**metadata: Any):
    return _dataset("pydoc_mc")


def pydoc_cloze(**metadata: Any):
    return _dataset("pydoc_cloze")
