"""``minigpt ablate``, ``report`` and ``plot``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ...ablation.plan import MAX_CELLS, ablation_root, flatten_overrides, load_plan, read_ablation_file
from ...ablation.runner import EXECUTORS, AblationInterrupted, cores, read_manifest, run_ablation, start_manifest
from ...base import toml as _toml
from ...base.errors import MinigptError
from ...base.reading import SPEC_LIMIT, read_text_bounded
from ..parser import arguments, command, _print_table

__all__ = ["run_label_fields", "resolve_run"]


# -- ablate -------------------------------------------------------------------------------------------
def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="ablation TOML file (docs/ablations.md; e.g. experiments/ablations/attention.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every cell, e.g. --set train.max_steps=20 to try the file quickly "
                        "(repeatable; recorded in the manifest)")
    p.add_argument("--dry-run", action="store_true", help="validate every cell and list them with their budgets; "
                                                          "run nothing")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, the CPU cores split between them "
                                                       "(train.threads; default 1)")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again (by default a rerun "
                                                               "skips them)")
    p.add_argument("--force", action="store_true", help="run cells whose spec the file now changes as new runs "
                                                        "(by default a changed finished cell is refused)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: processes on this machine (default); slurm: one Slurm job per cell through "
                        "submitit (pip install 'minigpt[cluster]'); submitit-local: submitit's local executor "
                        "(to try the slurm path on one machine)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--max-cells", type=int, default=MAX_CELLS, metavar="N",
                   help=f"refuse an ablation of more than N cells (default {MAX_CELLS}): raise it for a larger grid")
    p.add_argument("--variants", default=None, metavar="A,B",
                   help="run only these variants (a quick look; the other cells stay missing in the manifest "
                        "and the report until a run without it)")
    p.add_argument("--seeds", default=None, metavar="S,T",
                   help="run only these seeds (values from the file's seeds list), e.g. --variants a,b --seeds 1 "
                        "as a smoke test")


@command("ablate", "run an ablation: variants x seeds as ordinary runs, resumable, with a report at the end")
@arguments(_ablate_args)
def _ablate(args) -> int:
    from ...ablation.report import write_report

    if args.jobs < 1:
        raise MinigptError(f"--jobs must be >= 1, not {args.jobs}.")
    if args.max_cells < 1:
        raise MinigptError(f"--max-cells must be >= 1, not {args.max_cells}.")
    threads = max(1, cores() // args.jobs)
    # Time budgets timed earlier stay as they were: the cells' specs (and hashes) must not drift.

    time_steps = None
    cfg = read_ablation_file(args.file)
    if cfg.budget == "time":
        prior = read_manifest(ablation_root(args.file, args.overrides))
        if prior is not None:
            time_steps = {c["variant"]: c["steps"] for c in prior["cells"] if c.get("steps") is not None}

    def count(name: str, variants: int, seeds: int) -> None:  # before the cells are built: a big grid takes time
        what = "variant-size pairs" if cfg.scale is not None else "variants"
        print(f"ablation {name}: {variants * seeds} cells ({variants} {what} x {seeds} seeds); checking them",
              flush=True)

    plan = load_plan(args.file, args.overrides, time_steps=time_steps, probe=not args.dry_run, threads=threads,
                     max_cells=args.max_cells, on_count=count)
    only = _selected_cells(plan, args.variants, args.seeds)
    for group in plan.same_spec:
        print(f"warning: variants {', '.join(group)} resolve to the same spec: they would train the same model "
              f"the same way, and differ only in name. Give each its own overrides (e.g. name the component the "
              f"base already uses explicitly, so that a change of the base cannot merge them).", file=sys.stderr)
    from ...ablation.tune import apply_tuned, check_tuning, run_tuning, tuning_runs

    check_tuning(plan)
    if plan.config.evaluate is not None:  # lm_eval installed, every task known: before anything runs
        from ...ablation.runner import check_evaluate

        check_evaluate(plan.config.evaluate.tasks)
    tune = plan.config.tune
    if tune is not None:  # the cost, before anything runs
        n_tune = tuning_runs(plan)
        searched = (f"{len(plan.sizes)} sizes x {len(plan.variants)} variants" if plan.sizes
                    else f"{len(plan.variants)} variants")
        print(f"cost: {len(plan.cells)} cells + {searched} x {tune.n_trials()} trials x "
              f"{len(tune.seeds)} tuning seeds = {len(plan.cells) + n_tune} runs ({n_tune} for tuning "
              f"{tune.param})", flush=True)
    if args.dry_run:
        _print_plan(plan, only)
        return 0
    try:  # the search (with [tune]), then the cells
        if tune is not None:
            start_manifest(plan)
            selected = None if only is None else sorted({c.variant for c in plan.cells if c.id in only})
            chosen = run_tuning(plan, jobs=args.jobs, executor=args.executor, variants=selected,
                                write=lambda s: print(s, flush=True))
            for v, r in chosen.items():
                if r["at_edge"]:
                    print(f"warning: {v}'s best {tune.param} = {r['best']:g} is at the edge of the searched "
                          f"range: its best value may lie outside it; widen the range", file=sys.stderr, flush=True)
            apply_tuned(plan, chosen)
        manifest = run_ablation(plan, jobs=args.jobs, retry_failed=args.retry_failed, force=args.force,
                                executor=args.executor, write=lambda s: print(s, flush=True), only=only)
    except AblationInterrupted as exc:
        again = ["minigpt", "ablate", args.file, *[f"--set={s}" for s in args.overrides],
                 *(["--jobs", str(args.jobs)] if args.jobs != 1 else []),
                 *(["--executor", args.executor] if args.executor != "local" else []),
                 *(["--variants", args.variants] if args.variants else []),
                 *(["--seeds", args.seeds] if args.seeds else []),
                 *(["--max-cells", str(args.max_cells)] if args.max_cells != MAX_CELLS else [])]
        print(f"interrupted ({exc}); continue with: {shlex.join(again)}", file=sys.stderr, flush=True)
        return 130
    if not args.no_report:
        files = write_report(plan.root, write=print)
        print(f"report: {files.report} (table), {files.results}, {files.curves}, {files.throughput}"
              + (f", {files.scaling}, {files.scaling_flops}" if files.scaling else ""))
    cells = [c for c in manifest["cells"] if only is None or c["id"] in only]
    failed = [c for c in cells if c["status"] == "failed"]
    bad_eval = [c for c in cells if c["status"] == "done" and (c.get("eval") or {}).get("status") == "failed"]
    if bad_eval:
        print(f"{len(bad_eval)} evaluation(s) failed: {', '.join(c['id'] for c in bad_eval)} "
              f"({bad_eval[0]['eval'].get('error')}); after a fix `minigpt ablate {args.file} --retry-failed` "
              f"evaluates them again (their training is kept)", file=sys.stderr)
    left = [c for c in cells if c["status"] != "done"]
    if only is not None:
        print(f"{len(only)} of {len(manifest['cells'])} cells selected (--variants/--seeds); the others are "
              f"missing until `minigpt ablate {args.file}` runs them")
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(c['id'] for c in failed)}; see their errors in the "
              f"report; after a fix run `minigpt ablate {args.file} --retry-failed`", file=sys.stderr)
        return 1
    return 0 if not left and not bad_eval else 1


def _selected_cells(plan, variants: str | None, seeds: str | None) -> set[str] | None:
    """The ids of the cells --variants/--seeds pick (None: all of them)."""
    if variants is None and seeds is None:
        return None
    problems = []
    chosen_v = list(plan.variants)
    if variants is not None:
        chosen_v = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in chosen_v if v not in plan.variants]
        if unknown or not chosen_v:
            what = f"no variant named {', '.join(map(repr, unknown))}" if unknown else "names no variant"
            problems.append(f"--variants {variants!r}: {what}; the variants of {plan.file.name} are: "
                            f"{', '.join(plan.variants)}")
    chosen_s = list(plan.config.seeds)
    if seeds is not None:
        words = [w.strip() for w in seeds.split(",") if w.strip()]
        unknown = [w for w in words if not (w.isdigit() and int(w) in plan.config.seeds)]
        if unknown or not words:
            what = f"no seed {', '.join(unknown)} in the file" if unknown else "names no seed"
            problems.append(f"--seeds {seeds!r}: {what}; its seeds are: {', '.join(map(str, plan.config.seeds))}")
        else:
            chosen_s = [int(w) for w in words]
    if problems:
        raise MinigptError("; ".join(problems) + ". Nothing was run.")
    return {c.id for c in plan.cells if c.variant in chosen_v and c.seed in chosen_s}


def _print_plan(plan, only: set[str] | None = None) -> None:
    print(f"ablation {plan.name}: {len(plan.cells)} cells ({len(plan.variants)} variants x "
          f"{len(plan.config.seeds)} seeds), baseline {plan.baseline}, under {plan.root}")
    print(f"budget: {plan.config.budget}: {plan.budget_summary}")
    if plan.sizes:  # [scale]: sizes x variants x seeds
        print(f"scale: {len(plan.sizes)} sizes x {len(plan.variants)} variants x {len(plan.config.seeds)} seeds")
        _print_table([[s, ", ".join(f"{k}={v}" for k, v in info["overrides"].items()), f"{info['params']:,}",
                       str(info["steps"]), f"{info['tokens']:,}"] for s, info in plan.sizes.items()],
                     ["size", "overrides", "params (baseline)", "steps", "tokens"])
    rows = []
    for c in plan.cells:
        if only is not None and c.id not in only:
            continue
        ov = ", ".join(f"{k}={v}" for k, v in c.overrides.items()) or "(base)"
        rows.append([c.id, ov, f"{c.params:,}", f"{c.flops_per_token:,}", str(c.steps), f"{c.tokens:,}",
                     c.budget_note or "", c.spec_sha256[:12]])

    _print_table(rows, ["cell", "overrides", "params", "FLOPs/token", "steps", "tokens", "note", "spec sha256"])
    tune = plan.config.tune
    if tune is not None:
        from ...ablation.tune import tuning_rows

        print(f"tuning trials ({tune.param}, sampler {tune.sampler}; the evaluation cells above get each variant's "
              f"best value):")
        _print_table(tuning_rows(plan), ["trial", "value", "tuning seeds", "steps", "trial overrides"])
    if only is not None:
        print(f"{len(only)} of {len(plan.cells)} cells selected (--variants/--seeds)")
    print("all cells are valid; nothing was run (--dry-run)")


# -- report -------------------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ablation_dir", help="the ablation's directory (train.out_dir/<ablation>, holding manifest.json)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")


@command("report", "rebuild an ablation's results.csv, report.md and figures from its runs (partial ablations too)")
@arguments(_report_args)
def _report(args) -> int:
    from ...ablation.report import write_report

    files = write_report(args.ablation_dir, log_wandb=not args.no_wandb, write=print)
    print(files.report.read_text(encoding="utf-8"))
    print(f"written: {files.results}, {files.report}, {files.curves}, {files.throughput}")
    return 0


# -- plot ---------------------------------------------------------------------------------------------
def resolve_run(path: str | Path) -> Path:
    """A run directory, or an experiment directory's latest run (the one with the latest name)."""
    from ...train.loggers import METRICS_FILE

    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return path
    runs = sorted(p for p in path.iterdir() if (p / METRICS_FILE).is_file()) if path.is_dir() else []
    if not runs:
        raise MinigptError(f"{path} is neither a run directory (with {METRICS_FILE}) nor an experiment directory "
                           f"holding runs; give e.g. runs/quickstart or runs/quickstart/20260101-120000.")
    return runs[-1]


