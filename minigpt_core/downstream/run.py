"""``minigpt evaluate``: lm_eval's own ``simple_evaluate`` on a checkpoint, its results where users look.

Results go to ``RUN/eval/<task>.json`` (lm_eval's format, one task a file; see ``results``), to an
offline W&B run in the run's directory (a table, job type ``eval``; as the run's ``[wandb]`` and
``WANDB_MODE`` say), and back to the caller as scores. Task names are checked (and shipped tasks'
data files found) before the model loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..base.device import select_device
from ..base.errors import MinigptError
from ..base.progress import stderr_is_terminal
from ..base.version import __version__
from ..checkpoints.checkpoint import atomic_write_bytes
from ..checkpoints.layout import CHECKPOINTS_DIR
from ..checkpoints.state import pick_checkpoint
from .results import EVAL_DIR, TaskScore, eval_file_name, primary, task_scores
from .tasks import EvaluateError, parse_task_names, task_manager

__all__ = ["Evaluation", "evaluate_checkpoint", "check_options", "default_out_dir", "format_table"]

BOOTSTRAP_ITERS = 1000  # resamples for the stderr of metrics without a closed form (perplexity)
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class Evaluation:
    checkpoint: Path
    out_dir: Path
    files: list[Path]
    scores: dict[str, list[TaskScore]]  # task -> every metric
    results: dict[str, Any] = field(repr=False)  # lm_eval's whole results dictionary
    num_fewshot: dict[str, Any] = field(default_factory=dict)
    wandb_dir: Path | None = None
    seconds: float = 0.0

    def primary(self) -> dict[str, TaskScore]:
        """task -> its headline score (accuracy where it has one)."""
        return {t: p for t, s in self.scores.items() if (p := primary(s)) is not None}


def check_options(num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8) -> None:
    problems = []
    if num_fewshot is not None and num_fewshot < 0:
        problems.append(f"--num-fewshot must be >= 0, not {num_fewshot}")
    if limit is not None and not limit > 0:
        problems.append(f"--limit must be > 0 (a number of examples per task, or a fraction below 1), not {limit}")
    if batch_size < 1:
        problems.append(f"--batch-size must be >= 1, not {batch_size}")
    if problems:
        raise EvaluateError("; ".join(problems) + ".")


def default_out_dir(checkpoint: Path) -> Path:
    """RUN/eval for a run's checkpoint; CHECKPOINT/eval for a checkpoint outside a run (import-hf, quantize)."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        return checkpoint.parent.parent / EVAL_DIR
    return checkpoint / EVAL_DIR


@contextlib.contextmanager
def _lm_eval_quietly(verbose: bool) -> Iterator[None]:
    """lm_eval's INFO/WARNING logging off (unless verbose), its prints on stderr (stdout is the table),
    and its bootstrap in this process (no pool of worker processes, each a copy of this one)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    saved = os.environ.get("DISABLE_MULTIPROC")
    if not verbose:
        logger.setLevel(logging.ERROR)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


def _per_task(results: dict[str, Any], task: str) -> dict[str, Any]:
    """lm_eval's results dictionary restricted to one task (entries keyed by task name keep only it)."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if key == "samples":
            continue
        if isinstance(value, dict) and task in value and key not in ("config",):
            out[key] = {task: value[task]}
        elif isinstance(value, dict) and key in ("results", "configs", "versions", "n-shot", "higher_is_better",
                                                 "n-samples", "group_subtasks", "groups"):
            out[key] = {}
        else:
            out[key] = value
    return out


