"""Task names for ``minigpt evaluate``: the tasks that ship with minigpt, and lm_eval's own.

The shipped tasks are lm_eval task YAML files with local data (``lm_eval_tasks/``, built by
``build_tasks``); ``minigpt evaluate`` passes that directory to lm_eval's ``TaskManager`` as an
include path, so they are found beside lm_eval's own tasks (``hellaswag``, ``lambada_openai``,
``arc_easy``, ...), which lm_eval downloads from the Hugging Face Hub on first use. The same
directory works with lm_eval's command line: ``--include_path`` it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..base.errors import MinigptError

__all__ = ["EvaluateError", "TASKS_DIR", "SHIPPED", "parse_task_names", "check_shipped_data", "task_manager"]

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
# name -> the tasks whose data files it reads (a group: its members). tests/test_evaluate_tasks.py checks
# this against the YAML files as lm_eval indexes them.
SHIPPED: dict[str, tuple[str, ...]] = {
    "pydoc_mc": ("pydoc_mc",),
    "pydoc_cloze": ("pydoc_cloze",),
    "pydoc": ("pydoc_mc", "pydoc_cloze"),
}


class EvaluateError(MinigptError):
    """``minigpt evaluate`` (or an ablation's [evaluate]) cannot run as asked."""


def parse_task_names(tasks: str | list[str]) -> list[str]:
    """Task names from ``--tasks a,b c`` or a list, each once, in order."""
    parts = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise EvaluateError("Name at least one task: --tasks pydoc_mc (the tasks that ship with minigpt: "
                            f"{', '.join(SHIPPED)}; or any lm_eval task, e.g. hellaswag, when online).")
    return names


def check_shipped_data(names: list[str], tasks_dir: Path | None = None) -> None:
    """A shipped task whose data file is missing is an error now, before any model is loaded."""
    tasks_dir = tasks_dir or TASKS_DIR
    for name in names:
        for task in SHIPPED.get(name, ()):
            path = tasks_dir / f"{task}.jsonl"
            if not path.is_file():
                raise EvaluateError(
                    f"The data file of the task {task}, {path}, is missing (the tasks that ship with minigpt read "
                    f"their examples from it; nothing was evaluated). Restore it from the minigpt sources, or "
                    f"rebuild it with `python -m minigpt_core.downstream.build_tasks`.")


def task_manager(names: list[str], tasks_dir: Path | None = None) -> Any:
    """lm_eval's TaskManager for these names, which must all exist (else an EvaluateError naming close ones).

    Only shipped tasks: lm_eval's own ~15,000 task files are not indexed (10 s on a 2-core CPU)."""
    from lm_eval.tasks import TaskManager  # lm_eval only when evaluating

    tasks_dir = tasks_dir or TASKS_DIR
    check_shipped_data(names, tasks_dir)
    only_shipped = all(n in SHIPPED for n in names)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=not only_shipped)
    unknown = [n for n in names if not Path(n).is_file() and not manager.match_tasks([n])]
    if unknown:
        known = list(dict.fromkeys([*SHIPPED, *manager.all_tasks]))
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvaluateError(
            f"Unknown task {'; '.join(hints)}. The tasks that ship with minigpt are {', '.join(SHIPPED)} "
            f"(offline); any task lm_eval knows also works when its data can be downloaded (`lm_eval ls tasks` "
            f"lists them). Nothing was evaluated.")
    return manager
