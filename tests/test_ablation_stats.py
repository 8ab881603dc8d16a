"""The statistics of ablation reports (issue 24.1): noise floor, corrected p-values, verdicts, detectable effects.

Every number is checked against a computation written here independently: Holm by hand and by
statsmodels, p-values by scipy's t-tests, the minimum detectable effect by the noncentral t, a
simulation and the normal closed form. The last tests run the report on ablations (one with
constructed losses, one trained for real) and read report.md.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ablation_utils import ablate_in_process, cells_by_id, final_val, write_ablation
from training_utils import cli


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


def _holm_by_hand(p: list[float]) -> list[float]:
    """Holm's step-down: sort ascending, multiply the i-th smallest (0-based) by m - i, keep it monotone, cap at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# -- corrected p-values ------------------------------------------------------------------------------------
def test_holm_and_bonferroni_on_fixed_numbers_equal_statsmodels_and_a_hand_computation():
    from statsmodels.stats.multitest import multipletests

    from minigpt_core.ablation.stats import adjust_p_values

    p = [0.01, 0.04, 0.03, 0.005]
    # by hand: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (monotone)
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert adjust_p_values(p, "holm") == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-15)
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02], abs=1e-15)
    assert adjust_p_values(p, "none") == p
    assert adjust_p_values([0.3, 0.6], "bonferroni") == [0.6, 1.0]  # capped at 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = list(rng.uniform(0, 0.2, size=int(rng.integers(1, 9))))
        assert adjust_p_values(q, "holm") == pytest.approx(_holm_by_hand(q), abs=1e-12)
    with pytest.raises(ValueError, match="unknown correction"):
        adjust_p_values(p, "sidak")


def test_compare_to_baseline_adjusts_the_paired_t_tests_p_values_over_the_variants():
    from minigpt_core.ablation.stats import compare_to_baseline

    base = {1: 2.00, 2: 2.10, 3: 2.05, 4: 2.20}
    values = {"base": base,
              "a": {1: 1.95, 2: 2.02, 3: 2.01, 4: 2.12},
              "b": {1: 2.01, 2: 2.08, 3: 2.07, 4: 2.19},
              "c": {1: 2.10, 2: 2.25, 3: 2.12, 4: 2.29},
              "short": {1: 1.5}}  # one pair: no p-value, so not one of the m comparisons
    raw = {v: stats.ttest_1samp([values[v][s] - base[s] for s in base], 0.0).pvalue for v in "abc"}
    holm = dict(zip("abc", _holm_by_hand([raw[v] for v in "abc"])))
    c = compare_to_baseline(values, "base")
    assert c.correction == "holm" and c.m == 3 and c.test_alpha == pytest.approx(0.05 / 3)
    assert c.noise_floor == pytest.approx(statistics.stdev(base.values()))
    for v in "abc":
        assert c.rows[v].diff.p_value == pytest.approx(raw[v], rel=1e-9)
        assert c.rows[v].p_adjusted == pytest.approx(holm[v], rel=1e-9)
    assert c.rows["short"].p_adjusted is None and c.rows["short"].verdict == "needs ≥3 seeds (n = 1)"
    bonf = compare_to_baseline(values, "base", correction="bonferroni")
    assert [bonf.rows[v].p_adjusted for v in "abc"] == pytest.approx([min(1, 3 * raw[v]) for v in "abc"])
    none = compare_to_baseline(values, "base", correction="none")
    assert [none.rows[v].p_adjusted for v in "abc"] == pytest.approx([raw[v] for v in "abc"])
    assert none.test_alpha == 0.05


# -- verdicts ----------------------------------------------------------------------------------------------
def test_a_large_effect_within_the_noise_floor_is_no_detectable_difference():
    from minigpt_core.ablation.stats import compare_to_baseline

    base = {1: 2.0, 2: 2.5, 3: 3.0}  # std 0.5: the seeds disagree a lot
    var = {s: v - 0.3 + 0.001 * s for s, v in base.items()}  # 0.3 better on every seed, consistently
    c = compare_to_baseline({"base": base, "v": var}, "base")
    row = c.rows["v"]
    assert c.noise_floor == pytest.approx(0.5)
    assert row.p_adjusted < 0.001  # clearly significant ...
    assert abs(row.diff.mean) < c.noise_floor and row.floor_ratio == pytest.approx(0.298 / 0.5)
    assert row.verdict == "no detectable difference"  # ... but within the baseline's seed-to-seed noise


