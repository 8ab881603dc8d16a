"""The [tune] search: each variant's learning rate (or another log-scale field) chosen on tuning seeds.

One Optuna study per variant in ``<root>/tune/<variant>.db`` (SQLite, study name = the variant),
with [scale] one per size and variant in ``<root>/tune/<size>/<variant>.db`` (the best learning
rate moves with the model's size), so a killed ablation resumes its searches: COMPLETE trials are
kept, a trial left RUNNING by a killed process is marked FAIL and its value asked again. Each
trial runs the variant's cell spec with the value (and the [tune] overrides) on every tuning seed,
as ordinary cell processes (``cell_command``) under ``<root>/tune/[<size>/]<variant>/<param>-<value>/seed-<s>``;
its objective is the mean final validation loss. The best value becomes an override of the
variant's evaluation cells (of that size). ``summary.json`` beside the studies records every trial
for the report, keyed by ``variant`` or ``size/variant``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..base import toml as _toml
from ..base.errors import MinigptError, SpecError
from ..checkpoints.checkpoint import atomic_write_bytes
from ..spec import ExperimentSpec, dump_spec, parse_spec
from .file import TuneOptions, _set_dotted
from .plan import AblationError, Plan
from .runner import (
    _INTERRUPTED,
    CELL_FILE,
    CELL_LOG,
    RUN_DIR_FILE,
    AblationInterrupted,
    _Active,
    _pass_on_stop,
    _reported_run,
    _Stop,
    _submitit_executor,
    cell_command,
    cores,
    last_error,
    launch,
)

__all__ = ["TUNE_DIR", "SUMMARY_FILE", "check_tuning", "tuning_rows", "tuning_runs", "run_tuning", "apply_tuned",
           "at_edge", "read_summary", "searches", "search_key"]

TUNE_DIR = "tune"
SUMMARY_FILE = "summary.json"
_EDGE = 0.05  # TPE: a best value within 5% of the log range of an end counts as at the edge


def _label(param: str, value: float) -> str:
    return f"{param.split('.')[-1]}-{value:.6g}"


def searches(plan: Plan) -> list[tuple[str, str]]:
    """(size, variant) of every search: one per variant, or with [scale] one per size and variant ("" no size)."""
    return [(size, variant) for size in (plan.sizes or {"": None}) for variant in plan.variants]


def search_key(size: str, variant: str) -> str:
    """How a search is named in the output, summary.json and the report: the variant, or size/variant."""
    return f"{size}/{variant}" if size else variant


def trial_spec(plan: Plan, variant: str, value: float, seed: int, size: str = "") -> ExperimentSpec:
    """The spec of one tuning run: the variant's evaluation cell with the value, the [tune] overrides and the seed."""
    tune = plan.config.tune
    assert tune is not None
    cell = next(c for c in plan.cells if c.variant == variant and c.size == size)
    raw = _toml.loads(dump_spec(cell.spec))
    for key, v in _flat(tune.overrides).items():
        _set_dotted(raw, key, v)
    _set_dotted(raw, tune.param, value)
    raw["name"], raw["seed"] = f"seed-{seed}", seed
    _set_dotted(raw, "train.out_dir", str(plan.root / TUNE_DIR / size / variant / _label(tune.param, value)))
    _set_dotted(raw, "wandb.job_type", "tune")  # the ablation's group; the evaluation cells have the variant's
    _set_dotted(raw, "wandb.config", {"ablation": plan.name, "variant": variant, "seed": seed, "tune": True,
                                      tune.param: value, "overrides": {**cell.overrides, tune.param: value},
                                      **({"size": size} if size else {})})
    return parse_spec(raw)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    from .file import flatten_overrides

    return flatten_overrides(d)


