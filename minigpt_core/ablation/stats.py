"""The statistics of an ablation table: mean ± std over seeds, and paired differences with a t interval.

Seeds are paired (seed s of every variant sees the same data order), so a variant is compared with
the baseline through the per-seed differences: their mean, a 95% Student-t interval and the paired
t-test (``scipy.stats.ttest_rel``). With n seeds the interval uses t(0.975, n - 1): 12.7 for 2
seeds, 4.30 for 3, so few seeds give wide intervals, and the report says so.

With several variants, ``compare_to_baseline`` adds what keeps many tests honest: the baseline's
seed-to-seed standard deviation as a noise floor, p-values adjusted for the number of variants
compared (Holm by default, ``statsmodels.stats.multitest.multipletests``), a verdict that needs
both an adjusted p below alpha and |difference| above the floor, and the minimum detectable effect
of the design (from the paired t-test's noncentral t distribution), so a user knows how many seeds a smaller
effect would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Spread", "PairedDifference", "spread", "paired_difference", "CORRECTIONS", "Comparison", "Comparisons",
           "adjust_p_values", "power_of_paired_test", "minimum_detectable_effect",
           "seeds_needed", "verdict", "compare_to_baseline", "PowerLawFit", "fit_power_law", "effect_trend"]


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float | None
    std: float | None  # sample standard deviation (ddof = 1); None below 2 values


def spread(values: Sequence[float]) -> Spread:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if not n:
        return Spread(0, None, None)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return Spread(n, mean, std)


@dataclass(frozen=True)
class PairedDifference:
    n: int  # seeds with a value in both
    mean: float  # mean of (variant - baseline) over those seeds
    std: float | None
    ci_low: float | None  # 95% Student-t interval of the mean difference; None below 2 pairs
    ci_high: float | None
    p_value: float | None  # two-sided paired t-test
    t_crit: float | None


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference | None:
    """``variant - baseline`` over the seeds both have; None when they share none."""
    from scipy import stats

    seeds = sorted(s for s in variant if s in baseline and variant[s] is not None and baseline[s] is not None
                   and math.isfinite(variant[s]) and math.isfinite(baseline[s]))
    if not seeds:
        return None
    diffs = [variant[s] - baseline[s] for s in seeds]
    sp = spread(diffs)
    if sp.n < 2:
        return PairedDifference(sp.n, sp.mean, None, None, None, None, None)
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, sp.n - 1))
    half = t_crit * sp.std / math.sqrt(sp.n)
    if sp.std == 0:
        p = 1.0 if sp.mean == 0 else 0.0
    else:
        p = float(stats.ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return PairedDifference(sp.n, sp.mean, sp.std, sp.mean - half, sp.mean + half, p, t_crit)


# -- many variants against one baseline: noise floor, corrected p-values, verdicts, detectable effects -------
CORRECTIONS = ("holm", "bonferroni", "none")
POWER = 0.8  # of the minimum detectable effect
MIN_VERDICT_SEEDS = 3
_MAX_SEEDS = 100_000  # seeds_needed gives up beyond this


@dataclass(frozen=True)
class Comparison:
    variant: str
    diff: PairedDifference | None  # None: no seed with a result in both
    p_adjusted: float | None  # None below 2 pairs (no p-value to adjust)
    floor_ratio: float | None  # |mean difference| / noise floor
    mde: float | None  # nats/token: the smallest |difference| the paired test detects with POWER
    seeds_for_floor: int | None  # pairs the same test needs to detect |difference| = noise floor
    verdict: str


@dataclass(frozen=True)
class Comparisons:
    baseline: str
    noise_floor: float | None  # the baseline's seed-to-seed std (ddof 1) of the metric; None below 2 seeds
    baseline_seeds: int
    correction: str
    alpha: float  # family-wise
    m: int  # comparisons the p-values are adjusted for: the variants with a p-value
    test_alpha: float  # per-test alpha of the MDE: alpha / m, unless correction = "none"
    rows: dict[str, Comparison]


def adjust_p_values(p_values: Sequence[float], method: str = "holm") -> list[float]:
    """Family-wise adjusted p-values (statsmodels' ``multipletests``); ``none`` returns them as they are."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
    if method == "none" or not p_values:
        return [float(p) for p in p_values]
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), method=method)[1]]