def test_a_small_effect_beyond_the_noise_floor_is_better_or_worse_when_the_adjusted_p_is_small():
    from minigpt_core.ablation.stats import compare_to_baseline

    base = {1: 2.000, 2: 2.001, 3: 2.002, 4: 2.0005}  # std 0.00085
    better = {s: v - 0.01 + 0.0002 * (s % 2) for s, v in base.items()}
    worse = {s: v + 0.01 - 0.0002 * (s % 2) for s, v in base.items()}
    noisy = {s: v + (0.05 if s % 2 else -0.03) for s, v in base.items()}  # beyond the floor, but p large
    c = compare_to_baseline({"base": base, "better": better, "worse": worse, "noisy": noisy}, "base")
    assert c.m == 3
    for v in ("better", "worse"):
        assert abs(c.rows[v].diff.mean) > c.noise_floor and c.rows[v].p_adjusted < 0.05
    assert c.rows["better"].verdict == "better" and c.rows["worse"].verdict == "worse"
    assert abs(c.rows["noisy"].diff.mean) > c.noise_floor and c.rows["noisy"].p_adjusted > 0.05
    assert c.rows["noisy"].verdict == "no detectable difference"


def test_the_correction_decides_a_verdict_the_raw_p_value_would_give():
    from minigpt_core.ablation.stats import compare_to_baseline

    # one real effect among 8 variants (7 with none): its p ~ 0.02 passes alone, not after the correction
    base = {1: 2.0, 2: 2.01, 3: 2.005}
    values = {"base": base, **{f"null{i}": {s: x + (0.01, -0.01, 0.0)[s - 1] for s, x in base.items()}
                               for i in range(7)},
              "real": {1: 1.90, 2: 1.95, 3: 1.925}}
    raw = stats.ttest_rel([1.90, 1.95, 1.925], list(base.values())).pvalue
    assert 0.05 / 8 < raw < 0.05
    alone = compare_to_baseline(values, "base", correction="none").rows["real"]
    assert alone.p_adjusted == pytest.approx(raw) and alone.verdict == "better"
    holm = compare_to_baseline(values, "base")
    assert holm.m == 8 and holm.rows["real"].p_adjusted == pytest.approx(8 * raw)  # the smallest p: x m
    assert holm.rows["real"].verdict == "no detectable difference"


def test_fewer_than_3_paired_seeds_gives_no_verdict_and_says_so():
    from minigpt_core.ablation.stats import compare_to_baseline

    base = {1: 2.0, 2: 2.01, 3: 2.02}
    var = {1: 1.0, 2: 1.02}  # a huge effect, but only 2 seeds paired with the baseline
    c = compare_to_baseline({"base": base, "v": var, "none": {}}, "base")
    assert c.rows["v"].verdict == "needs ≥3 seeds (n = 2)"
    assert c.rows["v"].p_adjusted is not None  # the p-value is still given
    assert c.rows["none"].diff is None and c.rows["none"].verdict == "needs ≥3 seeds (n = 0)"


# -- minimum detectable effect -----------------------------------------------------------------------------
def _power_by_hand(d: float, n: int, alpha: float) -> float:
    """P(|T| > t_c) for T = (Z + d sqrt(n)) / sqrt(V / (n - 1)), Z normal, V chi-square: integrated over V."""
    from scipy.integrate import quad

    df, nc = n - 1, d * math.sqrt(n)
    tc = stats.t.ppf(1 - alpha / 2, df)

    def given_v(v: float) -> float:
        s = math.sqrt(v / df)
        return (stats.norm.sf(tc * s - nc) + stats.norm.cdf(-tc * s - nc)) * stats.chi2.pdf(v, df)

    return quad(given_v, 0, math.inf, epsabs=1e-13, epsrel=1e-12, limit=200)[0]


