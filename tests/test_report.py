"""`minigpt plot` (curves of runs, legends from the spec fields that differ) and the ablation statistics."""

from __future__ import annotations

import math

import pytest

from minigpt_core.base import toml as _toml
from training_utils import cli, tiny_spec_data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short runs of one experiment that differ in train.lr."""
    tmp = tmp_path_factory.mktemp("plot")
    data = tiny_spec_data(tmp, train={"max_steps": 4, "eval_every": 2, "save_every": 0, "peak_flops": 1e12})
    exp = tmp / "exp.toml"
    exp.write_text(_toml.dumps(data), encoding="utf-8")
    from minigpt_core.cli.app import main

    assert main(["train", str(exp), "--no-progress"]) == 0
    assert main(["train", str(exp), "--no-progress", "--set", "train.lr=0.001"]) == 0
    runs = sorted(p for p in (tmp / "runs" / "tiny-test").iterdir() if p.is_dir())
    return tmp, runs


def test_plot_labels_runs_by_their_differing_fields_and_draws_each_metric(two_runs, capsys):
    from minigpt_core.cli.commands.ablate import run_label_fields
    from minigpt_core.runs import read_metrics
    from minigpt_core.viz.curves import runs_figure

    tmp, runs = two_runs
    assert run_label_fields(runs) == ["train.lr=0.003", "train.lr=0.001"]
    fig = runs_figure([(label, read_metrics(r)) for label, r in zip(run_label_fields(runs), runs)])
    loss, lr, speed = fig.axes
    assert [ln.get_label() for ln in loss.get_lines()] == ["train.lr=0.003", "train.lr=0.003 (val)",
                                                           "train.lr=0.001", "train.lr=0.001 (val)"]
    assert len(lr.get_lines()) == 2 and len(speed.get_lines()) == 2
    # x is training tokens: 4 steps of 8 x 32
    assert list(loss.get_lines()[1].get_xdata()) == [512.0, 1024.0]
    status, out, err = cli(capsys, "plot", runs[0], tmp / "runs" / "tiny-test", "--out", tmp / "p.png")
    assert status == 0, err
    assert (tmp / "p.png").read_bytes()[:4] == b"\x89PNG" and "train.lr=0.001: " + str(runs[1]) in out


def test_plot_refuses_what_is_not_a_run(tmp_path, capsys):
    status, out, err = cli(capsys, "plot", tmp_path)
    assert status == 2 and "neither a run directory" in err


def test_paired_difference_against_scipy():
    from scipy import stats

    from minigpt_core.ablation.stats import paired_difference, spread

    base = {1: 2.0, 2: 2.5, 3: 2.2}
    var = {1: 1.9, 2: 2.3, 3: 2.15, 4: 9.0}  # seed 4 has no pair: left out
    d = paired_difference(var, base)
    diffs = [var[s] - base[s] for s in (1, 2, 3)]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(m) and d.std == pytest.approx(sd)
    assert (d.ci_low, d.ci_high) == (pytest.approx(m - half), pytest.approx(m + half))
    assert d.p_value == pytest.approx(stats.ttest_rel([1.9, 2.3, 2.15], [2.0, 2.5, 2.2]).pvalue)
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.30, abs=0.01)
    one = paired_difference({1: 1.0}, {1: 2.0})
    assert one.n == 1 and one.ci_low is None
    assert spread([1.0]).std is None and spread([]).n == 0
