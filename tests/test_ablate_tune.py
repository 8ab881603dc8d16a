"""The [tune] search of `minigpt ablate`: each variant's learning rate chosen on tuning seeds with Optuna
(SQLite studies under the ablation), then used for its evaluation cells; a SIGKILL mid-search resumes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ablation_utils import ablate_in_process, cells_by_id, final_val, study_trials, tuned_table, write_ablation
from training_utils import MINIGPT, PATIENCE_S, cli, wait_for

GRID = [1e-3, 3e-3, 3e-2]
TUNED = '''
name = "tuned"
base = "base.toml"
seeds = [1]
[variants.base]                # test.slow: torch.sdpa's maths, with a sleep the SIGKILL test lengthens
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
[variants.rms]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
"model.norm.name" = "modern.rmsnorm"
[tune]
seeds = [11]
grid = [1e-3, 3e-3, 3e-2]
overrides = { "train.max_steps" = 6 }
'''


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


def _write(tmp: Path) -> Path:
    return write_ablation(tmp, TUNED, max_steps=12, eval_every=6, save_every=6)


def _results(root: Path) -> list[tuple]:
    with open(root / "results.csv", encoding="utf-8") as f:
        return [(r["variant"], r["seed"], r["overrides"], r["status"], r["final_val_loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    path = _write(tmp)
    status, out, err = ablate_in_process(path, cwd=tmp, env={"OMP_NUM_THREADS": "1"})
    assert status == 0, out + err
    return tmp / "runs" / "tuned", out, err


@pytest.mark.slow
def test_search_finds_the_grids_best_lr_and_the_cells_use_it(uninterrupted):
    root, out, _ = uninterrupted
    assert "cost: 2 cells + 2 variants x 3 trials x 1 tuning seeds = 8 runs" in out
    summary = json.loads((root / "tune" / "summary.json").read_text())
    cells = cells_by_id(root)
    for variant in ("base", "rms"):
        # the loss of every grid value, read from its trial run's own metrics
        losses = {}
        for lr in GRID:
            (run,) = [p for p in (root / "tune" / variant / f"lr-{lr:g}" / "seed-11").iterdir() if p.is_dir()]
            losses[lr] = final_val(run)
            spec = (run / "spec.toml").read_text()
            assert "max_steps = 6" in spec and 'job_type = "tune"' in spec
        best = min(losses, key=losses.get)
        chosen = summary["variants"][variant]
        assert chosen["best"] == pytest.approx(best) and chosen["loss"] == pytest.approx(losses[best])
        assert sorted(t.params["train.lr"] for t in study_trials(root, variant)) == pytest.approx(GRID)
        # the evaluation cell trained with it, and its overrides (so the report) show it
        cell = cells[f"{variant}/seed-1"]
        assert cell["status"] == "done" and cell["overrides"]["train.lr"] == pytest.approx(best)
        assert f"lr = {best}" in (Path(cell["run_dir"]) / "spec.toml").read_text()
        assert chosen["at_edge"] == (best in (GRID[0], GRID[-1]))
    table = tuned_table(root)
    assert len(table) == 3 and all(f"`{v}` | {summary['variants'][v]['best']:g} |" in "".join(table)
                                   for v in ("base", "rms"))
    assert (root / "lr.png").stat().st_size > 1000 and "![validation loss against learning rate](lr.png)" in \
        (root / "report.md").read_text()


def test_dry_run_lists_the_trials_and_the_cost(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    assert status == 0, err
    assert "cost: 2 cells + 2 variants x 3 trials x 1 tuning seeds = 8 runs (6 for tuning train.lr)" in out
    for variant in ("base", "rms"):
        for lr in GRID:
            assert f"{variant}/lr-{lr:g}" in out
    assert not (tmp_path / "runs" / "tuned" / "tune").exists()


@pytest.mark.slow
def test_sigkill_mid_search_then_rerun_repeats_no_trial_and_matches(uninterrupted, tmp_path, capsys, monkeypatch):
    ref_root = uninterrupted[0]
    path = _write(tmp_path)
    root = tmp_path / "runs" / "tuned"
    # one thread: bit-for-bit the uninterrupted run's numbers; 0.15 s per attention call: the second trial
    # is still running when the test sees it start, so the kill lands mid-trial, not between trials
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_TEST_SLOW_S": "0.15"}
    proc = subprocess.Popen([str(MINIGPT), "ablate", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)

    def one_done_one_running():
        # Read-only SQL on the study's file: opening it through Optuna's storage would create its tables,
        # racing the search that is creating them (the search then died on the clash).
        import sqlite3

        if proc.poll() is not None:
            raise AssertionError(f"minigpt ablate ended (exit status {proc.returncode}) before the state was seen")
        db = root / "tune" / "base.db"
        if not db.is_file():
            return None
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                rows = list(con.execute(
                    "SELECT t.state, (SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id) "
                    "FROM trials t JOIN studies s ON t.study_id = s.study_id WHERE s.study_name = 'base'"))
        except sqlite3.Error:  # the tables are still being created
            return None
        # a RUNNING trial with its learning rate drawn: killed before the draw, it has no value to run again
        # (it is marked FAIL silently), and the test would not see the "runs again" line it checks
        states = [state for state, _ in rows]
        return states.count("COMPLETE") >= 1 and ("RUNNING", 1) in rows or None

    try:
        wait_for("the search to complete a trial and start the next", one_done_one_running, interval=0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=PATIENCE_S)
    done_before = {t.params["train.lr"] for t in study_trials(root, "base")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the uninterrupted run's cells
    status, out, err = cli(capsys, "ablate", path)
    assert status == 0, out + err
    assert "was interrupted; it runs again" in out
    for variant in ("base", "rms"):
        lrs = sorted(t.params["train.lr"] for t in study_trials(root, variant))
        assert lrs == pytest.approx(GRID)  # each grid value once among the COMPLETE trials
    for lr in done_before:  # a finished trial's run was not run again
        assert len([p for p in (root / "tune" / "base" / f"lr-{lr:g}" / "seed-11").iterdir() if p.is_dir()]) == 1
    got = json.loads((root / "tune" / "summary.json").read_text())["variants"]
    ref = json.loads((ref_root / "tune" / "summary.json").read_text())["variants"]
    assert {v: r["best"] for v, r in got.items()} == {v: r["best"] for v, r in ref.items()}
    assert _results(root) == _results(ref_root)
    assert tuned_table(root) == tuned_table(ref_root)
