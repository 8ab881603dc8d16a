"""Run an ablation's cells as ordinary runs, each in its own process, and keep the manifest.

The manifest (``<root>/manifest.json``, rewritten atomically after every change) is the
record of which cell is where: a rerun skips done cells, resumes interrupted ones from their
run's latest checkpoint (the trainer's exact resume) and retries failed ones only when asked.
Only this process writes it; cells report through their exit status and their log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..base import toml as _toml
from ..base.reading import SPEC_LIMIT, read_text_bounded
from ..checkpoints.checkpoint import atomic_write_bytes
from ..checkpoints.state import list_checkpoints
from ..spec import dump_spec
from .plan import AblationError, Cell, Plan, flatten_overrides

__all__ = ["MANIFEST_FILE", "CELL_FILE", "CELL_LOG", "read_manifest", "run_ablation", "cell_command",
           "eval_command", "execute_cell", "EXECUTORS", "cores", "AblationInterrupted", "start_manifest",
           "needs_evaluation"]

MANIFEST_FILE = "manifest.json"
CELL_FILE = "cell.toml"  # the cell's resolved spec, in train.out_dir/<variant>/seed-<s>/
CELL_LOG = "ablate.log"  # the cell process's output, beside it
RUN_DIR_FILE = "ablate.run-dir"  # + a suffix per attempt: where the cell's trainer writes its run directory
EXECUTORS = ("local", "slurm", "submitit-local")
STATUSES = ("pending", "running", "done", "failed")
_INTERRUPTED = 130  # what `minigpt train` returns when stopped by a signal (it saved a checkpoint)


class AblationInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the ablation: its running cells saved a checkpoint, none was started after."""


class _Stop:
    """SIGINT / SIGTERM to `minigpt ablate` (alone, or with its cells as a terminal's Ctrl-C does): noted here
    and acted on by the loop, which starts no more cells and asks the running ones to save and stop."""

    def __init__(self) -> None:
        self.presses = 0
        self.why = ""
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.presses > 0

    def _handle(self, signum, frame) -> None:
        self.presses += 1
        self.why = self.why or ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    def install(self) -> "_Stop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def cores() -> int:
    """The cores the cells share: this process's CPUs, capped by an OMP_NUM_THREADS given to `ablate` (a user's
    or a test's wish for fewer threads per run; one thread also makes a CPU run bit-for-bit repeatable)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


class _Strict(BaseModel):
    # strict JSON: a number where a name goes (or "1" where a count goes) is wrong, not converted
    model_config = ConfigDict(strict=True, extra="allow")


class _CellRecord(_Strict):
    id: str
    variant: str
    seed: int
    status: Literal["pending", "running", "done", "failed"]
    run_dir: Optional[str] = None
    error: Optional[str] = None
    overrides: dict[str, Any] = {}
    spec_sha256: Optional[str] = None
    steps: Optional[int] = None
    tokens: Optional[int] = None
    tokens_per_step: Optional[int] = None
    flops_per_token: Optional[int] = None
    params: Optional[int] = None
    attempts: int = 0
    started: Optional[float] = None
    finished: Optional[float] = None
    wall_time_s: Optional[float] = None
    previous_runs: list[str] = []

    @field_validator("variant")
    @classmethod
    def _one_directory(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v:
            raise ValueError("must be a variant name (one directory name under the ablation's directory)")
        return v

    @model_validator(mode="after")
    def _id_matches(self) -> "_CellRecord":
        own = f"{self.variant}/seed-{self.seed}"
        size = self.id[:-len(own) - 1] if self.id.endswith("/" + own) else None  # [scale]: <size>/<variant>/seed-<s>
        if self.id != own and not (size and size not in (".", "..") and "/" not in size and "\\" not in size):
            raise ValueError(f"id {self.id!r} is not its variant and seed ({own}, or <size>/{own} with [scale])")
        return self


class _Settings(_Strict):
    baseline: Optional[str] = None
    description: Optional[str] = None
    seeds: list[int] = []
    set: list[str] = []
    budget: Optional[str] = None
    budget_summary: Optional[str] = None
    wandb: dict[str, Any] = {}


class _Manifest(_Strict):
    ablation: str
    root: Optional[str] = None
    settings: _Settings = _Settings()
    variants: Union[dict[str, dict[str, Any]], list[str]] = {}
    cells: list[_CellRecord]
    retired: list[dict[str, Any]] = []


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in ("dict", "list"):  # a union member's tag, not a field
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "the whole file"


def _shape_problem(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors(include_url=False):
        where, kind = _where(e["loc"]), e["type"]
        if where.startswith("variants"):
            problems.append("variants: must be a table of variant names to their overrides (or a list of names)")
        elif kind == "missing":
            problems.append(f"{where}: missing")
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            problems.append(f"{where}: must be an object ({{...}}), not {json.dumps(e['input'])[:60]}")
        elif kind == "list_type":
            problems.append(f"{where}: must be a list ([...]), not {json.dumps(e['input'])[:60]}")
        elif kind == "literal_error":
            problems.append(f"{where}: must be one of {', '.join(STATUSES)}, not {json.dumps(e['input'])[:60]}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" + ("" if kind == "value_error" else
                                                   f", not {json.dumps(e['input'], default=str)[:60]}"))
    problems = list(dict.fromkeys(problems))
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return shown


def _anchored_run_dir(root: Path, recorded_root: str | None, run_dir: str) -> Path:
    """Where a recorded run directory is now: recorded under the manifest's own root, it moves with the
    ablation's directory (`minigpt report` from elsewhere, a moved ablation); otherwise as recorded."""
    given = Path(run_dir)
    if recorded_root:
        try:
            return root / given.relative_to(recorded_root)  # lexical: '..' stays in, resolve() judges it
        except ValueError:
            pass
    return given