def power_of_paired_test(d: float, n: int, alpha: float) -> float:
    """The power of a two-sided paired t-test on ``n`` pairs at ``alpha`` for a true effect of ``d`` standard
    deviations of the differences: P(|T| > t(1 - alpha/2, n - 1)), T noncentral t with nc = d * sqrt(n)."""
    from scipy import stats

    df, nc = n - 1, d * math.sqrt(n)
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    # both tails as upper tails: scipy's nct.cdf gives NaN for some large nc at df = 1, its sf does not
    # (and statsmodels' TTestPower, built on the cdf, inherits the NaN)
    return float(stats.nct.sf(t_crit, df, nc) + stats.nct.sf(t_crit, df, -nc))


def minimum_detectable_effect(sd: float | None, n: int, alpha: float, power: float = POWER) -> float | None:
    """The smallest |mean difference| a two-sided paired t-test on ``n`` pairs detects with ``power`` at
    ``alpha``, for differences with standard deviation ``sd``: Cohen's d from the noncentral t, times sd."""
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    from scipy.optimize import brentq

    # statsmodels' TTestPower.solve_power stops at its bracket's edge (d = 10) without a word for 2-3 pairs
    # at a small alpha: solve power(d) = target here, on a bracket widened until it holds the root.
    hi = 1.0
    while power_of_paired_test(hi, n, alpha) < power:
        hi *= 2
    d = brentq(lambda x: power_of_paired_test(x, n, alpha) - power, 0.0, hi, xtol=1e-12)
    return float(d) * sd