def _json(data: Any) -> bytes:
    from lm_eval.utils import handle_non_serializable

    return (json.dumps(data, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n").encode("utf-8")


def evaluate_checkpoint(checkpoint: str | Path, tasks: str | list[str], *, num_fewshot: int | None = None,
                        limit: float | None = None, batch_size: int = 8, device: str = "auto",
                        out: str | Path | None = None, quantize: str | None = None, progress: bool = True,
                        write: Callable[[str], None] = print, wandb: bool = True,
                        verbose: bool = False) -> Evaluation:
    """Run lm_eval's evaluator on ``checkpoint`` for ``tasks`` and write the results (see the module)."""
    from lm_eval import simple_evaluate

    from .adapter import MinigptLM

    names = parse_task_names(tasks)
    check_options(num_fewshot, limit, batch_size)
    if not Path(checkpoint).exists():
        raise EvaluateError(f"No checkpoint at {checkpoint}: give a checkpoint directory, or a run or experiment "
                            f"directory (its best checkpoint, else its latest). Nothing was evaluated.")
    ckpt, _ = pick_checkpoint(checkpoint)
    if device != "auto":
        select_device(device)  # a device asked for and missing is an error here (lm_eval's default falls back)
    manager = task_manager(names)
    lm = MinigptLM(checkpoint=str(ckpt), device=device, batch_size=batch_size, quantize=quantize,
                   progress=progress and stderr_is_terminal())
    write(f"checkpoint: {lm.checkpoint} ({lm.tokenizer_name} tokenizer, context {lm.max_length}, device "
          f"{lm.device}); tasks: {', '.join(names)}" + (f", {num_fewshot}-shot" if num_fewshot is not None else "")
          + (f", at most {limit:g} examples each" if limit is not None else ""))
    start = time.perf_counter()
    with _lm_eval_quietly(verbose):
        try:
            results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
        except MinigptError:
            raise
        except (ConnectionError, TimeoutError, FileNotFoundError) as exc:
            raise EvaluateError(_data_hint(names, exc)) from None
        except Exception as exc:  # the Hub's and datasets' own errors when a task's data cannot be fetched
            if _is_download_error(exc):
                raise EvaluateError(_data_hint(names, exc)) from None
            raise
    seconds = time.perf_counter() - start
    out_dir = Path(out) if out is not None else default_out_dir(lm.checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = _STEP.match(lm.checkpoint.name)
    record = {"checkpoint": str(lm.checkpoint.resolve()), "step": int(step.group(1)) if step else None,
              "tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
              "quantize": quantize, "minigpt_version": __version__, "seconds": round(seconds, 3)}
    scores: dict[str, list[TaskScore]] = {}
    files = []
    for task, entry in results["results"].items():
        found = task_scores(task, entry) if isinstance(entry, dict) else []
        if not found:  # a group without metrics of its own: its tasks have theirs
            continue
        scores[task] = found
        path = out_dir / eval_file_name(task)
        atomic_write_bytes(path, _json({**_per_task(results, task), "minigpt": record}))
        files.append(path)
    evaluation = Evaluation(lm.checkpoint, out_dir, files, scores, results, dict(results.get("n-shot", {})),
                            seconds=seconds)
    if wandb:
        evaluation.wandb_dir = _log_wandb(evaluation, record)
    return evaluation


def _is_download_error(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("huggingface_hub", "datasets", "requests", "urllib3", "httpx", "fsspec"))


def _data_hint(names: list[str], exc: BaseException) -> str:
    return (f"The data of a task could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). lm_eval's own tasks "
            f"({', '.join(names)}) download their data from the Hugging Face Hub the first time: run once where "
            f"the Hub can be reached (or with HF_DATASETS_OFFLINE=1 and the data already in the Hugging Face "
            f"cache). The tasks that ship with minigpt (pydoc_mc, pydoc_cloze, pydoc) need no download. Nothing "
            f"was written.")


def format_table(evaluation: Evaluation) -> list[str]:
    """One line per task and metric: value, standard error, examples, shots."""
    rows = []
    n_samples = evaluation.results.get("n-samples", {})
    for task, scores in evaluation.scores.items():
        n = n_samples.get(task, {}).get("effective") if isinstance(n_samples.get(task), dict) else None
        shots = evaluation.num_fewshot.get(task)
        for s in scores:
            err = f"± {s.stderr:.4f}" if s.stderr is not None else ""
            rows.append([task, s.metric + ("" if s.filter == "none" else f" ({s.filter})"), f"{s.value:.4f}", err,
                         "" if n is None else str(n), "" if shots is None else str(shots)])
    headers = ["task", "metric", "value", "stderr", "n", "shots"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def _log_wandb(evaluation: Evaluation, record: dict[str, Any]) -> Path | None:
    """A W&B run of job type ``eval`` beside the checkpoint's run (offline unless its [wandb] says otherwise)."""
    from ..checkpoints.checkpoint import load_spec_from_checkpoint
    from ..train.loggers import WandbLogger, wandb_mode

    spec = load_spec_from_checkpoint(evaluation.checkpoint)
    settings = spec.wandb.model_copy(update={"job_type": "eval"})
    if wandb_mode(settings) == "disabled":
        return None
    run_dir = evaluation.out_dir.parent
    logger = WandbLogger(settings, name=f"{spec.name}-eval", run_dir=run_dir,
                         config={"checkpoint": record["checkpoint"], "step": record["step"], "tasks": record["tasks"],
                                 "num_fewshot": record["num_fewshot"], "limit": record["limit"]})
    try:
        rows = [[task, s.metric, s.filter, s.value, s.stderr, record["step"]]
                for task, scores in evaluation.scores.items() for s in scores]
        logger.log_table("eval/results", ["task", "metric", "filter", "value", "stderr", "step"], rows,
                         summary={f"eval/{t}/{s.metric}": s.value for t, p in evaluation.scores.items() for s in p})
        return logger.directory
    finally:
        logger.close()