_JSON_KIND = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The ablation's manifest, checked: its shape, and every cell's run inside that cell's directory
    (a hand-edited run_dir must never make an ablation resume or append to another run)."""
    root = Path(root)
    path = root / MANIFEST_FILE
    try:
        text = read_text_bounded(path, "ablation manifest", SPEC_LIMIT, AblationError)
        data = json.loads(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AblationError(f"{path} cannot be read ({exc}); it is the record of the ablation's cells. Restore it, "
                            f"or move the ablation directory away to start the ablation afresh.") from None
    if not isinstance(data, dict):
        raise AblationError(f"{path} is not an ablation manifest (a JSON object with the ablation's name and its "
                            f"cells), it holds {_JSON_KIND.get(type(data), 'null')}. Restore it, or "
                            f"move the ablation directory away to start the ablation afresh.")
    try:
        _Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise AblationError(f"{path} is not a valid ablation manifest: {_shape_problem(exc)}. It is the record of "
                            f"the ablation's cells, written by `minigpt ablate`; restore it, or move the ablation "
                            f"directory away to start the ablation afresh.") from None
    real_root = root.resolve()
    for i, cell in enumerate(data["cells"]):
        if not cell.get("run_dir"):
            continue
        run = _anchored_run_dir(root, data.get("root"), cell["run_dir"])
        cell_dir = real_root / cell["id"]  # <variant>/seed-<s>, or <size>/<variant>/seed-<s> (checked above)
        real = run.resolve()
        if cell_dir not in real.parents:
            raise AblationError(
                f"{path}: cells[{i}].run_dir {cell['run_dir']!r} is not inside the cell's own directory "
                f"{root / cell['id']}/ (it resolves to {real}). An ablation "
                f"resumes and reports only its own cells' runs, so nothing was run or written. Restore the "
                f"run_dir `minigpt ablate` recorded, or set it to null to run the cell {cell['id']} afresh.")
        cell["run_dir"] = str(run)
    if not data.get("root"):
        data["root"] = str(root)
    return data


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _record(cell: Cell) -> dict[str, Any]:
    return {"id": cell.id, "variant": cell.variant, "seed": cell.seed, "overrides": cell.overrides,
            "spec_sha256": cell.spec_sha256, "status": "pending", "error": None, "run_dir": None,
            "cell_dir": str(cell.exp_dir), "steps": cell.steps, "tokens": cell.tokens,
            "tokens_per_step": cell.tokens_per_step, "flops_per_token": cell.flops_per_token, "params": cell.params,
            "budget_note": cell.budget_note, "attempts": 0, "started": None, "finished": None, "wall_time_s": None,
            "host": None, "job_id": None,
            "previous_runs": [], "eval": None}


def _spec_diff(run_dir: str | None, cell: Cell) -> str:
    """The fields where a finished run's spec and the cell's new spec differ (for the refusal message)."""
    if not run_dir or not (Path(run_dir) / "spec.toml").is_file():
        return "the cell's resolved spec changed"
    try:
        old = flatten_overrides(_toml.loads(read_text_bounded(Path(run_dir) / "spec.toml", "run spec", SPEC_LIMIT,
                                                              OSError)))
    except (OSError, _toml.TOMLDecodeError):
        return "the cell's resolved spec changed"
    new = flatten_overrides(_toml.loads(dump_spec(cell.spec)))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k != "train.threads"]
    return ", ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:6]) + \
        (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else "the cell's resolved spec changed"


def reconcile(plan: Plan, old: dict[str, Any] | None, *, force: bool) -> dict[str, Any]:
    """The manifest for this plan, keeping what the old one knows about unchanged cells."""
    old_cells = {c["id"]: c for c in (old or {}).get("cells", [])}
    cells, changed = [], []
    for cell in plan.cells:
        rec = _record(cell)
        prev = old_cells.pop(cell.id, None)
        if prev is not None and prev.get("spec_sha256") == cell.spec_sha256:
            for key in ("status", "error", "run_dir", "attempts", "started", "finished", "wall_time_s",
                        "previous_runs", "host", "job_id", "eval"):
                rec[key] = prev.get(key, rec[key])
        elif prev is not None:
            if prev.get("status") == "done":
                changed.append(f"{cell.id} ({_spec_diff(prev.get('run_dir'), cell)})")
            rec["previous_runs"] = list(prev.get("previous_runs", [])) + ([prev["run_dir"]] if prev.get("run_dir")
                                                                           else [])
        cells.append(rec)
    if changed and not force:
        raise AblationError(
            f"The ablation file (or --set) now gives {len(changed)} finished cell(s) a different spec than the one "
            f"they ran with: {'; '.join(changed)}. Their results would no longer match the file, so nothing was "
            f"run. Undo the change to keep them, use a new ablation name (name = \"...\") for the new experiment, "
            f"or pass --force to run the changed cells again as new runs (the old runs stay in "
            f"{plan.root}, listed under previous_runs in the manifest).")
    retired = list((old or {}).get("retired", [])) + list(old_cells.values())  # cells the file no longer has
    return {"version": 1, "ablation": plan.name, "root": str(plan.root), "settings": plan.settings(),
            "variants": plan.variants, "cells": cells, "retired": retired,
            "created": (old or {}).get("created", time.time()), "updated": time.time()}


# -- one cell -------------------------------------------------------------------------------------------
def cell_command(cell_file: Path, *, threads: int, resume: str | None, nproc: int = 1,
                 run_dir_file: Path | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "minigpt_core"]
    if nproc > 1:  # several processes per cell: torchrun inside the job
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "minigpt_core"]
    cmd = [*launcher, "train", str(cell_file), "--no-progress", "--set", f"train.threads={threads}"]
    if run_dir_file is not None:  # the trainer writes its run directory there: how we know which run is the cell's
        cmd += ["--run-dir-file", str(run_dir_file)]
    return cmd + (["--resume", resume] if resume else [])


def eval_command(checkpoint: Path, out: Path, options: dict[str, Any], *, threads: int) -> list[str]:
    """`minigpt evaluate` of a cell's final checkpoint ([evaluate]), results in its run's eval/."""
    cmd = [sys.executable, "-m", "minigpt_core", "evaluate", str(checkpoint), "--tasks", ",".join(options["tasks"]),
           "--out", str(out), "--batch-size", str(options.get("batch_size") or 8), "--threads", str(threads),
           "--no-progress"]
    if options.get("num_fewshot") is not None:
        cmd += ["--num-fewshot", str(options["num_fewshot"])]
    if options.get("limit") is not None:
        cmd += ["--limit", f"{options['limit']:g}"]
    return cmd


def needs_evaluation(rec: dict[str, Any], options: dict[str, Any] | None, retry_failed: bool = False) -> bool:
    """A trained cell whose final checkpoint has no evaluation with these [evaluate] options yet (a failed one
    only with --retry-failed)."""
    if options is None or rec.get("status") != "done" or not rec.get("run_dir"):
        return False
    ev = rec.get("eval") or {}
    if ev.get("options") != options:
        return True  # never evaluated, or with other tasks / limits than the file now asks
    return ev.get("status") == "pending" or (retry_failed and ev.get("status") == "failed")


def launch(cmd: list[str], log: Path, env: dict[str, str], executor: Any = None) -> Any:
    """Start a run's command: a local process writing to ``log`` and dying with us (a subprocess.Popen), or with
    a submitit ``executor`` a job (its Job) that runs it through ``execute_cell``."""
    if executor is not None:
        return executor.submit(execute_cell, cmd, str(log), env, os.getcwd())
    kwargs: dict[str, Any] = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), **kwargs)


def _die_with_parent() -> None:
    # A cell must not outlive `minigpt ablate` (killed, even with SIGKILL): the rerun resumes it instead.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def execute_cell(cmd: list[str], log: str, env: dict[str, str], cwd: str) -> int:
    """Run a cell's process to its end (in a submitit job); its output goes to ``log``."""
    with open(log, "ab") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode


