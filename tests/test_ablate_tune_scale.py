"""[tune] with [scale]: a learning-rate search per size and variant, each size's cells with its own best value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablation_utils import ablate_in_process, cells_by_id, final_val, study_trials, tuned_table, write_ablation
from training_utils import cli


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


# -- [tune] with [scale]: a search per size and variant ------------------------------------------------------
TUNED_SCALE = '''
name = "tsc"
base = "base.toml"
seeds = [1]
[variants.base]
[scale]
sizes = [{name = "s", "model.emb_dim" = 16, "model.n_layers" = 1},
         {name = "m", "model.emb_dim" = 32, "model.n_layers" = 2}]
[tune]
seeds = [11]
grid = [1e-3, 3e-2]
overrides = { "train.max_steps" = 6 }
'''


def test_dry_run_with_scale_lists_a_search_per_size_and_variant(tmp_path, capsys, monkeypatch):
    body = TUNED_SCALE.replace("[variants.base]", "[variants.base]\n[variants.rms]\n\"model.norm.name\" = "
                               "\"modern.rmsnorm\"")
    path = write_ablation(tmp_path, body, max_steps=12, eval_every=6, save_every=6)
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    assert status == 0, err
    assert ("cost: 4 cells + 2 sizes x 2 variants x 2 trials x 1 tuning seeds = 12 runs (8 for tuning train.lr)"
            in out)
    for size in "sm":
        for variant in ("base", "rms"):
            for lr in (1e-3, 3e-2):
                assert f"{size}/{variant}/lr-{lr:g} " in out


@pytest.mark.slow
def test_with_scale_each_size_gets_its_own_search_and_its_cells_its_best_lr(tmp_path):
    path = write_ablation(tmp_path, TUNED_SCALE, max_steps=12, eval_every=6, save_every=6)
    status, out, err = ablate_in_process(path, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert status == 0, out + err
    root = tmp_path / "runs" / "tsc"
    summary = json.loads((root / "tune" / "summary.json").read_text())
    assert summary["sizes"] == ["s", "m"] and set(summary["variants"]) == {"s/base", "m/base"}
    cells = cells_by_id(root)
    for size, width in (("s", 16), ("m", 32)):
        losses = {}
        for lr in (1e-3, 3e-2):
            (run,) = [p for p in (root / "tune" / size / "base" / f"lr-{lr:g}" / "seed-11").iterdir() if p.is_dir()]
            spec = (run / "spec.toml").read_text()
            assert f"emb_dim = {width}" in spec and "max_steps = 6" in spec  # the size's model, the trial's steps
            losses[lr] = final_val(run)
        best = min(losses, key=losses.get)
        chosen = summary["variants"][f"{size}/base"]
        assert (chosen["size"], chosen["variant"]) == (size, "base")
        assert chosen["best"] == pytest.approx(best) and chosen["loss"] == pytest.approx(losses[best])
        trials = study_trials(root, f"{size}/base", db=f"{size}/base.db")
        assert sorted(t.params["train.lr"] for t in trials) == pytest.approx([1e-3, 3e-2])
        cell = cells[f"{size}/base/seed-1"]
        assert cell["status"] == "done" and cell["overrides"]["train.lr"] == pytest.approx(best)
        assert f"lr = {best}" in (Path(cell["run_dir"]) / "spec.toml").read_text()
    table = tuned_table(tmp_path / "runs" / "tsc")
    assert table[0] == "| size | variant | chosen train.lr | tuning val loss | trials |"
    assert any(row.startswith("| `s` | `base` | ") for row in table)
    assert any(row.startswith("| `m` | `base` | ") for row in table)
    assert (root / "lr.png").stat().st_size > 1000
