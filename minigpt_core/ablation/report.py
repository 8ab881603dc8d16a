"""An ablation's report, rebuilt at any time from its manifest and its runs' metrics.jsonl.

``results.csv`` (one row per cell), ``report.md`` (one row per variant, with mean ± std over seeds,
then the statistics of each variant against the baseline: the noise floor, paired differences,
raw and corrected p-values, the minimum detectable effect and a verdict), ``curves.png`` and
``throughput.png``. Works on a partial ablation: cells without results are listed as failed or missing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..checkpoints.checkpoint import atomic_write_bytes
from ..runs import metric_series, read_metrics, summarize_run
from ..spec import WandbSpec
from ..train.loggers import wandb_mode
from ..viz._mpl import save_figure
from ..viz.curves import band_figure
from .file import ReportOptions
from .plan import AblationError
from .runner import MANIFEST_FILE, read_manifest
from .stats import POWER, Comparisons, compare_to_baseline, spread

__all__ = ["RESULT_COLUMNS", "COMPARISON_COLUMNS", "collect", "comparison_rows", "write_report", "ReportFiles"]

RESULT_COLUMNS = ("ablation", "variant", "overrides", "seed", "status", "final_val_loss", "best_val_loss",
                  "train_tokens", "steps", "parameters", "flops_per_token", "tokens_per_s", "peak_memory_mb",
                  "wall_time_s", "run_dir", "wandb_run_id", "error")

# The statistics table as W&B gets it (report.md shows the same, formatted).
COMPARISON_COLUMNS = ("variant", "pairs", "delta", "ci_low", "ci_high", "p_value", "p_adjusted", "sd_delta",
                      "delta_over_noise_floor", "mde", "seeds_for_noise_floor", "verdict")


def comparison_rows(c: Comparisons) -> list[list[Any]]:
    out = []
    for v, row in c.rows.items():
        d = row.diff
        out.append([v, d.n if d else 0, d.mean if d else None, d.ci_low if d else None, d.ci_high if d else None,
                    d.p_value if d else None, row.p_adjusted, d.std if d else None, row.floor_ratio, row.mde,
                    row.seeds_for_floor, row.verdict])
    return out


@dataclass
class ReportFiles:
    results: Path
    report: Path
    curves: Path
    throughput: Path
    rows: list[dict[str, Any]]
    curves_figure_lines: dict[str, int]  # variant -> the done cells its mean line and band are drawn from
    comparisons: Comparisons | None = None  # the variants against the baseline (final validation loss)


def _wandb_run_id(run_dir: Path) -> str:
    found = sorted((run_dir / "wandb").glob("*run-*")) if (run_dir / "wandb").is_dir() else []
    return found[-1].name.rsplit("-", 1)[-1] if found else ""


def collect(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(manifest, one row per cell, run_dir -> metrics records) of the ablation in ``root``."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise AblationError(f"{root} has no {MANIFEST_FILE}: it is not an ablation directory. Give the directory "
                            f"`minigpt ablate` wrote, e.g. runs/<ablation> (it prints it when it starts).")
    rows, records = [], {}
    for rec in manifest["cells"]:
        run_dir = Path(rec["run_dir"]) if rec.get("run_dir") else None
        row: dict[str, Any] = {k: None for k in RESULT_COLUMNS}
        status = rec["status"]
        if status == "pending":
            status = "missing"  # not run yet, or interrupted
        row.update(ablation=manifest["ablation"], variant=rec["variant"], seed=rec["seed"], status=status,
                   overrides=json.dumps(rec.get("overrides", {}), sort_keys=True), parameters=rec.get("params"),
                   flops_per_token=rec.get("flops_per_token"), error=rec.get("error") or "",
                   run_dir=str(run_dir) if run_dir else "", steps=rec.get("steps"))
        if run_dir is not None and run_dir.is_dir():
            recs = read_metrics(run_dir)
            records[str(run_dir)] = recs
            s = summarize_run(run_dir, recs)
            row.update(final_val_loss=s.final_val_loss, best_val_loss=s.best_val_loss, train_tokens=s.tokens,
                       tokens_per_s=s.tokens_per_s, peak_memory_mb=s.peak_memory_mb,
                       wall_time_s=rec.get("wall_time_s") or s.wall_time_s, wandb_run_id=_wandb_run_id(run_dir))
        rows.append(row)
    return manifest, rows, records


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _rel(v: float | None, base: float | None) -> str:
    if v is None or base is None or not base:
        return "—"
    return f"{v:,.0f} ({v / base:.2f}x)"


# Embedded user text (a description, an override, an error) must not become HTML, code or a table break.
_MD_ESCAPES = {"\\": "\\\\", "`": "\\`", "|": "\\|", "<": "&lt;", ">": "&gt;", "&": "&amp;",
               "[": "\\[", "]": "\\]", "*": "\\*", "\r": " ", "\n": " "}
_NOT_IN_CODE = set("\\`|<>\r\n")  # what an inline code span would not keep literal (or would let through)


def _md(text: Any, *, newlines: bool = False) -> str:
    """``text`` as escaped markdown; ``newlines`` keeps line breaks (free text; in a table cell they end the row)."""
    return "".join(ch if newlines and ch == "\n" else _MD_ESCAPES.get(ch, ch) for ch in str(text))


def _code(text: Any) -> str:
    """``text`` as inline code when a code span keeps it literal, else as escaped text."""
    text = str(text)
    return _md(text) if _NOT_IN_CODE & set(text) else f"`{text}`"


def _overrides_text(overrides: dict[str, Any]) -> str:
    return ", ".join(_code(f"{k}={json.dumps(v)}") for k, v in overrides.items()) or "(base)"


def _final_losses(variants: list[str], rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """variant -> seed -> final validation loss, of the cells that finished."""
    return {v: {r["seed"]: r["final_val_loss"] for r in rows if r["variant"] == v and r["status"] == "done"
                and r["final_val_loss"] is not None} for v in variants}


def _comparisons(manifest: dict[str, Any], variants: list[str], rows: list[dict[str, Any]]) -> Comparisons:
    settings = manifest.get("settings", {})
    try:
        options = ReportOptions(**settings.get("report", {}))
    except Exception:  # noqa: BLE001 - a hand-edited manifest: the defaults
        options = ReportOptions()
    return compare_to_baseline(_final_losses(variants, rows), settings.get("baseline"),
                               correction=options.correction, alpha=options.alpha)


_METHOD = {"holm": "Holm", "bonferroni": "Bonferroni", "none": "none"}


def _p(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def _statistics(c: Comparisons) -> list[str]:
    """The variants against the baseline: noise floor, corrected p-values, verdicts, detectable effects."""
    floor = (f"{c.noise_floor:.4f} nats/token, the seed-to-seed standard deviation of the baseline's final "
             f"validation loss (n = {c.baseline_seeds} seeds)" if c.noise_floor is not None else
             f"— (the baseline has {c.baseline_seeds} finished seed(s); a standard deviation needs 2)")
    method = _METHOD[c.correction]
    if c.correction == "none":
        adjust = (f"**Multiple comparisons:** none: the p-values are not adjusted for the {c.m} comparison(s) with "
                  f"the baseline (`correction = \"none\"`), so with many variants some will look significant "
                  f"by chance.")
    else:
        adjust = (f"**Multiple comparisons:** {method} over m = {c.m} comparison(s) with the baseline (the variants "
                  f"with ≥2 paired seeds), family-wise α = {c.alpha:g}.")
    step = (" (for Holm, its most stringent step)" if c.correction == "holm" else "")
    alpha_text = f"α/m = {c.test_alpha:.3g}{step}" if c.correction != "none" else f"α = {c.test_alpha:.3g}"
    lines = ["", "## Statistics", "",
             f"- **Noise floor:** {floor}.",
             f"- {adjust}",
             f"- **Verdict:** `better` / `worse` when the adjusted p-value is below {c.alpha:g} **and** |Δ| is "
             f"larger than the noise floor (lower loss is better), otherwise `no detectable difference`; a verdict "
             f"needs ≥3 paired seeds.",
             f"- **Δ** = variant − baseline over paired seeds, with its 95% Student-t interval and the paired "
             f"t-test's p (`scipy.stats.ttest_rel`). **MDE**: the smallest |Δ| (nats/token) the paired t-test "
             f"detects with {POWER:.0%} power at {alpha_text}, two-sided, from the standard deviation of the "
             f"paired differences (sd Δ) and the number of pairs. **Seeds for floor**: the paired seeds the same "
             f"test needs to detect an effect as small as the noise floor. A verdict also needs |Δ| above the "
             f"noise floor, so the smallest effect this design can call is the larger of the MDE and the floor.",
             "",
             f"| variant | pairs | Δ vs baseline [95% CI] | p | p adj. ({method}) | sd Δ | \\|Δ\\| / floor "
             f"| MDE ({POWER:.0%} power) | seeds for floor | verdict |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for v, row in c.rows.items():
        d = row.diff
        if d is None:
            delta = "—"
        elif d.ci_low is None:
            delta = f"{d.mean:+.4f} (no interval)"
        else:
            delta = f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        ratio = "—" if row.floor_ratio is None else f"{row.floor_ratio:.2f}"
        seeds = "—" if row.seeds_for_floor is None else f"{row.seeds_for_floor:,}"
        lines.append(f"| {_code(v)} | {d.n if d else 0} | {delta} | {_p(d.p_value if d else None)} "
                     f"| {_p(row.p_adjusted)} | {_fmt(d.std if d else None)} | {ratio} | {_fmt(row.mde)} | {seeds} "
                     f"| {row.verdict} |")
    return lines


def _markdown(manifest: dict[str, Any], rows: list[dict[str, Any]], files: dict[str, str],
              comparisons: Comparisons) -> str:
    settings = manifest.get("settings", {})
    baseline = settings.get("baseline")
    variants = list(manifest.get("variants", {})) or list(dict.fromkeys(r["variant"] for r in rows))
    by_var = {v: [r for r in rows if r["variant"] == v] for v in variants}
    final = _final_losses(variants, rows)
    base_rows = by_var.get(baseline, [])
    base_speed = spread([r["tokens_per_s"] for r in base_rows if r["tokens_per_s"]]).mean
    base_mem = spread([r["peak_memory_mb"] for r in base_rows if r["peak_memory_mb"]]).mean
    lines = [f"# Ablation {_code(manifest['ablation'])}", ""]
    if settings.get("description"):
        lines += [_md(settings["description"], newlines=True), ""]
    seeds = settings.get("seeds", [])
    lines += [
        f"- **Budget matched:** {settings.get('budget', 'tokens')}: {settings.get('budget_summary', '')}.",
        f"- **Seeds:** {', '.join(map(str, seeds))} (paired: seed s of every variant sees the same data order).",
        f"- **Baseline:** {_code(baseline)}. **Metric:** final validation loss (nats/token, lower is better).",
    ]
    if settings.get("set"):
        lines.append(f"- **--set:** {', '.join(_code(s) for s in settings['set'])}")
    lines += ["", "| variant | overrides | params | steps | val loss mean ± std (n) "
              "| tokens/s (vs baseline) | peak memory MB (vs baseline) | cells |",
              "|---|---|---:|---:|---|---:|---:|---|"]
    notes = []
    for v in variants:
        rs = by_var[v]
        sp = spread(list(final[v].values()))
        loss = f"{_fmt(sp.mean)} ± {_fmt(sp.std)} ({sp.n})" if sp.n > 1 else (
            f"{_fmt(sp.mean)} (1)" if sp.n == 1 else "— (0)")
        speed = spread([r["tokens_per_s"] for r in rs if r["tokens_per_s"]]).mean
        mem = spread([r["peak_memory_mb"] for r in rs if r["peak_memory_mb"]]).mean
        counts = {s: sum(r["status"] == s for r in rs) for s in ("done", "failed", "running", "missing")}
        cells = f"{counts['done']}/{len(rs)} done" + "".join(
            f", **{counts[s]} {s}**" for s in ("failed", "running", "missing") if counts[s])
        params = rs[0]["parameters"] if rs else None
        steps = rs[0]["steps"] if rs else None
        overrides = json.loads(rs[0]["overrides"]) if rs else {}
        lines.append(f"| {_code(v)} | {_overrides_text(overrides)} | {params:,} | {steps} | {loss} | "
                     f"{_rel(speed, base_speed)} | {_rel(mem, base_mem)} | {cells} |"
                     if params is not None else f"| {_code(v)} | {_overrides_text(overrides)} | — | — | {loss} "
                     f"| — | — | {cells} |")
    n_min = min((len(f) for f in final.values()), default=0)
    if n_min < 3:
        notes.append(f"Some variants have fewer than 3 finished seeds (n = {n_min}): with n = 2 the 95% interval "
                     f"uses t = 12.7 and with n = 1 there is none, so differences between variants say little; "
                     f"add seeds before reading the table.")
    failed = [r for r in rows if r["status"] in ("failed", "missing", "running")]
    if failed:
        notes.append("Cells without a result (the variant's statistics leave them out):")
        for r in failed:
            notes.append(f"  - {_code(r['variant'])} seed {_md(r['seed'])}: **{_md(r['status'])}**"
                         + (f": {_md(r['error'])}" if r["error"] else ""))
    if notes:
        lines += ["", *notes]
    lines += _statistics(comparisons)
    lines += _tuning(manifest, files)
    lines += ["", "Mean over seeds with a min-max band across seeds:", ""]
    for title, name in files.items():
        lines.append(f"![{title}]({name})")
    lines += ["", "Per-cell numbers: [results.csv](results.csv). Rebuild this report at any time with "
              f"`minigpt report {manifest['root']}`.", ""]
    return "\n".join(lines)


def _tuning_warnings(summary: dict[str, Any]) -> list[str]:
    return [f"variant {v}'s best {summary['param']} = {r['best']:g} is at the edge of the searched range "
            f"[{summary['low']:g}, {summary['high']:g}]: its best value may lie outside it; widen the range"
            for v, r in summary["variants"].items() if r.get("at_edge")]


def _tuning(manifest: dict[str, Any], files: dict[str, str]) -> list[str]:
    """The [tune] section: each variant's chosen value, from tune/summary.json (none without [tune])."""
    from .tune import read_summary

    summary = read_summary(manifest.get("root", ""))
    if summary is None:
        return []
    param = summary["param"]
    how = (f"a grid of {summary['trials']} values" if summary["sampler"] == "grid"
           else f"Optuna TPE, {summary['trials']} trials")
    lines = ["", f"## Tuned {_code(param)}", "",
             f"Each variant's {_code(param)} was searched over [{summary['low']:g}, {summary['high']:g}] ({how}) on "
             f"tuning seeds {', '.join(map(str, summary['seeds']))}, kept apart from the evaluation seeds; its best "
             f"value (lowest mean final validation loss) is used for its evaluation cells.", "",
             f"| variant | chosen {_md(param)} | tuning val loss | trials |", "|---|---:|---:|---:|"]
    for v, r in summary["variants"].items():
        lines.append(f"| {_code(v)} | {r['best']:g} | {_fmt(r['loss'])} | {len(r['trials'])} |")
    for w in _tuning_warnings(summary):
        lines += ["", f"**Warning:** {_md(w)}."]
    lines += ["", "![validation loss against learning rate](lr.png)"]
    return lines


