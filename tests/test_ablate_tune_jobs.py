"""[tune] searches as jobs: stopped by Ctrl-C or SIGTERM mid-trial (and resumed), and trials run by the
submitit executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from ablation_utils import ablate_in_process, cells_by_id, final_val, study_trials, write_ablation
from training_utils import MINIGPT, PATIENCE_S, cli, wait_for


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


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
    assert sorted(t.params["train.lr"] for t in study_trials(root, "base")) == pytest.approx([1e-3, 3e-2])
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


# -- --jobs with fewer tuning seeds than jobs: searches side by side ---------------------------------------------
@pytest.mark.slow
def test_jobs_2_with_one_tuning_seed_runs_two_searches_at_once(tmp_path):
    path = write_ablation(tmp_path, '''
name = "tpar"
base = "base.toml"
seeds = [1]
[variants.a]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
[variants.b]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
"model.norm.name" = "modern.rmsnorm"
[tune]
seeds = [11]
grid = [1e-3, 3e-2]
overrides = { "train.max_steps" = 4 }
''', max_steps=4, eval_every=2, save_every=0)
    # 0.05 s per attention call: each trial run trains for a few seconds after its start-up
    status, out, err = ablate_in_process(path, "--jobs", "2", cwd=tmp_path,
                                         env={"OMP_NUM_THREADS": "1", "MINIGPT_TEST_SLOW_S": "0.05"})
    assert status == 0, out + err
    root = tmp_path / "runs" / "tpar"

    def span(variant: str, lr: float) -> tuple[float, float]:  # from the run's first file to its last write
        (run,) = [p for p in (root / "tune" / variant / f"lr-{lr:g}" / "seed-11").iterdir() if p.is_dir()]
        return (run / "spec.toml").stat().st_mtime, (run / "metrics.jsonl").stat().st_mtime

    # both searches start with the grid's first value at the same moment: their runs overlap in time
    first = next(line for line in out.splitlines() if line.startswith("[tune a] trial 0: "))
    lr = float(first.split("train.lr = ")[1].split()[0])
    (a0, a1), (b0, b1) = span("a", lr), span("b", lr)
    assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))
    summary = json.loads((root / "tune" / "summary.json").read_text())["variants"]
    assert list(summary) == ["a", "b"] and all(len(r["trials"]) == 2 for r in summary.values())
    for v in ("a", "b"):
        assert cells_by_id(root)[f"{v}/seed-1"]["overrides"]["train.lr"] == pytest.approx(summary[v]["best"])