def check_tuning(plan: Plan) -> None:
    """Every variant's tuning runs are valid specs (at the range's ends), or one error listing every problem."""
    tune = plan.config.tune
    if tune is None:
        return
    problems = []
    values = tune.values()
    for size, variant in searches(plan):
        key = f"variant {variant!r}" + (f" at size {size!r}" if size else "")
        for value in (values[0], values[-1]):
            try:
                trial_spec(plan, variant, value, tune.seeds[0], size)
            except SpecError as exc:
                problems += [f"tuning runs of {key} ({tune.param} = {value:g}): {p}: {r}"
                             for p, r in exc.problems]
            except MinigptError as exc:
                problems.append(f"tuning runs of {key}: {exc}")
    if problems:
        problems = list(dict.fromkeys(problems))
        raise AblationError(f"Invalid [tune] in {plan.file}; nothing was run. {len(problems)} problem(s): "
                            + "; ".join(problems) + ". Fix [tune] (param, overrides or the range), then run again.")


def tuning_runs(plan: Plan) -> int:
    tune = plan.config.tune
    return 0 if tune is None else len(searches(plan)) * tune.n_trials() * len(tune.seeds)


def tuning_rows(plan: Plan) -> list[list[str]]:
    """The --dry-run listing of the tuning trials: one row per variant and value (TPE: per trial)."""
    tune = plan.config.tune
    if tune is None:
        return []
    seeds = ", ".join(map(str, tune.seeds))
    over = ", ".join(f"{k}={v}" for k, v in _flat(tune.overrides).items()) or "-"
    rows = []
    for size, variant in searches(plan):
        key = search_key(size, variant)
        steps = trial_spec(plan, variant, tune.values()[0], tune.seeds[0], size).train.max_steps
        if tune.sampler == "grid":
            rows += [[f"{key}/{_label(tune.param, v)}", f"{tune.param}={v:g}", seeds, str(steps), over]
                     for v in tune.values()]
        else:
            rows += [[f"{key}/trial-{i}", f"{tune.param} by TPE in [{tune.low:g}, {tune.high:g}]", seeds,
                      str(steps), over] for i in range(tune.n_trials())]
    return rows


# -- the search ---------------------------------------------------------------------------------------------
def _final_val(run_dir: str) -> float | None:
    from ..runs import metric_series, read_metrics

    _, ys = metric_series(read_metrics(Path(run_dir)), "val/loss")
    return float(ys[-1]) if ys else None