def _d_by_hand(n: int, alpha: float) -> float:
    """Cohen's d with 80% power: the root of the integrated power."""
    from scipy.optimize import brentq

    return brentq(lambda d: _power_by_hand(d, n, alpha) - 0.8, 1e-6, 1000.0, xtol=1e-12)


@pytest.mark.parametrize("n,alpha", [(2, 0.0125), (3, 0.05), (3, 0.0125), (5, 0.025), (10, 0.05), (30, 0.01)])
def test_minimum_detectable_effect_has_80_percent_power_by_the_noncentral_t(n, alpha):
    from minigpt_core.ablation.stats import minimum_detectable_effect

    sd = 0.02
    assert minimum_detectable_effect(sd, n, alpha) == pytest.approx(_d_by_hand(n, alpha) * sd, rel=1e-6)


def test_minimum_detectable_effect_against_a_simulation_statsmodels_and_the_closed_form():
    from statsmodels.stats.power import TTestPower

    from minigpt_core.ablation.stats import minimum_detectable_effect, seeds_needed

    # a simulation of the design: 3 pairs, differences ~ N(MDE, sd), two-sided t-test at alpha
    n, alpha, sd = 3, 0.05 / 2, 1.0
    mde = minimum_detectable_effect(sd, n, alpha)
    x = np.random.default_rng(1).normal(mde, sd, size=(40_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)) == pytest.approx(0.8, abs=0.01)
    # statsmodels' solver where it converges (it does at 10 pairs, alpha 0.05)
    d = TTestPower().solve_power(effect_size=None, nobs=10, alpha=0.05, power=0.8)
    assert minimum_detectable_effect(1.0, 10, 0.05) == pytest.approx(d, rel=1e-6)
    # many pairs: the normal closed form (z_(1-alpha/2) + z_0.8) sd / sqrt(n)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert minimum_detectable_effect(0.01, 2000, 0.05) == pytest.approx(z * 0.01 / math.sqrt(2000), rel=2e-3)
    # 2 pairs at a small alpha: far beyond the d = 10 where statsmodels' solver stops without a word
    assert minimum_detectable_effect(1.0, 2, 0.0125) > 40
    assert minimum_detectable_effect(None, 5, 0.05) is None and minimum_detectable_effect(1.0, 1, 0.05) is None
    # seeds needed: the first n with 80% power, by the hand formula
    for effect, sd_, a in ((0.01, 0.02, 0.05), (0.005, 0.003, 0.0125), (0.1, 0.1, 0.025)):
        k = seeds_needed(effect, sd_, a)
        assert _power_by_hand(effect / sd_, k, a) >= 0.8 and (k == 2 or _power_by_hand(effect / sd_, k - 1, a) < 0.8)
    assert seeds_needed(0.01, 0.02, 0.05) == pytest.approx((z * 2) ** 2, abs=3)  # ~ ((z_a + z_b) sd / Δ)^2
    assert seeds_needed(1e-6, 1.0, 0.05) is None  # beyond 100,000 seeds


def test_the_mde_uses_alpha_over_m_for_holm_and_bonferroni_and_alpha_without_correction():
    from minigpt_core.ablation.stats import compare_to_baseline, minimum_detectable_effect

    base = {1: 2.0, 2: 2.1, 3: 2.05, 4: 2.2}
    values = {"base": base, **{v: {s: x + k * 0.01 + 0.003 * (s % 3) for s, x in base.items()}
                               for k, v in enumerate("abcd")}}
    for method, alpha in (("holm", 0.05 / 4), ("bonferroni", 0.05 / 4), ("none", 0.05)):
        c = compare_to_baseline(values, "base", correction=method)
        row = c.rows["b"]
        assert c.test_alpha == pytest.approx(alpha)
        assert row.mde == pytest.approx(minimum_detectable_effect(row.diff.std, 4, alpha))
        assert row.mde == pytest.approx(_d_by_hand(4, alpha) * row.diff.std, rel=1e-6)


