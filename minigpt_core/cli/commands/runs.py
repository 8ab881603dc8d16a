"""``minigpt runs`` (a table of runs and ablations) and ``minigpt diff`` (two runs side by side)."""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

from ..parser import arguments, command
from ...base.errors import MinigptError

WIDTH = 100  # the tables fit a 100-column terminal

# Fields that name a cell of an ablation rather than change it: its row name already says them.
_CELL_FIELDS = ("name", "seed", "wandb.group", "wandb.job_type", "wandb.tags")


def _value(v: Any) -> str:
    if v is None:
        return "(unset)"
    return (v or '""') if isinstance(v, str) else json.dumps(v)


def _clip(text: str, width: int, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return "…" + text[-(width - 1):] if keep_end else text[:width - 1] + "…"


def _loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) < 1000 else f"{v:.3g}"  # a diverging run's losses are huge


def _started(summary, run_dir: Path | None) -> str:
    if summary is not None and summary.started is not None:
        return datetime.fromtimestamp(summary.started).strftime("%m-%d %H:%M")
    try:  # no records: the directory's name is its start time
        return datetime.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S").strftime("%m-%d %H:%M")
    except (AttributeError, ValueError):
        return "-"


def _steps(summary) -> str:
    if summary is None or summary.updated is None:  # nothing logged yet
        return "-"
    return f"{summary.steps}/{summary.total_steps if summary.total_steps is not None else '?'}"


def _short_keys(keys) -> dict[str, str]:
    """Each dotted field by its shortest ending that no other field shares (train.lr -> lr), for the narrow column;
    a component slot by its own name (model.attention.name -> attention)."""
    full = sorted(set(keys))
    keys = [k.removesuffix(".name") if k.count(".") >= 2 and k.endswith(".name") else k for k in full]
    out = {}
    for original, key in zip(full, keys):
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        out[original] = tail
    return out


def _changes(fields: dict[str, Any], short: dict[str, str] | None = None) -> list[str]:
    return [f"{(short or {}).get(k, k)}={_value(v)}" for k, v in fields.items()]


def _wrap_items(items: list[str], width: int, max_lines: int = 4) -> list[str]:
    """Items joined by ', ' into lines of ``width``; one too long for a line breaks after its '='."""
    lines: list[str] = []
    cur = ""
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(piece) > width:
            if cur:
                lines.append(cur)
                cur = ""
            key, eq, value = piece.partition("=")
            parts = [key + eq, "  " + value] if eq else textwrap.wrap(piece, width, break_on_hyphens=False)
            lines += [_clip(p, width) for p in parts]
        elif cur and len(cur) + 1 + len(piece) <= width:
            cur += " " + piece
        else:
            if cur:
                lines.append(cur)
            cur = piece
    if cur:
        lines.append(cur)
    return lines if len(lines) <= max_lines else [*lines[:max_lines - 1], "…"]


def _run_json(run_dir: Path, summary, changes: dict[str, Any]) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "status": summary.status, "label": summary.label,
            "started": summary.started, "updated": summary.updated, "steps": summary.steps,
            "total_steps": summary.total_steps, "tokens": summary.tokens,
            "final_val_loss": summary.final_val_loss, "best_val_loss": summary.best_val_loss,
            "final_train_loss": summary.final_train_loss, "tokens_per_s": summary.tokens_per_s,
            "peak_memory_mb": summary.peak_memory_mb, "train_time_s": summary.train_time_s,
            "compile_s": summary.compile_s, "recompiles": summary.recompiles,
            "error": summary.error, "killed": summary.killed, "holder": summary.holder,
            "evaluations": {t: {"metric": e.metric, "value": e.value, "stderr": e.stderr}
                            for t, e in summary.evaluations.items()},
            "differs": changes}