def _run_trial(plan: Plan, size: str, variant: str, value: float, jobs: int, threads: int, executor: str,
               stop: _Stop) -> float:
    """Mean final validation loss of the value over the tuning seeds (their runs as cell processes, or jobs
    of the --executor). A stop request (Ctrl-C, SIGTERM) is passed on to the runs, as to cells, and raises
    AblationInterrupted once they have ended; the trial then counts as not run."""
    tune = plan.config.tune
    assert tune is not None
    nproc = plan.config.nproc_per_node
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    sub = None if executor == "local" else _submitit_executor(executor, plan.root, dict(plan.config.executor))
    limit = jobs if executor != "slurm" else len(tune.seeds)  # slurm queues them all, as cells
    key = search_key(size, variant)
    queue, active, losses = list(tune.seeds), [], []

    def start(seed: int) -> tuple[_Active, Path]:
        spec = trial_spec(plan, variant, value, seed, size)
        exp_dir = Path(spec.train.out_dir) / spec.name
        exp_dir.mkdir(parents=True, exist_ok=True)
        cell_file = exp_dir / CELL_FILE
        atomic_write_bytes(cell_file, dump_spec(spec).encode("utf-8"))
        report = exp_dir / f"{RUN_DIR_FILE}.{secrets.token_hex(4)}"
        cmd = cell_command(cell_file, threads=threads, resume=None, nproc=nproc, run_dir_file=report)
        log = exp_dir / CELL_LOG
        with open(log, "ab") as out:
            out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} tune: {' '.join(cmd)}\n".encode())
        handle = launch(cmd, log, env, sub)
        return _Active({"id": f"{key}/{_label(tune.param, value)}/seed-{seed}"}, handle, log, report,
                       time.time()), exp_dir

    def end_all() -> None:  # Ctrl-C reaches local runs too; an error here stops them; a queued job is cancelled
        for a, _ in active:
            if not isinstance(a.handle, subprocess.Popen):
                with contextlib.suppress(Exception):
                    a.handle.cancel(check=False)
            elif a.handle.poll() is None:
                a.handle.terminate()
                try:
                    a.handle.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    a.handle.kill()

    try:
        while (queue and not stop.requested) or active:
            while queue and len(active) < limit and not stop.requested:
                active.append(start(queue.pop(0)))
            if stop.requested:
                for a, _ in active:
                    _pass_on_stop(a, stop.presses)
                if not all(isinstance(a.handle, subprocess.Popen) for a, _ in active):
                    end_all()
                    active = [(a, d) for a, d in active if isinstance(a.handle, subprocess.Popen)]
            for a, exp_dir in list(active):
                rc = a.poll()
                if rc is None:
                    continue
                active.remove((a, exp_dir))
                run = _reported_run(a.report, exp_dir)
                a.report.unlink(missing_ok=True)
                if stop.requested or rc in (_INTERRUPTED, -signal.SIGINT):
                    stop.presses = max(stop.presses, 1)  # a run stopped by hand stops the ablation, as a cell
                    stop.why = stop.why or f"tuning run {a.rec['id']} was interrupted"
                    continue
                loss = _final_val(run) if rc == 0 and run else None
                if rc != 0 or loss is None:
                    why = last_error(a.log) if rc != 0 else "it logged no validation loss"
                    raise AblationError(f"A tuning run of {key!r} ({tune.param} = {value:g}) failed: {why} "
                                        f"(exit status {rc}; log: {a.log}). Fix it and run the ablation again: the "
                                        f"search resumes where it stopped.")
                losses.append(loss)
            if active:
                time.sleep(0.1)
    except BaseException:
        end_all()
        raise
    if stop.requested:
        raise AblationInterrupted(f"{stop.why}: the search of {key} stopped in its trial of {tune.param} = "
                                  f"{value:g}, which runs again next time")
    mean = sum(losses) / len(losses)
    return mean if math.isfinite(mean) else float("inf")  # a diverged value: the worst, not a failed trial


