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
from ..downstream.results import TaskScore
from ..runs import metric_series, read_metrics, summarize_run
from ..spec import WandbSpec
from ..train.loggers import wandb_mode
from ..viz._mpl import save_figure
from ..viz.curves import band_figure
from .file import ReportOptions
from .plan import AblationError
from .runner import MANIFEST_FILE, read_manifest
from .stats import (
    POWER,
    Comparisons,
    PowerLawFit,
    compare_to_baseline,
    effect_trend,
    fit_power_law,
    paired_difference,
    spread,
)

__all__ = ["RESULT_COLUMNS", "COMPARISON_COLUMNS", "collect", "comparison_rows", "write_report", "ReportFiles",
           "eval_columns", "disagreements"]

RESULT_COLUMNS = ("ablation", "variant", "overrides", "seed", "status", "final_val_loss", "best_val_loss",
                  "train_tokens", "steps", "parameters", "flops_per_token", "tokens_per_s", "peak_memory_mb",
                  "wall_time_s", "run_dir", "wandb_run_id", "error", "size")

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
    # with [scale]: per size, the variants against that size's baseline; the scaling figures and fits
    by_size: dict[str, Comparisons] | None = None
    scaling: Path | None = None
    scaling_flops: Path | None = None
    fits: dict[str, PowerLawFit | None] | None = None
    trends: dict[str, str] | None = None


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
                   run_dir=str(run_dir) if run_dir else "", steps=rec.get("steps"),
                   # a [scale] cell's id is <size>/<variant>/seed-<s> (names hold no '/')
                   size=rec.get("size") or (rec["id"].split("/")[0] if rec["id"].count("/") == 2 else ""))
        row["eval"] = {}  # task -> its headline score ([evaluate]; not a column of its own: see eval_columns)
        if run_dir is not None and run_dir.is_dir():
            recs = read_metrics(run_dir)
            records[str(run_dir)] = recs
            s = summarize_run(run_dir, recs)
            row.update(final_val_loss=s.final_val_loss, best_val_loss=s.best_val_loss, train_tokens=s.tokens,
                       tokens_per_s=s.tokens_per_s, peak_memory_mb=s.peak_memory_mb,
                       wall_time_s=rec.get("wall_time_s") or s.wall_time_s, wandb_run_id=_wandb_run_id(run_dir))
            if status == "done":
                row["eval"] = dict(s.evaluations)
        rows.append(row)
    return manifest, rows, records


