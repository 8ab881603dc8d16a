"""The statistics of an ablation table: mean ± std over seeds, and paired differences with a t interval.

Seeds are paired (seed s of every variant sees the same data order), so a variant is compared with
the baseline through the per-seed differences: their mean, a 95% Student-t interval and the paired
t-test (``scipy.stats.ttest_rel``). With n seeds the interval uses t(0.975, n - 1): 12.7 for 2
seeds, 4.30 for 3, so few seeds give wide intervals, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Spread", "PairedDifference", "spread", "paired_difference"]


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