def seeds_needed(effect: float, sd: float | None, alpha: float, power: float = POWER) -> int | None:
    """The fewest pairs (at least 2) with which the paired t-test detects ``|effect|`` with ``power``; None when
    unknown (no sd, no effect) or beyond 100,000."""
    if sd is None or not math.isfinite(sd) or not math.isfinite(effect) or effect == 0:
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        return power_of_paired_test(abs(effect) / sd, n, alpha) >= power

    # power grows with n: double, then bisect on the integers
    lo, hi = 1, 2
    while not enough(hi):
        if hi >= _MAX_SEEDS:
            return None
        lo, hi = hi, min(hi * 2, _MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def verdict(diff: PairedDifference | None, p_adjusted: float | None, noise_floor: float | None,
            alpha: float = 0.05) -> str:
    """``better`` / ``worse`` (lower is better) when the adjusted p-value is below alpha and the difference is
    larger than the noise floor; ``no detectable difference`` otherwise; below 3 pairs, that it needs more."""
    n = diff.n if diff is not None else 0
    if n < MIN_VERDICT_SEEDS or p_adjusted is None or noise_floor is None:
        return f"needs ≥{MIN_VERDICT_SEEDS} seeds (n = {n})"
    if p_adjusted < alpha and abs(diff.mean) > noise_floor:
        return "better" if diff.mean < 0 else "worse"
    return "no detectable difference"


def compare_to_baseline(values: Mapping[str, Mapping[int, float]], baseline: str, *, correction: str = "holm",
                        alpha: float = 0.05, power: float = POWER) -> Comparisons:
    """Every variant of ``values`` (variant -> seed -> metric, lower is better) against ``baseline``."""
    base = values.get(baseline, {})
    floor = spread(list(base.values())).std
    diffs = {v: paired_difference(vals, base) for v, vals in values.items() if v != baseline}
    tested = [v for v, d in diffs.items() if d is not None and d.p_value is not None]
    adjusted = dict(zip(tested, adjust_p_values([diffs[v].p_value for v in tested], correction)))
    m = len(tested)
    # Holm's first (most stringent) step tests at alpha / m, as Bonferroni's every step: an effect of the
    # MDE is detected at that level whatever the other variants' p-values are.
    test_alpha = alpha / max(m, 1) if correction != "none" else alpha
    rows = {}
    for v, d in diffs.items():
        p_adj = adjusted.get(v)
        sd = d.std if d is not None else None
        rows[v] = Comparison(
            variant=v, diff=d, p_adjusted=p_adj,
            floor_ratio=abs(d.mean) / floor if d is not None and floor else None,
            mde=minimum_detectable_effect(sd, d.n, test_alpha, power) if d is not None else None,
            seeds_for_floor=seeds_needed(floor, sd, test_alpha, power) if floor else None,
            verdict=verdict(d, p_adj, floor, alpha))
    return Comparisons(baseline, floor, spread(list(base.values())).n, correction, alpha, m, test_alpha, rows)


# -- across model sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    """L(N) = a * N^(-alpha) + c, least squares (``scipy.optimize.curve_fit``)."""

    a: float
    alpha: float
    c: float
    points: int
    # 95% interval of alpha: alpha -/+ t(0.975, points - 3) * its standard error from the fit's covariance
    # (a linearisation, so approximate); None with 3 points (no degrees of freedom left) or a singular fit
    alpha_low: float | None
    alpha_high: float | None

    def __call__(self, n: float) -> float:
        return self.a * n ** -self.alpha + self.c


def fit_power_law(params: Sequence[float], losses: Sequence[float]) -> PowerLawFit | None:
    """Fit L(N) = a N^-alpha + c to (parameters, loss) points; None below 3 distinct sizes or when it fails.

    N is divided by its geometric mean before fitting (a is rescaled back), so the fit is well conditioned
    whether N is 1e3 or 1e9."""
    import warnings

    import numpy as np
    from scipy import stats
    from scipy.optimize import OptimizeWarning, curve_fit

    pts = sorted((float(n), float(y)) for n, y in zip(params, losses)
                 if n and y is not None and math.isfinite(n) and math.isfinite(y) and n > 0)
    if len({n for n, _ in pts}) < 3:
        return None
    n = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    scale = float(np.exp(np.mean(np.log(n))))
    x = n / scale

    def law(x, a, alpha, c):
        return a * np.power(x, -alpha) + c

    span = float(y.max() - y.min()) or 1.0
    p0 = (span, 0.3, max(float(y.min()) - span, 0.0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # 3 points: no covariance, said by the None interval
            popt, pcov = curve_fit(law, x, y, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, np.inf]),
                                   maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    a, alpha, c = (float(v) for v in popt)
    low = high = None
    dof = len(pts) - 3
    var = float(pcov[1][1]) if pcov is not None else math.inf
    if dof > 0 and math.isfinite(var) and var >= 0:
        half = float(stats.t.ppf(0.975, dof)) * math.sqrt(var)
        low, high = alpha - half, alpha + half
    return PowerLawFit(a * scale ** alpha, alpha, c, len(pts), low, high)


def effect_trend(deltas: Sequence[float | None]) -> str:
    """How a variant's effect (mean difference from the baseline, sizes smallest first) changes with size:
    ``reverses`` (its sign changes), ``grows`` / ``shrinks`` (|effect| at the largest size against the smallest),
    ``unchanged``, or ``—`` below 2 sizes with a value."""
    vals = [d for d in deltas if d is not None and math.isfinite(d)]
    if len(vals) < 2:
        return "—"
    if {(d > 0) - (d < 0) for d in vals if d != 0} == {1, -1}:
        return "reverses"
    first, last = abs(vals[0]), abs(vals[-1])
    if last > first:
        return "grows"
    return "shrinks" if last < first else "unchanged"