def _lr_figure(root: Path) -> Path | None:
    from .tune import read_summary

    summary = read_summary(root)
    if summary is None:
        return None
    from ..viz._mpl import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v, r in summary["variants"].items():
        xs = [t[0] for t in r["trials"]]
        ys = [t[1] if t[1] is not None and math.isfinite(t[1]) else float("nan") for t in r["trials"]]
        (line,) = ax.plot(xs, ys, marker="o", label=v)
        ax.plot([r["best"]], [r["loss"]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel(summary["param"])
    ax.set_ylabel("final validation loss (tuning seeds)")
    ax.set_title("validation loss against " + summary["param"] + " (★ chosen)")
    ax.legend()
    return save_figure(fig, root / "lr.png")


def write_report(root: str | Path, *, log_wandb: bool = True,
                 write: Callable[[str], None] = print) -> ReportFiles:
    root = Path(root)
    manifest, rows, records = collect(root)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in RESULT_COLUMNS})
    atomic_write_bytes(root / "results.csv", buf.getvalue().encode("utf-8"))

    variants = list(manifest.get("variants", {})) or list(dict.fromkeys(r["variant"] for r in rows))

    def series(key: str) -> dict[str, list]:
        out: dict[str, list] = {v: [] for v in variants}
        for r in rows:
            # done cells only: a band and its legend's n=... then count the seeds a row of the table counts
            if r["status"] == "done" and r["run_dir"] and r["run_dir"] in records:
                xs, ys = metric_series(records[r["run_dir"]], key)
                if xs:
                    out[r["variant"]].append((xs, ys))
        return out

    val = series("val/loss")
    fig = band_figure(val, ylabel="validation loss (nats/token)", title=f"{manifest['ablation']}: validation loss")
    lines = {name: int(n.rstrip(")")) for name, n in
             (line.get_label().rsplit(" (n=", 1) for line in fig.axes[0].get_lines())}
    curves = save_figure(fig, root / "curves.png")
    fig = band_figure(series("train/tokens_per_s"), ylabel="training tokens/s",
                      title=f"{manifest['ablation']}: throughput")
    throughput = save_figure(fig, root / "throughput.png")
    comparisons = _comparisons(manifest, variants, rows)
    _lr_figure(root)
    text = _markdown(manifest, rows, {"validation loss": "curves.png", "throughput": "throughput.png"}, comparisons)
    atomic_write_bytes(root / "report.md", text.encode("utf-8"))
    files = ReportFiles(root / "results.csv", root / "report.md", curves, throughput, rows, lines, comparisons)
    if log_wandb:
        _log_to_wandb(manifest, rows, files, write)
    return files