def last_error(log: Path, limit: int = 1200) -> str:
    """One paragraph: the cell's `error: ...` message, else the last line of its traceback."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"(no log at {log})"
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):][:limit]
    tb = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
    return (tb[-1] if tb else "the cell's process ended without output")[:limit]


@dataclass
class _Active:
    rec: dict[str, Any]
    handle: Any  # subprocess.Popen or a submitit Job
    log: Path
    report: Path  # where the cell's trainer writes its run directory (train --run-dir-file)
    t0: float
    told: int = 0  # stop requests passed on to the cell's process
    phase: str = "train"  # or "eval": `minigpt evaluate` of the trained cell's final checkpoint ([evaluate])

    def poll(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        if not self.handle.done():
            return None
        try:
            return int(self.handle.result())
        except Exception as exc:  # noqa: BLE001 - the job itself failed (killed, out of time, ...)
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"\nerror: the job failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}\n")
            return 1


def _reported_run(report: Path, exp_dir: Path) -> str | None:
    """The run directory the cell's own trainer reported, as a path under the cell's directory; None
    until it has (the file is written whole, by a rename). Never a directory that merely appeared
    there: a `minigpt train` started by hand with the same spec makes its runs beside the cell's."""
    try:
        reported = Path(report.read_text(encoding="utf-8").strip())
    except OSError:
        return None
    if not reported.is_absolute() or reported.parent != exp_dir.resolve():
        return None  # not written by the trainer we started
    return str(exp_dir / reported.name)