def eval_columns(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """results.csv's task columns, ``<task>/<metric>`` -> (task, metric), from the cells' evaluations (sorted)."""
    found = {f"{t}/{e.metric}": (t, e.metric) for r in rows for t, e in r.get("eval", {}).items()}
    return dict(sorted(found.items()))


def _task_values(variants: list[str], rows: list[dict[str, Any]], task: str, metric: str
                 ) -> dict[str, dict[int, float]]:
    """variant -> seed -> the task's score, of the cells that finished and were evaluated."""
    out: dict[str, dict[int, float]] = {v: {} for v in variants}
    for r in rows:
        e: TaskScore | None = r.get("eval", {}).get(task)
        if r["status"] == "done" and e is not None and e.metric == metric and r["variant"] in out:
            out[r["variant"]][r["seed"]] = e.value
    return out


_LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def disagreements(variants: list[str], rows: list[dict[str, Any]], baseline: str | None
                  ) -> dict[str, dict[str, tuple[float, float]]]:
    """task -> variant -> (Δ val loss, Δ score) where the two differences point different ways: a lower loss with a
    worse score, or a higher loss with a better one (the paired means over seeds; a zero difference agrees)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    losses = _final_losses(variants, rows)
    for task, (name, metric) in ((c, tm) for c, tm in eval_columns(rows).items()):
        scores = _task_values(variants, rows, name, metric)
        sign = -1.0 if metric in _LOWER_IS_BETTER else 1.0  # +: better
        for v in variants:
            if v == baseline or baseline not in scores:
                continue
            dl = paired_difference(losses.get(v, {}), losses.get(baseline, {}))
            da = paired_difference(scores[v], scores[baseline])
            if dl is None or da is None:
                continue
            if (dl.mean < 0 and sign * da.mean < 0) or (dl.mean > 0 and sign * da.mean > 0):
                out.setdefault(task, {})[v] = (dl.mean, da.mean)
    return out


def _interval(d) -> str:
    if d is None:
        return "—"
    if d.ci_low is None:
        return f"{d.mean:+.4f} (no interval)"
    return f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"


def _downstream(manifest: dict[str, Any], variants: list[str], rows: list[dict[str, Any]], baseline: str | None,
                heading: str = "## Downstream tasks") -> list[str]:
    """Each task's score mean ± std and its paired difference with the baseline, next to the validation loss's;
    variants whose loss and score differences disagree in sign are marked."""
    columns = eval_columns(rows)
    if not columns:
        return []
    options = manifest.get("settings", {}).get("evaluate") or {}
    how = []
    if options.get("tasks"):
        how.append("tasks " + ", ".join(_code(t) for t in options["tasks"]))
    if options.get("limit") is not None:
        how.append(f"at most {options['limit']:g} examples per task")
    if options.get("num_fewshot") is not None:
        how.append(f"{options['num_fewshot']}-shot")
    losses = _final_losses(variants, rows)
    disagree = disagreements(variants, rows, baseline)
    lines = ["", heading, "",
             "Each cell's final checkpoint scored by EleutherAI's lm-evaluation-harness (`minigpt evaluate`"
             + (f"; [evaluate]: {', '.join(how)}" if how else "") + "), next to its final validation loss. Δ = "
             "variant − baseline over paired seeds, with its 95% Student-t interval (as above). **Disagree** marks a "
             "variant whose loss and score move different ways: a lower loss with a worse score, or a higher loss "
             "with a better one (the signs of the mean differences; check the intervals before reading much into "
             "it)."]
    for column, (task, metric) in columns.items():
        scores = _task_values(variants, rows, task, metric)
        better = "lower" if metric in _LOWER_IS_BETTER else "higher"
        lines += ["", f"### {_code(task)}: {_md(metric)} ({better} is better)", "",
                  f"| variant | val loss mean ± std (n) | Δ val loss [95% CI] | {_md(metric)} mean ± std (n) "
                  f"| Δ {_md(metric)} [95% CI] | p | loss and {_md(metric)} |",
                  "|---|---|---|---|---|---:|---|"]
        for v in variants:
            sl, sa = spread(list(losses.get(v, {}).values())), spread(list(scores[v].values()))

            def ms(sp: Any) -> str:
                return (f"{_fmt(sp.mean)} ± {_fmt(sp.std)} ({sp.n})" if sp.n > 1 else
                        f"{_fmt(sp.mean)} (1)" if sp.n == 1 else "— (0)")

            if v == baseline:
                lines.append(f"| {_code(v)} | {ms(sl)} | baseline | {ms(sa)} | baseline | | |")
                continue
            dl = paired_difference(losses.get(v, {}), losses.get(baseline, {}))
            da = paired_difference(scores[v], scores.get(baseline, {}))
            mark = "—" if dl is None or da is None else ("**disagree**" if v in disagree.get(column, {}) else "agree")
            lines.append(f"| {_code(v)} | {ms(sl)} | {_interval(dl)} | {ms(sa)} | {_interval(da)} "
                         f"| {_p(da.p_value if da else None)} | {mark} |")
    flagged = [f"{_code(v)} ({_code(c.split('/')[0])})" for c, vs in disagree.items() for v in vs]
    lines += ["", "**Loss and task score disagree in sign:** " + (", ".join(flagged) if flagged else "none") + "."]
    return lines


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


def _statistics(c: Comparisons, heading: str = "## Statistics") -> list[str]:
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
    lines = ["", heading, "",
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
              comparisons: Comparisons | dict[str, Comparisons], scaling: list[str] | None = None) -> str:
    settings = manifest.get("settings", {})
    baseline = settings.get("baseline")
    variants = list(manifest.get("variants", {})) or list(dict.fromkeys(r["variant"] for r in rows))
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
    if isinstance(comparisons, dict):  # [scale]: a table and statistics per size, then the scaling section
        for size, c in comparisons.items():
            info = settings.get("scale", {}).get("sizes", {}).get(size, {})
            lines += ["", f"## Size {_code(size)}: {info.get('params', 0):,} parameters (baseline), "
                      f"{info.get('steps')} steps, {info.get('tokens', 0):,} tokens; "
                      f"{_overrides_text(info.get('overrides', {}))}"]
            lines += _variant_table(variants, [r for r in rows if r["size"] == size], baseline)
            lines += _statistics(c, f"### Statistics at size {_code(size)}")
            lines += _downstream(manifest, variants, [r for r in rows if r["size"] == size], baseline,
                                 f"### Downstream tasks at size {_code(size)}")
        lines += scaling or []
    else:
        lines += _variant_table(variants, rows, baseline)
        lines += _statistics(comparisons)
        lines += _downstream(manifest, variants, rows, baseline)
    lines += _tuning(manifest, files)
    lines += ["", "Mean over seeds with a min-max band across seeds:", ""]
    for title, name in files.items():
        lines.append(f"![{title}]({name})")
    lines += ["", "Per-cell numbers: [results.csv](results.csv). Rebuild this report at any time with "
              f"`minigpt report {manifest['root']}`.", ""]
    return "\n".join(lines)


def _variant_table(variants: list[str], rows: list[dict[str, Any]], baseline: str | None) -> list[str]:
    """One row per variant (mean ± std over seeds, speed and memory against the baseline), then notes."""
    by_var = {v: [r for r in rows if r["variant"] == v] for v in variants}
    final = _final_losses(variants, rows)
    base_rows = by_var.get(baseline, [])
    base_speed = spread([r["tokens_per_s"] for r in base_rows if r["tokens_per_s"]]).mean
    base_mem = spread([r["peak_memory_mb"] for r in base_rows if r["peak_memory_mb"]]).mean
    lines = ["", "| variant | overrides | params | steps | val loss mean ± std (n) "
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
    return lines


def _tuning_warnings(summary: dict[str, Any]) -> list[str]:
    return [f"{'' if r.get('size') else 'variant '}{v}'s best {summary['param']} = {r['best']:g} is at the edge of "
            f"the searched range [{summary['low']:g}, {summary['high']:g}]: its best value may lie outside it; widen "
            f"the range" for v, r in summary["variants"].items() if r.get("at_edge")]


def _tuning(manifest: dict[str, Any], files: dict[str, str]) -> list[str]:
    """The [tune] section: each variant's (with [scale]: each size's) chosen value, from tune/summary.json."""
    from .tune import read_summary

    summary = read_summary(manifest.get("root", ""))
    if summary is None:
        return []
    param = summary["param"]
    sized = bool(summary.get("sizes"))
    how = (f"a grid of {summary['trials']} values" if summary["sampler"] == "grid"
           else f"Optuna TPE, {summary['trials']} trials")
    lines = ["", f"## Tuned {_code(param)}", "",
             f"Each variant's {_code(param)} was searched{' at every size' if sized else ''} over "
             f"[{summary['low']:g}, {summary['high']:g}] ({how}) on tuning seeds "
             f"{', '.join(map(str, summary['seeds']))}, kept apart from the evaluation seeds; its best value (lowest "
             f"mean final validation loss) is used for its evaluation cells{' of that size' if sized else ''}.", "",
             f"| {'size | ' if sized else ''}variant | chosen {_md(param)} | tuning val loss | trials |",
             f"|{'---|' if sized else ''}---|---:|---:|---:|"]
    for v, r in summary["variants"].items():
        size = f"{_code(r.get('size', ''))} | " if sized else ""
        lines.append(f"| {size}{_code(r.get('variant', v))} | {r['best']:g} | {_fmt(r['loss'])} | "
                     f"{len(r['trials'])} |")
    for w in _tuning_warnings(summary):
        lines += ["", f"**Warning:** {_md(w)}."]
    lines += ["", "![validation loss against learning rate](lr.png)"]
    return lines


def _ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _lr_figure(root: Path) -> Path | None:
    """Validation loss against the searched value, one line per variant (with [scale]: one panel per size)."""
    from .tune import read_summary

    summary = read_summary(root)
    if summary is None:
        return None
    from ..viz._mpl import pyplot

    plt = pyplot()
    sizes = list(summary.get("sizes") or [""])
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.4 if len(sizes) == 1 else 4.2 * len(sizes), 4.2),
                             squeeze=False, sharey=len(sizes) > 1)
    colors: dict[str, Any] = {}  # a variant keeps its colour across the panels
    for ax, size in zip(axes[0], sizes):
        for key, r in summary["variants"].items():
            if r.get("size", "") != size:
                continue
            variant = r.get("variant", key)
            xs = [t[0] for t in r["trials"]]
            ys = [t[1] if t[1] is not None and math.isfinite(t[1]) else float("nan") for t in r["trials"]]
            (line,) = ax.plot(xs, ys, marker="o", label=variant, color=colors.get(variant))
            colors.setdefault(variant, line.get_color())
            ax.plot([r["best"]], [r["loss"]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log")
        values = sorted({t[0] for r in summary["variants"].values() for t in r["trials"]})
        if len(values) <= 8:  # a grid: its values as the ticks, written plainly (log's minor labels collide)
            ax.set_xticks(values, [f"{x:g}" for x in values])
            ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
        ax.set_xlabel(summary["param"])
        if size:
            ax.set_title(f"size {size}")
    axes[0][0].legend()
    axes[0][0].set_ylabel("final validation loss (tuning seeds)")
    title = "validation loss against " + summary["param"] + " (★ chosen)"
    if len(sizes) > 1:
        fig.suptitle(title)
    else:
        axes[0][0].set_title(title)
    return save_figure(fig, root / "lr.png")


def write_report(root: str | Path, *, log_wandb: bool = True,
                 write: Callable[[str], None] = print) -> ReportFiles:
    root = Path(root)
    manifest, rows, records = collect(root)
    tasks = eval_columns(rows)
    for r in rows:  # a column per task evaluated: its headline score (accuracy where it has one)
        for column, (task, _) in tasks.items():
            r[column] = r["eval"][task].value if task in r["eval"] else None
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*RESULT_COLUMNS, *tasks], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in [*RESULT_COLUMNS, *tasks]})
    atomic_write_bytes(root / "results.csv", buf.getvalue().encode("utf-8"))

    variants = list(manifest.get("variants", {})) or list(dict.fromkeys(r["variant"] for r in rows))
    sizes = list(manifest.get("settings", {}).get("scale", {}).get("sizes", {}))

    def line_of(r: dict[str, Any]) -> str:
        return f"{r['size']}/{r['variant']}" if sizes else r["variant"]

    def series(key: str) -> dict[str, list]:
        out: dict[str, list] = {f"{s}/{v}" if s else v: [] for s in (sizes or [""]) for v in variants}
        for r in rows:
            # done cells only: a band and its legend's n=... then count the seeds a row of the table counts
            if r["status"] == "done" and r["run_dir"] and r["run_dir"] in records:
                xs, ys = metric_series(records[r["run_dir"]], key)
                if xs and line_of(r) in out:
                    out[line_of(r)].append((xs, ys))
        return out

    val = series("val/loss")
    fig = band_figure(val, ylabel="validation loss (nats/token)", title=f"{manifest['ablation']}: validation loss")
    lines = {name: int(n.rstrip(")")) for name, n in
             (line.get_label().rsplit(" (n=", 1) for line in fig.axes[0].get_lines())}
    curves = save_figure(fig, root / "curves.png")
    fig = band_figure(series("train/tokens_per_s"), ylabel="training tokens/s",
                      title=f"{manifest['ablation']}: throughput")
    throughput = save_figure(fig, root / "throughput.png")
    _lr_figure(root)
    figures = {"validation loss": "curves.png", "throughput": "throughput.png"}
    if sizes:
        by_size = {s: _comparisons(manifest, variants, [r for r in rows if r["size"] == s]) for s in sizes}
        scale = _scaling(manifest, variants, sizes, rows, by_size, root)
        text = _markdown(manifest, rows, figures, by_size, scale.lines)
        comparisons = None
    else:
        comparisons = _comparisons(manifest, variants, rows)
        text = _markdown(manifest, rows, figures, comparisons)
    atomic_write_bytes(root / "report.md", text.encode("utf-8"))
    files = ReportFiles(root / "results.csv", root / "report.md", curves, throughput, rows, lines, comparisons)
    if sizes:
        files.by_size, files.scaling, files.scaling_flops = by_size, scale.scaling, scale.scaling_flops
        files.fits, files.trends = scale.fits, scale.trends
    if log_wandb:
        _log_to_wandb(manifest, rows, files, write)
    return files


@dataclass
class _Scaling:
    lines: list[str]
    scaling: Path
    scaling_flops: Path
    fits: dict[str, PowerLawFit | None]
    trends: dict[str, str]


def _scaling(manifest: dict[str, Any], variants: list[str], sizes: list[str], rows: list[dict[str, Any]],
             by_size: dict[str, Comparisons], root: Path) -> _Scaling:
    """The [scale] section: loss against parameters and training FLOPs, a power law per variant, and how each
    variant's effect changes with size."""
    from ..viz._mpl import pyplot

    baseline = manifest.get("settings", {}).get("baseline")
    # variant -> [(params, training FLOPs, mean final loss, std, n)] over the sizes with a finished cell
    points: dict[str, list[tuple[float, float, float, float | None, int]]] = {v: [] for v in variants}
    for v in variants:
        for s in sizes:
            done = [r for r in rows if r["size"] == s and r["variant"] == v and r["status"] == "done"
                    and r["final_val_loss"] is not None]
            if not done or not done[0]["parameters"]:
                continue
            sp = spread([r["final_val_loss"] for r in done])
            tokens = done[0]["train_tokens"] or 0
            flops = float(done[0]["flops_per_token"] or 0) * float(tokens)
            points[v].append((float(done[0]["parameters"]), flops, sp.mean, sp.std, sp.n))
    plt = pyplot()
    paths = []
    for idx, (name, xlabel) in enumerate((("scaling.png", "parameters"),
                                          ("scaling_flops.png", "training FLOPs (FLOPs/token x tokens)"))):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, pts in points.items():
            pts = [p for p in pts if p[idx] > 0]
            if pts:
                ax.errorbar([p[idx] for p in pts], [p[2] for p in pts], yerr=[p[3] or 0 for p in pts],
                            marker="o", capsize=3, label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title(f"{manifest['ablation']}: loss against {xlabel.split(' (')[0]} (mean ± std over seeds)")
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        paths.append(save_figure(fig, root / name))
    fits = {v: fit_power_law([p[0] for p in pts], [p[2] for p in pts]) if len(pts) >= 3 else None
            for v, pts in points.items()}
    lines = ["", "## Across sizes", "",
             "![loss against parameters](scaling.png) ![loss against training FLOPs](scaling_flops.png)", "",
             "**Power law** L(N) = a·N^(−α) + c of each variant's mean final validation loss against its parameters "
             "N (`scipy.optimize.curve_fit`), with ≥3 sizes. The 95% interval of α is approximate: it comes from "
             "the fit's covariance (a linearisation), with t(0.975, sizes − 3); 3 sizes fit the curve exactly "
             "and leave no interval.", "",
             "| variant | sizes | α [95% CI, approx.] | a | c |", "|---|---:|---|---:|---:|"]
    for v, pts in points.items():
        f = fits[v]
        if f is None:
            why = "needs ≥3 sizes" if len(pts) < 3 else "the fit did not converge"
            lines.append(f"| {_code(v)} | {len(pts)} | — ({why}) | — | — |")
            continue
        ci = f"[{f.alpha_low:.3f}, {f.alpha_high:.3f}]" if f.alpha_low is not None else "(no interval: 3 sizes)"
        lines.append(f"| {_code(v)} | {len(pts)} | {f.alpha:.3f} {ci} | {f.a:.4g} | {f.c:.4f} |")
    lines += ["", f"**Effect across sizes** (Δ = variant − baseline {_code(baseline)} at each size, mean over "
              f"paired seeds, with that size's verdict; sizes smallest first). The trend compares |Δ| at the "
              f"largest size with the smallest, `reverses` when Δ changes sign; it reads the means, so check each "
              f"size's verdict before trusting it.", "",
              "| variant | " + " | ".join(_code(s) for s in sizes) + " | trend |",
              "|---|" + "---|" * len(sizes) + "---|"]
    trends = {}
    for v in variants:
        if v == baseline:
            continue
        deltas, cells = [], []
        for s in sizes:
            row = by_size[s].rows.get(v)
            d = row.diff if row is not None else None
            deltas.append(d.mean if d is not None else None)
            cells.append("—" if d is None else f"{'+' if d.mean > 0 else '−' if d.mean < 0 else '0'} "
                         f"({d.mean:+.4f}, {row.verdict})")
        trends[v] = effect_trend(deltas)
        lines.append(f"| {_code(v)} | " + " | ".join(cells) + f" | {trends[v]} |")
    lines.append("")
    lines.append("Sign: − lower loss than the baseline (better), + higher (worse).")
    return _Scaling(lines, paths[0], paths[1], fits, trends)


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
        columns = [*RESULT_COLUMNS, *eval_columns(rows)]
        table = wandb.Table(columns=columns, data=[[r.get(k) for k in columns] for r in rows])
        payload = {"results": table, "curves": wandb.Image(str(files.curves)),
                   "throughput": wandb.Image(str(files.throughput))}
        if files.scaling is not None:
            payload["scaling"] = wandb.Image(str(files.scaling))
            payload["scaling_flops"] = wandb.Image(str(files.scaling_flops))
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