# -- runs -----------------------------------------------------------------------------------
def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", nargs="?", default="runs",
                   help="a directory of runs (default ./runs, train.out_dir), an experiment directory, or an "
                        "ablation directory (its cells)")
    p.add_argument("--json", action="store_true", help="machine-readable output: one object per row")


def _ablation_row(root: Path, ablation: Path) -> tuple[list[str], dict[str, Any]]:
    from ...runs import ablation_cells, read_manifest

    cells = ablation_cells(ablation)
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    done = counts.get("done", 0)
    if counts.get("running"):
        status = "running"
    elif cells and done == len(cells):
        status = "done"
    elif cells and done + counts.get("failed", 0) == len(cells):
        status = "failed"
    else:
        status = "incomplete"
    starts = [c.summary.started for c in cells if c.summary is not None and c.summary.started is not None]
    started = datetime.fromtimestamp(min(starts)).strftime("%m-%d %H:%M") if starts else "-"
    name = str(ablation.relative_to(root)) if ablation != root else ablation.name
    row = [name + "/", started, status, f"{done}/{len(cells)} cells", "-", "-",
           ["ablation: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "no cells")]]
    manifest = read_manifest(ablation) or {}
    record = {"kind": "ablation", "name": name, "dir": str(ablation), "ablation": manifest.get("ablation"),
              "status": status, "cells": counts, "cells_total": len(cells)}
    return row, record


def _table(rows: list[list[Any]], notes: list[str], tasks: list[str] | None = None) -> None:
    """Rows of 7 cells, or 7 + one per task of ``tasks`` before the last (a row of one cell is an experiment's
    heading); the last column wraps. Task columns hold `minigpt evaluate`'s headline score (RUN/eval)."""
    tasks = tasks or []
    headers: list[Any] = ["run", "started", "status", "steps", "val", "best", *tasks, ["differs"]]
    last = len(headers) - 1
    numeric = {4, 5, *range(6, last)}
    full = [r for r in rows if len(r) > 1]
    fixed = [max([len(headers[i]), *(len(r[i]) for r in full)]) for i in range(1, last)]
    room = WIDTH - sum(fixed) - 2 * last  # for the name and the differences
    longest_name = max([len(headers[0]), *(len(r[0]) for r in full)])
    name_w = min(longest_name, max(room - 24, 24) if any(r[last] for r in full) else room)
    widths = [name_w, *fixed, max(room - name_w, 12)]
    if widths[last] >= len("differs from the other runs"):
        headers[last] = ["differs from the other runs"]
    for r in [headers, *rows]:
        if len(r) == 1:
            print(_clip(r[0], WIDTH, keep_end=True))
            continue
        wrapped = _wrap_items(r[last], widths[last]) or [""]
        cells = [_clip(r[0], widths[0], keep_end=True), *r[1:last], wrapped[0]]
        print("  ".join(c.rjust(w) if i in numeric and r is not headers else c.ljust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
        for more in wrapped[1:]:  # the differences go on under their column
            print(" " * (sum(widths[:last]) + 2 * last) + more)
    for note in notes:
        print(textwrap.fill(note, WIDTH, subsequent_indent="  ", break_on_hyphens=False) if note else "")


def _scores(summary, tasks: list[str]) -> list[str]:
    return [f"{summary.evaluations[t].value:.3f}" if summary is not None and t in summary.evaluations else "-"
            for t in tasks]


@command("runs", "list runs and ablations: status, steps, validation loss, and the spec fields that differ")
@arguments(_runs_args)
def _runs(args) -> int:
    from ...runs import (
        MANIFEST_FILE,
        ablation_cells,
        iter_ablation_dirs,
        iter_run_dirs,
        read_spec,
        spec_differences,
        summarize_run,
    )

    root = Path(args.out_dir)
    if not root.is_dir():
        raise MinigptError(f"{root} is not a directory. `minigpt runs` lists the runs under a directory: "
                           f"train.out_dir (default ./runs), one experiment's directory (runs/NAME) or an ablation "
                           f"(runs/ABLATION); run it where your runs are, or give the path.")
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    notes: list[str] = []

    short: dict[str, str] = {}  # filled in once the differences of every row are known
    summaries: dict[int, Any] = {}  # row index -> its run's summary (for the task columns, known at the end)

    def add_run(name: str, run: Path, summary, changes: dict[str, Any], extra: dict[str, Any],
                shown: str | None = None) -> None:
        status = summary.status + ("?" if summary.killed else "")
        summaries[len(rows)] = summary
        rows.append([shown or name, _started(summary, run), status, _steps(summary), _loss(summary.final_val_loss),
                     _loss(summary.best_val_loss), changes])
        records.append({"kind": extra.pop("kind", "run"), "name": name, **extra, **_run_json(run, summary, changes)})
        if summary.error:
            notes.append(f"{name} {summary.status}: {_clip(' '.join(summary.error.split()), 400)}")

    if (root / MANIFEST_FILE).is_file():  # an ablation: one row per cell
        cells = ablation_cells(root)
        specs = {i: read_spec(c.run_dir) for i, c in enumerate(cells) if c.run_dir is not None}
        diffs = spec_differences(specs)
        for i, c in enumerate(cells):
            name = f"{c.variant}/seed-{c.seed}" if c.seed is not None else c.variant
            changes = {k: v for k, v in diffs.get(i, {}).items() if k not in _CELL_FIELDS}
            extra = {"kind": "cell", "variant": c.variant, "seed": c.seed, "cell_status": c.status}
            if c.summary is None:
                rows.append([name, "-", c.status, "-", "-", "-", {}])
                records.append({"name": name, **extra, "run_dir": None, "status": c.status, "error": c.error})
            else:
                add_run(name, c.run_dir, c.summary, changes, extra)
                rows[-1][2] = c.status
                records[-1]["status"] = c.status
            if c.error and not (c.summary is not None and c.summary.error):
                notes.append(f"{name} {c.status}: {_clip(' '.join(c.error.split()), 400)}")
    else:
        ablations = list(iter_ablation_dirs(root))
        runs = [r for r in iter_run_dirs(root) if not any(a in r.parents or a == r for a in ablations)]
        groups: dict[Path, list[Path]] = {}
        for run in runs:
            groups.setdefault(run.parent, []).append(run)
        diffs: dict[Path, dict[str, Any]] = {}
        for members in groups.values():
            diffs.update(spec_differences({r: read_spec(r) for r in members}))
        entries: list[tuple[str, Any]] = [(str(r.relative_to(root)) if r != root else r.name, r) for r in runs]
        entries += [(str(a.relative_to(root)) if a != root else a.name, a) for a in ablations]
        heading = None
        for name, path in sorted(entries, key=lambda e: e[0]):
            if path in ablations:
                row, record = _ablation_row(root, path)
                rows.append(row)
                records.append(record)
                heading = None
                continue
            shown = None
            if path != root and path.parent != root:  # the runs of an experiment under its name
                group = str(path.parent.relative_to(root)) + "/"
                if group != heading:
                    rows.append([group])
                    heading = group
                shown = "  " + path.name
            add_run(name, path, summarize_run(path), diffs.get(path, {}), {}, shown)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    if not rows:
        print(f"no runs under {root} (a run directory holds spec.toml and metrics.jsonl)")
        return 0
    short.update(_short_keys(k for r in rows if len(r) == 7 and isinstance(r[6], dict) for k in r[6]))
    for r in rows:
        if len(r) == 7 and isinstance(r[6], dict):
            r[6] = _changes(r[6], short)
    if any(len(r) > 2 and r[2].endswith("?") for r in rows):
        notes.append("interrupted?: stopped without a word (killed, or the machine went down); "
                     "`minigpt train --resume RUN` continues from its last checkpoint")
    tasks = sorted({t for s in summaries.values() for t in s.evaluations})
    if tasks:
        for i, r in enumerate(rows):
            if len(r) == 7:
                r[6:6] = _scores(summaries.get(i), tasks)
        metrics = sorted({f"{t}: {s.evaluations[t].metric}" for s in summaries.values() for t in s.evaluations})
        notes.append("task columns: `minigpt evaluate`'s score of the run's checkpoint (RUN/eval/<task>.json): "
                     + ", ".join(metrics))
    _table(rows, ["", *notes] if notes else [], tasks)
    return 0


# -- diff -----------------------------------------------------------------------------------
def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", help="a run directory, a checkpoint, or an experiment directory (its latest run)")
    p.add_argument("run_b", help="the run to compare it with (the same kinds of path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _metric_rows(a, b) -> list[tuple[str, str, str, str]]:
    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    def delta(x, y, fmt, relative=False):
        if x is None or y is None or not all(math.isfinite(float(v)) for v in (x, y)):
            return ""
        if relative:
            return f"{(y - x) / x:+.1%}" if x else ""
        return format(y - x, "+" + fmt)

    rows = [("status", a.status, b.status, "")]
    for label, key, fmt, rel in (("steps", "steps", ",d", False), ("training tokens", "tokens", ",d", False),
                                 ("final val loss", "final_val_loss", ".4f", False),
                                 ("best val loss", "best_val_loss", ".4f", False),
                                 ("final train loss", "final_train_loss", ".4f", False),
                                 ("tokens/s (median)", "tokens_per_s", ",.0f", True),
                                 ("peak memory (MB)", "peak_memory_mb", ",.0f", True)):
        x, y = getattr(a, key), getattr(b, key)
        rows.append((label, num(x, fmt), num(y, fmt), delta(x, y, fmt, rel)))
    ta, tb = a.train_time_s, b.train_time_s
    rows.append(("training time", _duration(ta), _duration(tb),
                 "" if ta is None or tb is None else f"{tb - ta:+.1f} s"))
    return rows


@command("diff", "the spec fields that differ between two runs, and their metrics side by side")
@arguments(_diff_args)
def _diff(args) -> int:
    from ...runs import diff_specs, read_spec, resolve_run, summarize_run

    run_a, run_b = resolve_run(args.run_a), resolve_run(args.run_b)
    spec_a, spec_b = read_spec(run_a), read_spec(run_b)
    fields = diff_specs(spec_a, spec_b)
    sa, sb = summarize_run(run_a), summarize_run(run_b)
    metrics = _metric_rows(sa, sb)
    if args.json:
        print(json.dumps({"a": str(run_a), "b": str(run_b), "spec": {k: list(v) for k, v in fields.items()},
                          "metrics": {"a": _run_json(run_a, sa, {}), "b": _run_json(run_b, sb, {})}}, indent=1))
        return 0
    print(f"A: {run_a}")
    print(f"B: {run_b}")
    for which, path, spec in (("A", run_a, spec_a), ("B", run_b, spec_b)):
        if not spec:
            print(f"note: {which} has no readable spec.toml ({path / 'spec.toml'}); its fields show as (unset)")
    print()
    if fields:
        key_w = min(max(len("spec field"), *(len(k) for k in fields)), 40)
        val_w = (WIDTH - key_w - 4) // 2
        print(f"{'spec field'.ljust(key_w)}  {'A'.ljust(val_w)}  B")
        for k, (x, y) in fields.items():
            print(f"{_clip(k, key_w, keep_end=True).ljust(key_w)}  {_clip(_value(x), val_w).ljust(val_w)}  "
                  f"{_clip(_value(y), val_w)}".rstrip())
    else:
        print("the specs are identical")
    print()
    widths = [max(len(r[i]) for r in [("metric", "A", "B", "B - A"), *metrics]) for i in range(4)]
    for i, r in enumerate([("metric", "A", "B", "B - A"), *metrics]):
        print("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]).rstrip())
    return 0