def _has_checkpoint(run_dir: str | None) -> bool:
    return bool(run_dir) and bool(list_checkpoints(Path(run_dir) / "checkpoints"))


def _submitit_executor(kind: str, root: Path, params: dict[str, Any], check_only: bool = False):
    try:
        import submitit
    except ImportError:
        raise AblationError(f"--executor {kind} needs the submitit package: pip install 'minigpt[cluster]' (or "
                            f"pip install submitit), then run the same command again.") from None
    if check_only:
        return None
    folder = root / "submitit"
    if kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=str(folder))
        params = {k: v for k, v in params.items() if k in ("timeout_min",)}
    else:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"timeout_min": 24 * 60, **params}
    try:
        ex.update_parameters(**params)
    except (TypeError, ValueError) as exc:
        raise AblationError(f"The ablation file's [executor] table does not suit submitit: {exc}. It takes "
                            f"submitit's parameters, e.g. timeout_min = 60, slurm_partition = \"gpu\", "
                            f"gpus_per_node = 1, cpus_per_task = 8, mem_gb = 32.") from None
    return ex


def start_manifest(plan: Plan) -> None:
    """Write a first manifest (every cell pending) if the ablation has none yet, so that `minigpt report` works
    on a study that is still searching its learning rates. The cells' specs in it are the untuned ones; the
    run after the search records the tuned ones (a pending cell's spec may change freely)."""
    from ..train.lock import RunLock, RunLockedError

    if read_manifest(plan.root) is not None:
        return
    plan.root.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(plan.root).acquire()
    except RunLockedError:
        raise AblationError(f"Another `minigpt ablate` is running this ablation ({plan.root}); wait for it to end, "
                            f"or stop it and run again.") from None
    try:
        if read_manifest(plan.root) is None:
            write_manifest(plan.root, reconcile(plan, None, force=False))
    finally:
        lock.release()


