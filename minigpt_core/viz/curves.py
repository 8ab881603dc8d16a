"""Training curves: one run per line (``minigpt plot``), or one variant per colour with a band across seeds
(ablation reports). The functions return the Figure; callers save it with ``save_figure``."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ._mpl import pyplot

__all__ = ["band_figure", "runs_figure", "mean_band", "PLOT_METRICS"]

# (metric key, panel title) of `minigpt plot`, against training tokens
PLOT_METRICS = (("train/loss", "loss (train: solid, validation: dashed)"), ("train/lr", "learning rate"),
                ("train/tokens_per_s", "tokens/s"))


def mean_band(series: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float],
                                                                                   list[float], list[float]]:
    """(x, mean, min, max) over the seeds' series, at every x any of them has (those present at it)."""
    at: dict[float, list[float]] = {}
    for xs, ys in series:
        for x, y in zip(xs, ys):
            if y is not None and math.isfinite(y):
                at.setdefault(float(x), []).append(float(y))
    xs = sorted(at)
    return xs, [sum(at[x]) / len(at[x]) for x in xs], [min(at[x]) for x in xs], [max(at[x]) for x in xs]


def band_figure(groups: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]], *, ylabel: str,
                title: str = "", xlabel: str = "training tokens", log_y: bool = False) -> Any:
    """One colour per group: its mean line (labelled with the group's name) and a min-max band across seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, series) in enumerate(groups.items()):
        xs, mean, lo, hi = mean_band(series)
        if not xs:
            continue
        colour = colours[i % len(colours)]
        n = sum(1 for s in series if len(s[0]))
        ax.plot(xs, mean, color=colour, label=f"{name} (n={n})", marker="o" if len(xs) < 3 else None)
        if n > 1:
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    return fig


def metric_series(records: list[dict[str, Any]], key: str, x: str = "train/tokens") -> tuple[list[float], list[float]]:
    """(xs, ys) of every record with a finite ``key``, x taken from ``x``.

    Validation records carry the training tokens seen so far, so curves of runs with different
    batch sizes line up on the same axis. A record without ``x`` (an older run's validation line) is
    placed by the tokens per step of the nearest record that has both, not at its step number, which
    on a token axis would draw it near 0; with no such record anywhere the whole series is by step.
    A resumed run's records after a rewind replace the ones they repeat (the last value for a step wins).
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    known = sorted({int(r["step"]): float(r[x]) for r in records
                    if number(r.get(x)) and number(r.get("step")) and r["step"] > 0}.items())

    def place(r: dict[str, Any]) -> float | None:
        if number(r.get(x)):
            return float(r[x])
        step = int(r.get("step", 0)) if number(r.get("step")) else 0
        if not known:
            return float(step)  # nothing on the x axis at all: the step is the only scale there is
        ref_step, ref_x = min(known, key=lambda kv: abs(kv[0] - step))
        return ref_x * step / ref_step

    by_step: dict[int, tuple[float, float]] = {}
    for r in records:
        v = r.get(key)
        if number(v):
            xv = place(r)
            if xv is not None:
                by_step[int(r.get("step", 0))] = (xv, float(v))
    pts = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in pts], [p[1] for p in pts]


def runs_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]], title: str = "") -> Any:
    """``minigpt plot``: train and validation loss, learning rate and tokens/s against training tokens."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5.2 * len(PLOT_METRICS), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, (key, _) in zip(axes, PLOT_METRICS):
            xs, ys = metric_series(records, key)
            if xs:
                ax.plot(xs, ys, color=colour, label=label, linewidth=1.2)
        xs, ys = metric_series(records, "val/loss")
        if xs:
            axes[0].plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} (val)")
    for ax, (_, name) in zip(axes, PLOT_METRICS):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

