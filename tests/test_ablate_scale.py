"""`[scale]` in ablation files: every variant at every size (paired by seed), budgets per size, the report's
per-size tables, scaling figures, power-law fits and the verdict row across sizes."""

from __future__ import annotations

import csv
import math
import random

import pytest

from ablation_utils import ablate_in_process, manifest_of, write_ablation
from minigpt_core.ablation.plan import load_plan
from minigpt_core.ablation.stats import effect_trend, fit_power_law
from minigpt_core.assembly import summarize_spec


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


SCALE = '''
name = "sc"
base = "base.toml"
seeds = [1, 2]

[common]
"train.eval_every" = 4

[variants.ln]

[variants.rms]
"model.norm.name" = "modern.rmsnorm"

[scale]
budget = "tokens_per_param"
tokens_per_param = 0.05
sizes = [{name = "s", "model.emb_dim" = 16, "model.n_layers" = 1},
         {name = "m", "model.emb_dim" = 32, "model.n_layers" = 2}]
'''


# -- the power law ---------------------------------------------------------------------------------------
def test_power_law_fit_recovers_alpha_of_noise_free_data():
    n = [1e5, 3e5, 1e6, 3e6, 1e7, 3e7]
    loss = [4.0 * x ** -0.27 + 1.7 for x in n]
    f = fit_power_law(n, loss)
    assert f.points == 6
    assert f.alpha == pytest.approx(0.27, abs=1e-4)
    assert f.c == pytest.approx(1.7, abs=1e-3)
    assert f.a == pytest.approx(4.0, rel=1e-2)
    assert f.alpha_low <= 0.27 <= f.alpha_high
    assert f(1e6) == pytest.approx(4.0 * 1e6 ** -0.27 + 1.7, rel=1e-5)


def test_power_law_fit_of_slightly_noisy_data_brackets_the_true_alpha():
    rng = random.Random(0)
    n = [2e5 * 2 ** i for i in range(10)]
    loss = [(6.0 * x ** -0.35 + 2.0) * (1 + rng.gauss(0, 0.001)) for x in n]
    f = fit_power_law(n, loss)
    assert f.alpha == pytest.approx(0.35, abs=0.05)
    assert f.alpha_low < 0.35 < f.alpha_high
    assert f.alpha_high - f.alpha_low < 0.3


def test_power_law_fit_needs_three_sizes_and_gives_no_interval_with_exactly_three():
    assert fit_power_law([1e5, 1e6], [3.0, 2.5]) is None
    f = fit_power_law([1e5, 1e6, 1e7], [2.0 * x ** -0.3 + 1.0 for x in (1e5, 1e6, 1e7)])
    assert f is not None and f.alpha == pytest.approx(0.3, abs=1e-3)
    assert f.alpha_low is None and f.alpha_high is None


def test_effect_trend_grows_shrinks_reverses():
    assert effect_trend([-0.01, -0.03]) == "grows"
    assert effect_trend([0.05, 0.02, 0.01]) == "shrinks"
    assert effect_trend([-0.02, 0.01]) == "reverses"
    assert effect_trend([0.02]) == "—"
    assert effect_trend([None, 0.02, None]) == "—"


# -- the plan --------------------------------------------------------------------------------------------
def test_tokens_per_param_budget_gives_each_size_the_documented_steps(tmp_path):
    path = write_ablation(tmp_path, SCALE.replace("tokens_per_param = 0.05", "tokens_per_param = 3"))
    plan = load_plan(path)
    assert list(plan.sizes) == ["s", "m"]
    assert len(plan.cells) == 2 * 2 * 2
    assert {c.id for c in plan.cells} >= {"s/ln/seed-1", "m/rms/seed-2"}
    for size, info in plan.sizes.items():
        base = next(c for c in plan.cells if c.size == size and c.variant == "ln")
        params = summarize_spec(base.spec).total
        assert info["params"] == params
        # steps = ceil(tokens_per_param x params / tokens_per_step); batch 8 x context 32
        assert info["steps"] == math.ceil(3 * params / (8 * 32)) == base.steps
        assert base.exp_dir == plan.root / size / "ln" / "seed-1"
        # same tokens budget: the other variant at this size trains as many tokens as the baseline
        other = next(c for c in plan.cells if c.size == size and c.variant == "rms")
        assert other.tokens == base.tokens
        # paired: the same seeds at every size
    assert plan.sizes["m"]["params"] > plan.sizes["s"]["params"]
    assert plan.sizes["m"]["steps"] > plan.sizes["s"]["steps"]