_IGNORED = ("train.out_dir", "train.threads", "train.device", "description", "plugins")


def run_label_fields(run_dirs: list[Path]) -> list[str]:
    """Per run, the spec fields that differ between the runs (``k=v, ...``), for legends."""
    flat = []
    for d in run_dirs:
        try:
            flat.append(flatten_overrides(_toml.loads(read_text_bounded(d / "spec.toml", "run spec", SPEC_LIMIT,
                                                                        OSError))))
        except (OSError, _toml.TOMLDecodeError):
            flat.append({})
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1
              and not k.startswith("wandb.") and k not in _IGNORED]
    if len(differ) > 1 and "name" in differ:
        differ.remove("name")
    labels = []
    for d, f in zip(run_dirs, flat):
        text = ", ".join(f"{k.removeprefix('model.')}={f.get(k, '-')}" for k in differ)
        labels.append(text or f"{d.parent.name}/{d.name}")
    if len(set(labels)) < len(labels):  # same settings: the run directories tell them apart
        labels = [f"{lab} ({d.name})" for lab, d in zip(labels, run_dirs)]
    return labels


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or experiment directories (their "
                                                          "latest run)")
    p.add_argument("--out", default=None, metavar="FILE.png", help="where the PNG goes (default: plot.png in the "
                                                                   "first run's directory)")


@command("plot", "plot train/validation loss, learning rate and tokens/s of one or more runs into a PNG")
@arguments(_plot_args)
def _plot(args) -> int:
    from ...runs import read_metrics
    from ...viz._mpl import save_figure
    from ...viz.curves import runs_figure

    run_dirs = [resolve_run(r) for r in args.runs]
    labels = run_label_fields(run_dirs)
    runs = [(label, read_metrics(d)) for label, d in zip(labels, run_dirs)]
    empty = [str(d) for d, (_, recs) in zip(run_dirs, runs) if not recs]
    if len(empty) == len(runs):
        raise MinigptError(f"No metrics to plot: {', '.join(empty)} logged nothing yet.")
    out = Path(args.out) if args.out else run_dirs[0] / "plot.png"
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise MinigptError(f"--out {out}: give a .png (or .svg, .pdf) file name.")
    save_figure(runs_figure(runs), out)
    for label, d in zip(labels, run_dirs):
        print(f"{label}: {d}")
    print(f"plot: {out}")
    return 0