def _optuna():
    import optuna

    # ERROR: a trial that raises (a failed or interrupted run) is logged at WARNING with its traceback, and
    # our own message says it already
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def _study(plan: Plan, size: str, variant: str, *, create: bool):
    optuna = _optuna()
    tune = plan.config.tune
    assert tune is not None
    db = plan.root / TUNE_DIR / size / f"{variant}.db"
    if not create and not db.is_file():
        return None
    db.parent.mkdir(parents=True, exist_ok=True)
    sampler = (optuna.samplers.GridSampler({tune.param: tune.values()}, seed=0) if tune.sampler == "grid"
               else optuna.samplers.TPESampler(seed=0, n_startup_trials=min(5, tune.n_trials())))
    return optuna.create_study(storage=f"sqlite:///{db}", study_name=search_key(size, variant), sampler=sampler,
                               direction="minimize", load_if_exists=True)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _completed(study, param: str) -> list[tuple[float, float]]:
    from optuna.trial import TrialState

    return [(t.params[param], t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if param in t.params]


_Trial = Callable[[str, str, float], float]  # (size, variant, value) -> the trial's mean final validation loss


def _search(plan: Plan, size: str, variant: str, run_trial: _Trial, stop: _Stop,
            write: Callable[[str], None]) -> list[tuple[float, float]]:
    from optuna.trial import TrialState

    tune = plan.config.tune
    assert tune is not None
    key = search_key(size, variant)
    study = _study(plan, size, variant, create=True)
    # We hold the tuning lock: a RUNNING trial is one whose ablation was killed; it is marked FAIL and its
    # value asked again (the grid: the values without a COMPLETE trial; TPE: enqueued)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if tune.param in t.params:
            if tune.sampler == "tpe":
                study.enqueue_trial({tune.param: t.params[tune.param]})
            write(f"[tune {key}] trial {t.number} ({tune.param} = {t.params[tune.param]:g}) was interrupted; "
                  f"it runs again")
    while True:
        done = _completed(study, tune.param)
        if tune.sampler == "grid":
            remaining = [v for v in tune.values() if not any(_same(v, d) for d, _ in done)]
            if not remaining:
                return done
            # A GridSampler over the values still to run: it counts a FAIL as visited, and this one
            # sees earlier trials (another search space) as none of its own
            study.sampler = _optuna().samplers.GridSampler({tune.param: remaining}, seed=0)
        elif len(done) >= tune.n_trials():
            return done
        if stop.requested:
            raise AblationInterrupted(f"{stop.why}: the search of {key} stopped between trials")
        # one trial through optimize(): the GridSampler stops the study from inside it when the grid is done
        try:
            study.optimize(lambda trial: _objective(plan, size, variant, trial, run_trial, write), n_trials=1,
                           catch=())
        except AblationInterrupted:  # Optuna marked the trial FAIL: the grid asks its value again, TPE is told to
            last = study.get_trials(deepcopy=False)[-1]
            if tune.sampler == "tpe" and tune.param in last.params:
                study.enqueue_trial({tune.param: last.params[tune.param]})
            raise


def _objective(plan: Plan, size: str, variant: str, trial, run_trial: _Trial, write: Callable[[str], None]) -> float:
    tune = plan.config.tune
    assert tune is not None
    key = search_key(size, variant)
    value = trial.suggest_float(tune.param, tune.values()[0], tune.values()[-1], log=True)
    write(f"[tune {key}] trial {trial.number}: {tune.param} = {value:g} on seeds "
          f"{', '.join(map(str, tune.seeds))}")
    loss = run_trial(size, variant, value)
    write(f"[tune {key}] trial {trial.number}: {tune.param} = {value:g}: validation loss {loss:.4f}")
    return loss


def at_edge(best: float, lo: float, hi: float, sampler: str) -> bool:
    if sampler == "grid":
        return _same(best, lo) or _same(best, hi)
    span = math.log(hi) - math.log(lo)
    return min(math.log(best) - math.log(lo), math.log(hi) - math.log(best)) <= _EDGE * span


def _result(tune: TuneOptions, done: list[tuple[float, float]], size: str, variant: str) -> dict[str, Any]:
    lo, hi = tune.values()[0], tune.values()[-1]
    trials = sorted(done)
    best_value, best_loss = min(trials, key=lambda t: (t[1], t[0]))
    return {"best": best_value, "loss": best_loss, "trials": [list(t) for t in trials],
            "at_edge": at_edge(best_value, lo, hi, tune.sampler), "variant": variant, "size": size}


def run_tuning(plan: Plan, *, jobs: int = 1, executor: str = "local", variants: list[str] | None = None,
               write: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run (or resume) the search of every variant in ``variants`` (default all; with [scale] at every size);
    returns and records in summary.json, keyed by ``search_key``, each search's {best, loss, trials, at_edge,
    variant, size}. Variants not searched keep a finished search. Ctrl-C or SIGTERM stops the running trial
    (it runs again next time) and raises AblationInterrupted, as the cells do."""
    tune = plan.config.tune
    if tune is None:
        return {}
    from ..train.lock import RunLock, RunLockedError

    tdir = plan.root / TUNE_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(tdir).acquire()
    except RunLockedError:
        raise AblationError(f"Another `minigpt ablate` is tuning this ablation ({tdir}); wait for it to end, or "
                            f"stop it and run again.") from None
    # --jobs N: a trial's seeds run in parallel up to N; with fewer seeds than N, several searches run at once
    # (each in a thread that waits on its runs), so a one-seed search still keeps N cores busy
    per_trial = min(jobs, len(tune.seeds))
    at_once = max(1, jobs // per_trial)
    threads = max(1, cores() // (per_trial * at_once * plan.config.nproc_per_node)) if executor == "local" else \
        max(1, cores() // plan.config.nproc_per_node)
    stop = _Stop().install()

    def run_trial(size: str, variant: str, value: float) -> float:
        return _run_trial(plan, size, variant, value, per_trial, threads, executor, stop)

    lo, hi = tune.values()[0], tune.values()[-1]
    chosen: dict[str, dict[str, Any]] = {}
    finished: dict[str, list[tuple[float, float]]] = {}
    guard = threading.Lock()

    def record(size: str, variant: str, done: list[tuple[float, float]], say: bool) -> None:
        # after every search: `minigpt report` on a study still searching shows the finished ones
        key = search_key(size, variant)
        with guard:
            finished[key] = done
            ordered = {search_key(s, v): _result(tune, finished[search_key(s, v)], s, v)
                       for s, v in searches(plan) if search_key(s, v) in finished}
            chosen.clear()
            chosen.update(ordered)  # in the file's order, whichever search ended first
            if say:
                write(f"[tune {key}] best {tune.param} = {chosen[key]['best']:g} (validation loss "
                      f"{chosen[key]['loss']:.4f} over {len(done)} trials)")
            summary = {"param": tune.param, "sampler": tune.sampler, "low": lo, "high": hi,
                       "seeds": list(tune.seeds), "trials": tune.n_trials(), "sizes": [s for s in plan.sizes],
                       "variants": dict(chosen)}
            atomic_write_bytes(tdir / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode("utf-8"))

    def search(size: str, variant: str) -> None:
        try:
            record(size, variant, _search(plan, size, variant, run_trial, stop, write), say=True)
        except AblationInterrupted:
            raise
        except BaseException:
            if not stop.requested:  # the other searches stop too: their trials run again next time
                stop.presses, stop.why = 1, f"the search of {search_key(size, variant)} failed"
            raise

    try:
        todo = []
        for size, variant in searches(plan):
            if variants is None or variant in variants:
                todo.append((size, variant))
                continue
            study = _study(plan, size, variant, create=False)  # not searched now: kept if finished
            done = _completed(study, tune.param) if study is not None else []
            if len(done) >= tune.n_trials():
                record(size, variant, done, say=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="tune") as pool:
            futures = [pool.submit(search, size, variant) for size, variant in todo]
            while not all(f.done() for f in futures):  # the main thread stays free for the Ctrl-C handler
                time.sleep(0.1)
        errors = [f.exception() for f in futures if f.exception() is not None]
        failed = [e for e in errors if not isinstance(e, AblationInterrupted)]
        if failed or errors:
            raise (failed or errors)[0]
        return chosen
    finally:
        stop.uninstall()
        lock.release()


def apply_tuned(plan: Plan, chosen: dict[str, dict[str, Any]]) -> None:
    """The best value becomes an override of the variant's evaluation cells (in their spec and its hash)."""
    import hashlib

    tune = plan.config.tune
    if tune is None:
        return
    for cell in plan.cells:
        key = search_key(cell.size, cell.variant)
        if key not in chosen:
            continue
        best = chosen[key]["best"]
        raw = _toml.loads(dump_spec(cell.spec))
        _set_dotted(raw, tune.param, best)
        cell.overrides = {**cell.overrides, tune.param: best}
        raw["wandb"]["config"] = {**raw["wandb"].get("config", {}), "overrides": dict(cell.overrides)}
        cell.spec = parse_spec(raw)
        cell.spec_sha256 = hashlib.sha256(dump_spec(cell.spec).encode("utf-8")).hexdigest()


def read_summary(root: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(root) / TUNE_DIR / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("variants"), dict) else None