def _log_to_wandb(manifest: dict[str, Any], rows: list[dict[str, Any]], files: ReportFiles,
                  write: Callable[[str], None]) -> None:
    """The report as a W&B run of its own (job_type "report" in the ablation's group), offline by default."""
    try:
        spec = WandbSpec(**manifest.get("settings", {}).get("wandb", {}))
    except Exception:  # noqa: BLE001 - an older manifest
        spec = WandbSpec()
    mode = wandb_mode(spec)
    if mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=spec.project, entity=spec.entity, group=manifest["ablation"], job_type="report",
                         name=f"{manifest['ablation']}-report", dir=str(files.report.parent), mode=mode,
                         config={"ablation": manifest["ablation"], **manifest.get("settings", {})},
                         settings=wandb.Settings(console="off", silent=True, save_code=False))
        table = wandb.Table(columns=list(RESULT_COLUMNS), data=[[r[k] for k in RESULT_COLUMNS] for r in rows])
        payload = {"results": table, "curves": wandb.Image(str(files.curves)),
                   "throughput": wandb.Image(str(files.throughput))}
        c = files.comparisons
        if c is not None:
            payload["comparisons"] = wandb.Table(columns=list(COMPARISON_COLUMNS), data=comparison_rows(c))
            run.summary.update({"noise_floor": c.noise_floor, "correction": c.correction, "comparisons": c.m,
                                "alpha": c.alpha})
        run.log(payload)
        run.finish()
        write(f"W&B {mode} report run: {Path(run.dir).parent}")
    except Exception as exc:  # noqa: BLE001 - the files are written; W&B is a copy
        write(f"warning: the report was not logged to W&B ({type(exc).__name__}: {exc}); the files are in "
              f"{files.report.parent}")