def test_fixed_budget_keeps_the_files_steps_and_presets_set_the_shape(tmp_path):
    body = SCALE.replace('budget = "tokens_per_param"\ntokens_per_param = 0.05\n', 'budget = "fixed"\n')
    plan = load_plan(write_ablation(tmp_path, body))
    assert {info["steps"] for info in plan.sizes.values()} == {12}  # the base's train.max_steps
    body = SCALE.split("[scale]")[0] + '[scale]\npresets = ["tiny", "gpt2-124m"]\n'
    plan = load_plan(write_ablation(tmp_path, body, name="p.toml"))
    big = next(c for c in plan.cells if c.size == "gpt2-124m")
    assert (big.spec.model.emb_dim, big.spec.model.n_layers, big.spec.model.n_heads) == (768, 12, 12)
    assert big.spec.model.vocab_size == 128  # the rest of the model stays the base's


def test_dry_run_shows_sizes_with_parameters_and_steps(tmp_path, capsys):
    from training_utils import cli

    path = write_ablation(tmp_path, SCALE)
    status, out, err = cli(capsys, "ablate", str(path), "--dry-run")
    assert status == 0, err
    assert "2 sizes x 2 variants x 2 seeds" in out
    plan = load_plan(path)
    for size, info in plan.sizes.items():
        assert f"{info['params']:,}" in out and f"{size}/rms/seed-2" in out


# -- the study ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_sizes_two_variants_two_seeds_give_per_size_tables_scaling_figures_and_verdict_row(tmp_path):
    path = write_ablation(tmp_path, SCALE)
    status, out, err = ablate_in_process(path, "--jobs", "2", cwd=tmp_path)
    assert status == 0, out + err
    root = tmp_path / "runs" / "sc"
    cells = manifest_of(root)["cells"]
    assert sorted(c["id"] for c in cells) == sorted(f"{s}/{v}/seed-{k}" for s in "sm" for v in ("ln", "rms")
                                                    for k in (1, 2))
    assert all(c["status"] == "done" for c in cells)
    for s in "sm":
        assert (root / s / "rms" / "seed-1").is_dir()
    report = (root / "report.md").read_text()
    assert "## Size `s`" in report and "## Size `m`" in report
    assert "### Statistics at size `s`" in report and "### Statistics at size `m`" in report
    assert (root / "scaling.png").stat().st_size > 0 and (root / "scaling_flops.png").stat().st_size > 0
    assert "![loss against parameters](scaling.png)" in report
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert {r["size"] for r in rows} == {"s", "m"}
    # the verdict row: the sign of the effect at each size, and its trend, from the per-size numbers
    loss = {(r["size"], r["variant"], r["seed"]): float(r["final_val_loss"]) for r in rows}
    deltas = [sum(loss[(s, "rms", k)] - loss[(s, "ln", k)] for k in "12") / 2 for s in "sm"]
    lines = report.splitlines()
    header = lines.index("| variant | `s` | `m` | trend |")
    verdict = next(line for line in lines[header:] if line.startswith("| `rms` |"))
    assert "needs ≥3 seeds" in verdict  # each size's verdict, with 2 seeds
    signs = ["+" if d > 0 else "−" for d in deltas]
    assert verdict.split(" | ")[1].startswith(signs[0]) and verdict.split(" | ")[2].startswith(signs[1])
    assert verdict.rstrip(" |").endswith(effect_trend(deltas))
    # 2 sizes: no power law
    assert "needs ≥3 sizes" in report