def check_evaluate(tasks: list[str]) -> None:
    """[evaluate]: lm_eval is installed and knows every task, before any cell runs."""
    try:
        import lm_eval  # noqa: F401  heavy: only for an ablation that evaluates
    except ImportError:
        raise AblationError("The ablation file's [evaluate] table needs EleutherAI's lm-evaluation-harness: pip install "
                            "'minigpt[eval]' (or pip install lm_eval), then run the same command again.") from None
    from ..downstream.tasks import task_manager

    task_manager(list(tasks))


def run_ablation(plan: Plan, *, jobs: int = 1, retry_failed: bool = False, force: bool = False,
                 executor: str = "local", write: Callable[[str], None] = print,
                 only: set[str] | None = None) -> dict[str, Any]:
    """Run every cell that is not done; returns the final manifest. A failing cell never stops the others.

    ``only``: the ids of the cells to run (a quick look); the others keep their state (missing if never run).
    """
    if executor not in EXECUTORS:
        raise AblationError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}.")
    if jobs < 1:
        raise AblationError(f"--jobs must be >= 1, not {jobs}.")
    if executor != "local":
        _submitit_executor(executor, plan.root, dict(plan.config.executor), check_only=True)
    if plan.config.evaluate is not None:
        check_evaluate(plan.config.evaluate.tasks)
    # Imported here: `minigpt --help` imports this module (EXECUTORS, for `ablate`'s arguments), and
    # minigpt_core.train loads the whole trainer.
    from ..train.lock import RunLock, RunLockedError

    root = plan.root
    read_manifest(root)  # a manifest that fails its checks is refused before anything is written
    root.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(root).acquire()
    except RunLockedError:
        raise AblationError(f"Another `minigpt ablate` is running this ablation ({root}); wait for it to end, or "
                            f"stop it (Ctrl-C saves the running cells' checkpoints) and run again.") from None
    try:
        manifest = reconcile(plan, read_manifest(root), force=force)
        manifest["settings"].update({"executor": executor, "jobs": jobs})
        cells = {c.id: c for c in plan.cells}
        for rec in manifest["cells"]:
            if rec["status"] == "running" and (rec.get("eval") or {}).get("status") == "running":
                rec["status"] = "done"  # trained; killed while evaluating: the evaluation runs again
                rec["eval"]["status"] = "pending"
            elif rec["status"] == "running":  # its process is gone (we hold the lock): an interrupted cell
                rec["status"] = "pending"
        todo = [r for r in manifest["cells"] if r["status"] == "pending" or (retry_failed and r["status"] == "failed")]
        options = plan.config.evaluate.model_dump() if plan.config.evaluate is not None else None
        to_eval = [r for r in manifest["cells"] if needs_evaluation(r, options, retry_failed)]
        if only is not None:
            todo = [r for r in todo if r["id"] in only]
            to_eval = [r for r in to_eval if r["id"] in only]
        skipped_failed = sum(1 for r in manifest["cells"] if r["status"] == "failed" and not retry_failed)
        write_manifest(root, manifest)
        done0 = sum(r["status"] == "done" for r in manifest["cells"])
        write(f"ablation {plan.name}: {len(manifest['cells'])} cells ({len(plan.variants)} variants x "
              f"{len(plan.config.seeds)} seeds) in {root}; {done0} done, {len(todo)} to run"
              + (f", {skipped_failed} failed (rerun them with --retry-failed)" if skipped_failed else "")
              + (f", {len(to_eval)} trained cell(s) to evaluate" if to_eval else "")
              + f"; budget: {plan.budget_summary}")
        _run_cells(plan, manifest, cells, todo, jobs=jobs, executor=executor, write=write, to_eval=to_eval,
                   options=options)
        return manifest
    finally:
        lock.release()


