"""``minigpt-lm-eval``: lm_eval's own command line, with the ``minigpt`` model type registered.

lm_eval 0.4 finds a model type only in its own table (``lm_eval.models.MODEL_MAPPING``) or among
classes registered in the same process: it reads no entry points for models (its registry accepts
``EntryPoint`` placeholders, but nothing fills it from installed packages), and ``--include_path``
adds tasks, not models. So the stock ``lm_eval --model minigpt`` cannot see minigpt; this script
registers it, adds the shipped tasks' directory to ``--include_path`` when none is given, and hands
every argument to lm_eval's own command line unchanged:

    minigpt-lm-eval --model minigpt --model_args checkpoint=runs/quickstart --tasks pydoc_mc
    python -m minigpt_core.downstream.lm_eval_cli ...           (the same)
"""

from __future__ import annotations

import sys

from . import register
from .tasks import TASKS_DIR

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args) \
            and not any(a in ("-h", "--help") for a in args[:1]):
        args += ["--include_path", str(TASKS_DIR)]
    register()
    sys.argv = [sys.argv[0] if sys.argv else "minigpt-lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
