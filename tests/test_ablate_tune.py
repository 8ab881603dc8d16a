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

from ablation_utils import ablate_in_process, cells_by_id, final_val, write_ablation
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


def _complete(root: Path, variant: str) -> list:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=variant, storage=f"sqlite:///{root / 'tune' / f'{variant}.db'}")
    return study.get_trials(states=(TrialState.COMPLETE,))


def _results(root: Path) -> list[tuple]:
    with open(root / "results.csv", encoding="utf-8") as f:
        return [(r["variant"], r["seed"], r["overrides"], r["status"], r["final_val_loss"]) for r in csv.DictReader(f)]


def _tuned_table(root: Path) -> list[str]:
    text = (root / "report.md").read_text(encoding="utf-8")
    return [ln for ln in text.splitlines()[text.splitlines().index("## Tuned `train.lr`"):] if ln.startswith("| ")]


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
        assert sorted(t.params["train.lr"] for t in _complete(root, variant)) == pytest.approx(GRID)
        # the evaluation cell trained with it, and its overrides (so the report) show it
        cell = cells[f"{variant}/seed-1"]
        assert cell["status"] == "done" and cell["overrides"]["train.lr"] == pytest.approx(best)
        assert f"lr = {best}" in (Path(cell["run_dir"]) / "spec.toml").read_text()
        assert chosen["at_edge"] == (best in (GRID[0], GRID[-1]))
    table = _tuned_table(root)
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
    done_before = {t.params["train.lr"] for t in _complete(root, "base")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the uninterrupted run's cells
    status, out, err = cli(capsys, "ablate", path)
    assert status == 0, out + err
    assert "was interrupted; it runs again" in out
    for variant in ("base", "rms"):
        lrs = sorted(t.params["train.lr"] for t in _complete(root, variant))
        assert lrs == pytest.approx(GRID)  # each grid value once among the COMPLETE trials
    for lr in done_before:  # a finished trial's run was not run again
        assert len([p for p in (root / "tune" / "base" / f"lr-{lr:g}" / "seed-11").iterdir() if p.is_dir()]) == 1
    got = json.loads((root / "tune" / "summary.json").read_text())["variants"]
    ref = json.loads((ref_root / "tune" / "summary.json").read_text())["variants"]
    assert {v: r["best"] for v, r in got.items()} == {v: r["best"] for v, r in ref.items()}
    assert _results(root) == _results(ref_root)
    assert _tuned_table(root) == _tuned_table(ref_root)


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
    import optuna
    from optuna.trial import TrialState

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
        study = optuna.load_study(study_name=f"{size}/base", storage=f"sqlite:///{root / 'tune' / size / 'base.db'}")
        assert sorted(t.params["train.lr"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == \
            pytest.approx([1e-3, 3e-2])
        cell = cells[f"{size}/base/seed-1"]
        assert cell["status"] == "done" and cell["overrides"]["train.lr"] == pytest.approx(best)
        assert f"lr = {best}" in (Path(cell["run_dir"]) / "spec.toml").read_text()
    table = _tuned_table(tmp_path / "runs" / "tsc")
    assert table[0] == "| size | variant | chosen train.lr | tuning val loss | trials |"
    assert any(row.startswith("| `s` | `base` | ") for row in table)
    assert any(row.startswith("| `m` | `base` | ") for row in table)
    assert (root / "lr.png").stat().st_size > 1000


# -- Ctrl-C during a search ------------------------------------------------------------------------------------
STOPPED = '''
name = "tstop"
base = "base.toml"
seeds = [1]
[variants.base]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
[tune]
seeds = [11]
grid = [1e-3, 3e-2]
overrides = { "train.max_steps" = 6, "train.log_every" = 1 }
'''


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_search_stops_with_the_continue_line_and_the_trial_runs_again(
        tmp_path, capsys, monkeypatch, sig):
    from minigpt_core.ablation.runner import _die_with_parent

    path = write_ablation(tmp_path, STOPPED, max_steps=6, eval_every=6, save_every=6)
    root = tmp_path / "runs" / "tstop"
    # each step sleeps 0.3 s per attention call: the trial is still training when the signal comes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_TEST_SLOW_S": "0.3"}
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")

    def own_group_dying_with_us():  # a terminal's Ctrl-C reaches the whole group; no orphan if pytest dies
        os.setsid()
        _die_with_parent()

    proc = subprocess.Popen([str(MINIGPT), "ablate", str(path)], stdout=out, stderr=err, env=env, cwd=tmp_path,
                            preexec_fn=own_group_dying_with_us)

    def first_trial_training():
        if proc.poll() is not None:
            raise AssertionError(f"minigpt ablate ended (exit status {proc.returncode}) before a trial trained")
        for metrics in (root / "tune" / "base").glob("lr-*/seed-11/*/metrics.jsonl"):
            lines = metrics.read_text().splitlines()[:-1]  # the last line may be half written
            if any("train/loss" in json.loads(line) for line in lines):
                return metrics.parent
        return None

    try:
        run = wait_for("a tuning run to train", first_trial_training)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        proc.wait(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (") and "the search of base stopped" in last and \
        f"continue with: minigpt ablate {path}" in last, stderr
    # the trial that was training: FAIL in the study (never COMPLETE, never left RUNNING), no cell started
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="base", storage=f"sqlite:///{root / 'tune' / 'base.db'}")
    states = [t.state for t in study.get_trials()]
    assert states[-1] == TrialState.FAIL and TrialState.RUNNING not in states, states
    lr = float(run.parent.parent.name.removeprefix("lr-"))
    assert not (root / "base").exists()  # no evaluation cell
    # a study stopped while searching is already an ablation directory: `report` shows its cells as missing
    monkeypatch.chdir(tmp_path)
    status, out1, err1 = cli(capsys, "report", str(root), "--no-wandb")
    assert status == 0, out1 + err1
    assert "| `base` |" in out1 and "1 missing" in out1
    # the next run (no sleeps now) runs that value again and finishes the search and the cell
    status, out2, err2 = cli(capsys, "ablate", path)
    assert status == 0, out2 + err2
    assert f"train.lr = {lr:g} on seeds 11" in out2
    assert sorted(t.params["train.lr"] for t in _complete(root, "base")) == pytest.approx([1e-3, 3e-2])
    assert cells_by_id(root)["base/seed-1"]["status"] == "done"


# -- trials as jobs of the executor --------------------------------------------------------------------------
@pytest.mark.slow
def test_trials_run_as_submitit_jobs_with_the_executor(tmp_path):
    pytest.importorskip("submitit")
    path = write_ablation(tmp_path, '''
name = "tsub"
base = "base.toml"
seeds = [1]
[variants.base]
[tune]
seeds = [11, 12]
grid = [1e-3, 3e-2]
overrides = { "train.max_steps" = 4 }
''', max_steps=4, eval_every=2, save_every=0)
    status, out, err = ablate_in_process(path, "--executor", "submitit-local", "--jobs", "2", cwd=tmp_path,
                                         env={"OMP_NUM_THREADS": "1"})
    assert status == 0, out + err
    root = tmp_path / "runs" / "tsub"
    # every trial run was a submitit job: its pickled call and its result in submitit's folder, one per run
    results = list((root / "submitit").glob("*_result.pkl"))
    assert len(results) == 2 * 2 + 1, sorted(p.name for p in (root / "submitit").iterdir())
    summary = json.loads((root / "tune" / "summary.json").read_text())["variants"]["base"]
    losses = {}
    for lr in (1e-3, 3e-2):  # the objective: the mean over both tuning seeds' runs
        runs = [next(p for p in (root / "tune" / "base" / f"lr-{lr:g}" / f"seed-{s}").iterdir() if p.is_dir())
                for s in (11, 12)]
        losses[lr] = sum(final_val(r) for r in runs) / 2
    assert summary["trials"] == [[lr, pytest.approx(loss)] for lr, loss in sorted(losses.items())]
    assert cells_by_id(root)["base/seed-1"]["overrides"]["train.lr"] == pytest.approx(min(losses, key=losses.get))