# -- the report ------------------------------------------------------------------------------------------
def _constructed_ablation(tmp: Path, losses: dict[str, dict[int, float]], report: str = "") -> Path:
    """A real plan and manifest whose cells are all done, each run's metrics.jsonl ending at the given loss."""
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.runner import reconcile, write_manifest

    seeds = sorted(next(iter(losses.values())))
    variants = "".join(f'[variants.{v}]\n"train.lr" = {0.001 * (i + 1)}\n' for i, v in enumerate(losses))
    path = write_ablation(tmp, f'name = "constructed"\nbase = "base.toml"\nseeds = {seeds}\n{report}\n{variants}')
    plan = load_plan(path, probe=False)
    manifest = reconcile(plan, None, force=False)
    for rec in manifest["cells"]:
        run = plan.root / rec["variant"] / f"seed-{rec['seed']}" / "20260101-000000"
        run.mkdir(parents=True)
        loss = losses[rec["variant"]].get(rec["seed"])
        records = [{"step": 0, "time": 100.0, "event": "start", "total_steps": 2},
                   {"step": 2, "time": 101.0, "train/loss": 3.0, "train/tokens": 512, "train/tokens_per_s": 500.0},
                   {"step": 2, "time": 101.5, "val/loss": loss}, {"step": 2, "time": 102.0, "event": "finished"}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rec.update(status="done", run_dir=str(run), attempts=1)
    write_manifest(plan.root, manifest)
    return plan.root


def _stats_rows(report: str) -> dict[str, list[str]]:
    """variant -> the cells of its row in the statistics table (after the '## Statistics' heading)."""
    table = report.split("## Statistics", 1)[1]
    return {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| `")}


def test_report_gives_noise_floor_method_adjusted_p_mde_and_verdicts(tmp_path, capsys):
    base = {1: 2.000, 2: 2.010, 3: 2.005}
    losses = {"base": base,
              "better": {1: 1.950, 2: 1.962, 3: 1.954},  # -0.05 on every seed, floor 0.005: better
              "inside": {1: 1.998, 2: 2.007, 3: 2.004},  # -0.002: within the floor
              "two": {1: 1.5, 2: 1.5, 3: 2.0}}
    root = _constructed_ablation(tmp_path, losses)
    manifest = json.loads((root / "manifest.json").read_text())
    for rec in manifest["cells"]:  # seed 3 of `two` failed: 2 pairs
        if rec["variant"] == "two" and rec["seed"] == 3:
            rec.update(status="failed", error="boom")
    (root / "manifest.json").write_text(json.dumps(manifest))
    status, out, err = cli(capsys, "report", root, "--no-wandb")
    assert status == 0, err
    report = (root / "report.md").read_text()
    floor = statistics.stdev(base.values())
    assert f"**Noise floor:** {floor:.4f} nats/token" in report and "(n = 3 seeds)" in report
    assert "**Multiple comparisons:** Holm over m = 3 comparison(s)" in report
    assert "α/m = 0.0167 (for Holm, its most stringent step)" in report
    assert ("| variant | pairs | Δ vs baseline [95% CI] | p | p adj. (Holm) | sd Δ | \\|Δ\\| / floor | MDE (80% power) "
            "| seeds for floor | verdict |") in report
    rows = _stats_rows(report)
    assert set(rows) == {"better", "inside", "two"}  # the baseline is not compared with itself
    raw = {v: stats.ttest_rel([losses[v][s] for s in (1, 2, 3)], [base[s] for s in (1, 2, 3)]).pvalue
           for v in ("better", "inside")}
    raw["two"] = stats.ttest_rel([1.5, 1.5], [base[1], base[2]]).pvalue
    holm = dict(zip(raw, _holm_by_hand(list(raw.values()))))
    for v, cells in rows.items():
        assert cells[3] == f"{raw[v]:.3g}" and cells[4] == f"{holm[v]:.3g}", (v, cells)
    assert rows["better"][1] == "3" and rows["better"][-1] == "better"
    assert rows["inside"][-1] == "no detectable difference"
    assert rows["two"][1] == "2" and rows["two"][-1] == "needs ≥3 seeds (n = 2)"
    d = [losses["better"][s] - base[s] for s in (1, 2, 3)]
    assert rows["better"][7] == f"{_d_by_hand(3, 0.05 / 3) * statistics.stdev(d):.4f}"  # MDE in nats/token


def test_the_correction_comes_from_the_ablation_file_and_bad_values_are_refused(tmp_path, capsys):
    from minigpt_core.ablation.file import read_ablation_file

    base = {1: 2.000, 2: 2.010, 3: 2.005}
    losses = {"base": base, "a": {1: 1.95, 2: 1.962, 3: 1.954}, "b": {1: 2.1, 2: 2.0, 3: 2.2}}
    root = _constructed_ablation(tmp_path, losses, report='[report]\ncorrection = "bonferroni"\nalpha = 0.01\n')
    status, out, err = cli(capsys, "report", root, "--no-wandb")
    assert status == 0, err
    report = (root / "report.md").read_text()
    assert "**Multiple comparisons:** Bonferroni over m = 2 comparison(s) with the baseline" in report
    assert "family-wise α = 0.01" in report and "α/m = 0.005" in report and "p adj. (Bonferroni)" in report
    raw = stats.ttest_rel([1.95, 1.962, 1.954], list(base.values())).pvalue
    assert _stats_rows(report)["a"][4] == f"{min(1.0, 2 * raw):.3g}"
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "base.toml"\n[variants.a]\n[report]\ncorrection = "sidak"\nalpha = 1.5\n')
    with pytest.raises(Exception, match="report.correction") as info:
        read_ablation_file(bad)
    assert "report.alpha" in str(info.value)  # both problems in one message
    status, out, err = cli(capsys, "ablate", bad, "--dry-run")
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "'holm', 'bonferroni' or 'none'" in err and "report.alpha" in err


@pytest.mark.slow  # 9 cells, each a `minigpt train` process
def test_report_of_a_real_tiny_ablation_has_the_statistics(tmp_path):
    path = write_ablation(tmp_path, '''
name = "real"
base = "base.toml"
seeds = [1, 2, 3]
[common]
"train.max_steps" = 4
"train.eval_every" = 4
"train.save_every" = 0
[variants.ln]
[variants.rms]
"model.norm.name" = "modern.rmsnorm"
[variants.slow_lr]
"train.lr" = 0.0003
''')
    status, out, err = ablate_in_process(path, "--jobs", "2", cwd=tmp_path)
    assert status == 0, (out, err)
    root = tmp_path / "runs" / "real"
    val = {(c["variant"], c["seed"]): final_val(c["run_dir"]) for c in cells_by_id(root).values()}
    base = [val[("ln", s)] for s in (1, 2, 3)]
    floor = statistics.stdev(base)
    report = (root / "report.md").read_text()
    assert f"**Noise floor:** {floor:.4f} nats/token" in report
    assert "**Multiple comparisons:** Holm over m = 2 comparison(s) with the baseline" in report
    assert "| variant | pairs | Δ vs baseline [95% CI] | p | p adj. (Holm) |" in report
    rows = _stats_rows(report)
    raw = {v: stats.ttest_rel([val[(v, s)] for s in (1, 2, 3)], base).pvalue for v in ("rms", "slow_lr")}
    holm = dict(zip(raw, _holm_by_hand(list(raw.values()))))
    for v in ("rms", "slow_lr"):
        diff = [val[(v, s)] - b for s, b in zip((1, 2, 3), base)]
        mean = sum(diff) / 3
        expected = ("better" if mean < 0 else "worse") if holm[v] < 0.05 and abs(mean) > floor \
            else "no detectable difference"
        assert rows[v][1] == "3" and rows[v][3] == f"{raw[v]:.3g}" and rows[v][4] == f"{holm[v]:.3g}"
        assert rows[v][2].startswith(f"{mean:+.4f} [") and rows[v][-1] == expected, rows[v]