def _run_cells(plan: Plan, manifest: dict[str, Any], cells: dict[str, Cell], todo: list[dict[str, Any]], *,
               jobs: int, executor: str, write: Callable[[str], None], to_eval: list[dict[str, Any]] | None = None,
               options: dict[str, Any] | None = None) -> None:
    root = plan.root
    nproc = plan.config.nproc_per_node
    threads = max(1, cores() // (jobs * nproc)) if executor == "local" else max(1, cores() // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    sub = _submitit_executor(executor, root, dict(plan.config.executor)) if executor != "local" else None
    limit = jobs if executor != "slurm" else len(todo) + len(to_eval or [])  # slurm queues them all
    queue: list[tuple[dict[str, Any], str]] = [(r, "train") for r in todo] + [(r, "eval") for r in to_eval or []]
    active: list[_Active] = []
    finished = [0]
    interrupted: list[str] = []
    session_t0 = time.time()

    def start_eval(rec: dict[str, Any]) -> _Active:
        assert options is not None
        cell = cells[rec["id"]]
        run_dir = Path(rec["run_dir"])
        found = list_checkpoints(run_dir / "checkpoints")
        checkpoint = found[-1][1] if found else run_dir
        cmd = eval_command(checkpoint, run_dir / "eval", options, threads=threads)
        log = cell.exp_dir / CELL_LOG
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} evaluate: {' '.join(cmd)}\n")
        handle = launch(cmd, log, env, sub)
        rec["status"] = "running"
        rec["eval"] = {"status": "running", "options": options, "checkpoint": str(checkpoint),
                       "started": time.time(), "error": None}
        write(f"[{rec['id']}] evaluating {checkpoint.name} on {', '.join(options['tasks'])}; log: {log}")
        return _Active(rec, handle, log, cell.exp_dir / f"{RUN_DIR_FILE}.eval", time.time(), phase="eval")

    def start(rec: dict[str, Any], phase: str = "train") -> _Active:
        if phase == "eval":
            return start_eval(rec)
        cell = cells[rec["id"]]
        exp_dir = cell.exp_dir
        exp_dir.mkdir(parents=True, exist_ok=True)
        cell_file = exp_dir / CELL_FILE
        atomic_write_bytes(cell_file, dump_spec(cell.spec).encode("utf-8"))
        resume = rec["run_dir"] if rec["status"] != "failed" and _has_checkpoint(rec["run_dir"]) else None
        if rec["status"] == "failed" and rec["run_dir"]:
            rec["previous_runs"] = [*rec.get("previous_runs", []), rec["run_dir"]]
            rec["run_dir"] = None
        if not resume and rec["run_dir"]:  # killed before its first checkpoint: that run holds nothing to keep
            rec["previous_runs"] = [*rec.get("previous_runs", []), rec["run_dir"]]
            rec["run_dir"] = None
        report = exp_dir / f"{RUN_DIR_FILE}.{secrets.token_hex(4)}"  # this attempt's own: no stale answer
        cmd = cell_command(cell_file, threads=threads, resume=resume, nproc=nproc, run_dir_file=report)
        log = exp_dir / CELL_LOG
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                    f"{' '.join(cmd)}\n")
        handle = launch(cmd, log, env, sub)
        rec.update(status="running", error=None, attempts=rec.get("attempts", 0) + 1,
                   started=rec.get("started") or time.time(), host=socket.gethostname(),
                   job_id=str(getattr(handle, "job_id", getattr(handle, "pid", ""))))
        write(f"[{rec['id']}] {'resuming ' + str(resume) if resume else 'starting'} ({cell.steps} steps, "
              f"{cell.tokens:,} tokens{'; ' + cell.budget_note if cell.budget_note else ''}); log: {log}")
        return _Active(rec, handle, log, report, time.time())

    def finish_eval(a: _Active, rc: int) -> None:
        rec, ev = a.rec, a.rec["eval"]
        elapsed = time.time() - a.t0
        ev["seconds"] = round(elapsed, 3)
        rec["status"] = "done"  # trained in any case: an evaluation that did not finish runs again, not the cell
        if rc == 0:
            ev.update(status="done", error=None, finished=time.time())
            text = "evaluated"
        elif rc == _INTERRUPTED or rc == -signal.SIGINT or (stop.requested and rc == -signal.SIGTERM):
            ev.update(status="pending", error="interrupted; the next run of the ablation evaluates it again")
            text = "evaluation interrupted"
        else:
            ev.update(status="failed", error=last_error(a.log) + f" (exit status {rc}; full log: {a.log})")
            text = f"evaluation FAILED: {ev['error']}"
        counts = {s: sum(r["status"] == s for r in manifest["cells"]) for s in STATUSES}
        write(f"[{rec['id']}] {text} in {_duration(elapsed)} | cells: {counts['done']} done, {counts['failed']} "
              f"failed, {counts['pending'] + counts['running']} remaining")

    def finish(a: _Active, rc: int) -> None:
        rec = a.rec
        elapsed = time.time() - a.t0
        rec["wall_time_s"] = (rec.get("wall_time_s") or 0.0) + elapsed
        if rc == 0 and options is not None and not stop.requested:
            rec.update(error=None, finished=time.time())  # trained: `done` once its evaluation has run
            write(f"[{rec['id']}] trained in {_duration(elapsed)}; its final checkpoint is evaluated next")
            active.append(start_eval(rec))  # the cell's slot goes on to its evaluation
            return
        if rc == 0:
            rec.update(status="done", error=None, finished=time.time())
        elif rc == _INTERRUPTED or rc == -signal.SIGINT or (stop.requested and rc == -signal.SIGTERM):
            # SIGTERM: our stop request reached it in its start-up, before the trainer's handler (nothing lost)
            rec.update(status="pending", error="interrupted; the next run of the ablation resumes it")
            interrupted.append(rec["id"])
        elif rc < 0:  # killed from outside (out of memory, kill -9): its log ends mid-run
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            rec.update(status="failed", error=f"the cell's process was killed by {name} (out of memory? killed by "
                       f"hand?); --retry-failed runs the cell again. Full log: {a.log}")
        else:
            rec.update(status="failed", error=last_error(a.log) + f" (exit status {rc}; full log: {a.log})")
        counts = {s: sum(r["status"] == s for r in manifest["cells"]) for s in STATUSES}
        remaining = counts["pending"] + counts["running"]
        finished[0] += 1
        eta = ""
        if remaining and not stop.requested:  # session time per finished cell (parallel jobs included) x cells left
            eta = f", about {_duration((time.time() - session_t0) / finished[0] * remaining)} left"
        mark = {"done": "done", "failed": "FAILED", "pending": "interrupted"}[rec["status"]]
        write(f"[{rec['id']}] {mark} in {_duration(elapsed)}"
              + (f": {rec['error']}" if rec["status"] == "failed" else "")
              + f" | cells: {counts['done']} done, {counts['failed']} failed, {remaining} remaining{eta}")

    stop = _Stop().install()
    try:
        while (queue and not stop.requested) or active:
            while queue and len(active) < limit and not stop.requested:
                active.append(start(*queue.pop(0)))
                write_manifest(root, manifest)
            for a in active if stop.requested else ():
                _pass_on_stop(a, stop.presses)
            changed = False
            for a in list(active):
                rc = a.poll()  # before the report is read: a process that has ended has written all it will
                run = _reported_run(a.report, cells[a.rec["id"]].exp_dir) if a.phase == "train" else None
                if run is not None and run != a.rec["run_dir"]:
                    a.rec["run_dir"], changed = run, True
                if rc is not None:
                    a.report.unlink(missing_ok=True)
                    active.remove(a)
                    if isinstance(a.handle, subprocess.Popen) and rc in (_INTERRUPTED, -signal.SIGINT) \
                            and not stop.requested:  # someone stopped this cell by hand: stop the ablation
                        stop.presses, stop.why = 1, f"cell {a.rec['id']} was interrupted"
                    (finish_eval if a.phase == "eval" else finish)(a, rc)
                    changed = True
            if changed:
                manifest["updated"] = time.time()
                write_manifest(root, manifest)
            if stop.requested:  # a Slurm job goes on (its run locked until it ends): not waited for here
                active = [a for a in active if isinstance(a.handle, subprocess.Popen)]
            if active:
                time.sleep(0.1)
    except BaseException:
        # Ctrl-C reaches the cells too (same process group): they save a checkpoint and stop.
        for a in active:
            if not isinstance(a.handle, subprocess.Popen):
                continue  # a Slurm job goes on; its run is locked until it ends
            try:
                a.handle.wait(timeout=60)
            except subprocess.TimeoutExpired:
                a.handle.kill()
            if a.phase == "eval":  # trained: only the evaluation runs again
                a.rec["status"] = "done"
                a.rec["eval"].update(status="pending", error="interrupted; the next run of the ablation evaluates it "
                                     "again")
                continue
            a.rec["run_dir"] = _reported_run(a.report, cells[a.rec["id"]].exp_dir) or a.rec["run_dir"]
            a.report.unlink(missing_ok=True)
            a.rec.update(status="pending", error="interrupted; the next run of the ablation resumes it")
        write_manifest(root, manifest)
        raise
    finally:
        stop.uninstall()
    if stop.requested:
        left = sum(r["status"] in ("pending", "running") for r in manifest["cells"])
        raise AblationInterrupted(f"{stop.why}: {len(interrupted)} running cell(s) stopped"
                                  + (f" ({', '.join(interrupted)}; a checkpoint saved where it had started "
                                     f"training)" if interrupted else "")
                                  + f", no other cell started; {left} cell(s) left to run")


def _pass_on_stop(a: _Active, presses: int) -> None:
    """Ask a local cell to stop: SIGTERM first (the trainer saves a checkpoint and exits 130; a second
    one changes nothing, so a Ctrl-C that reached the cell too is harmless), SIGINT on a second press
    (the trainer's "stop now")."""
    if not isinstance(a.handle, subprocess.Popen) or a.told >= min(presses, 2):
        return
    with contextlib.suppress(ProcessLookupError):
        a.handle.send_signal(signal.SIGTERM if a.told == 0 else signal.SIGINT)
    a.told += 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
