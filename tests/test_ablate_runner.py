"""`minigpt ablate`'s runner: failed and stale cells on a rerun, and the executors (submitit, Slurm).

A file of its own so that it runs on another test worker than test_ablate.py's shared ablation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ablation_utils import ablate_in_process, cells_by_id, final_val, manifest_of, write_ablation
from training_utils import cli


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


RETRY_PLUGIN = '''
import os
from pathlib import Path
from minigpt_core.plugin import Params, hookimpl
from minigpt_core.checkpoints.state import list_checkpoints
from minigpt_torch import SDPAttention


class FailsAfterCheckpoint(SDPAttention):
    """Raises once a run under $MINIGPT_TEST_WATCH has a checkpoint: a crash in the middle of a cell."""

    def forward(self, x):
        watch = os.environ.get("MINIGPT_TEST_WATCH")
        if watch and any(list_checkpoints(run / "checkpoints") for run in Path(watch).glob("*")):
            raise RuntimeError("boom after a checkpoint")
        return super().forward(x)


@hookimpl
def minigpt_register(registry):
    registry.add("attention", "test.fails_after_checkpoint",
                 lambda ctx, p: FailsAfterCheckpoint(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias),
                 params=Params, description="raises once its run has a checkpoint", capabilities={"causal"})
'''


@pytest.mark.slow  # cells as `minigpt train` processes
def test_retry_failed_starts_a_cell_that_failed_after_a_checkpoint_afresh(tmp_path, capsys, monkeypatch):
    # A failed run's checkpoints hold what led to the failure (a bug, a bad state): --retry-failed runs
    # the cell again from step 0 as a new run, not on from the failed run's last checkpoint.
    from minigpt_core.runs import read_metrics
    from minigpt_core.checkpoints.state import list_checkpoints

    path = write_ablation(tmp_path, '''
name = "retry"
base = "base.toml"
seeds = [1]
[variants.crashy]
plugins = ["plugins/crashy.py"]
"model.attention.name" = "test.fails_after_checkpoint"
''', max_steps=6, save_every=2, eval_every=0)
    (tmp_path / "plugins" / "crashy.py").write_text(RETRY_PLUGIN, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "retry"
    monkeypatch.setenv("MINIGPT_TEST_WATCH", str(root / "crashy" / "seed-1"))
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 1, out + err
    failed = cells_by_id(root)["crashy/seed-1"]
    assert failed["status"] == "failed" and "boom after a checkpoint" in failed["error"]
    assert [s for s, _ in list_checkpoints(Path(failed["run_dir"]) / "checkpoints")] == [2]  # a resumable run

    monkeypatch.delenv("MINIGPT_TEST_WATCH")  # the bug is fixed
    status, out, err = cli(capsys, "ablate", path, "--no-report", "--retry-failed")
    assert status == 0, out + err
    assert "[crashy/seed-1] starting" in out and "resuming" not in out
    cell = cells_by_id(root)["crashy/seed-1"]
    assert cell["status"] == "done" and cell["attempts"] == 2
    assert cell["run_dir"] != failed["run_dir"] and cell["previous_runs"] == [failed["run_dir"]]
    records = read_metrics(cell["run_dir"])
    assert [r["event"] for r in records if "event" in r] == ["start", "finished"]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # cells as `minigpt train` processes
def test_a_running_cell_without_a_live_ablation_is_run_again_without_retry_failed(tmp_path, capsys, monkeypatch):
    # `minigpt ablate` killed outright (SIGKILL, power cut) leaves its cell "running" in the manifest and
    # nobody holding the lock: an interrupted cell, which the next plain run takes up, not a failed one.
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.runner import reconcile, write_manifest

    path = write_ablation(tmp_path, '''
name = "stale"
base = "base.toml"
seeds = [1]
[variants.only]
''', max_steps=2, save_every=0, eval_every=0)
    monkeypatch.chdir(tmp_path)
    plan = load_plan(path, probe=False)
    manifest = reconcile(plan, None, force=False)
    manifest["cells"][0].update(status="running", attempts=1, started=1.0, host="elsewhere", job_id="12345")
    write_manifest(plan.root, manifest)
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    assert "0 done, 1 to run" in out and "--retry-failed" not in out
    cell = cells_by_id(plan.root)["only/seed-1"]
    assert cell["status"] == "done" and cell["attempts"] == 2


# -- executors ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_submitit_local_executor_runs_a_two_cell_ablation(tmp_path):
    pytest.importorskip("submitit")
    path = write_ablation(tmp_path, '''
name = "sub"
base = "base.toml"
seeds = [1, 2]
[variants.ln]
''', max_steps=4, eval_every=2, save_every=0)
    # `minigpt ablate` in this process (a start-up saved); submitit's jobs and the cells are processes
    status, out, err = ablate_in_process(path, "--executor", "submitit-local", "--jobs", "2", cwd=tmp_path)
    assert status == 0, out + err
    root = tmp_path / "runs" / "sub"
    cells = cells_by_id(root)
    assert [c["status"] for c in cells.values()] == ["done", "done"]
    assert manifest_of(root)["settings"]["executor"] == "submitit-local"
    assert list((root / "submitit").iterdir())  # submitit's own job folder
    assert all(final_val(c["run_dir"]) > 0 for c in cells.values())


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    path = write_ablation(tmp_path, 'base = "base.toml"\n[variants.a]\n')
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    status, out, err = cli(capsys, "ablate", path, "--executor", "slurm")
    assert status == 2 and "pip install 'minigpt[cluster]'" in err
    assert not (tmp_path / "runs").exists()


# -- which run is a cell's ---------------------------------------------------------------------------
@pytest.mark.slow  # `minigpt ablate`, its cell and a `minigpt train` by hand: three real processes
def test_a_manual_run_beside_a_running_cell_is_never_credited_to_the_cell(tmp_path):
    # A `minigpt train` started by hand on the cell's own spec (same name, same out_dir) makes its run
    # directory beside the cell's while the cell runs. The manifest and the report must name the cell's
    # own run, which its process reports, not whichever new directory shows up. The ablation is stopped
    # (SIGSTOP) from the moment it starts the cell until both runs exist, so it sees both at once: the
    # order in which they appear cannot decide the answer.
    import json
    import os
    import signal
    import subprocess

    from training_utils import MINIGPT, PATIENCE_S, wait_for

    path = write_ablation(tmp_path, '''
name = "crowd"
base = "base.toml"
seeds = [1]
[variants.only]
''', max_steps=4, eval_every=4, save_every=0)
    root = tmp_path / "runs" / "crowd"
    exp_dir = root / "only" / "seed-1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cell_status():
        try:
            return cells_by_id(root)["only/seed-1"]["status"]
        except (OSError, ValueError, KeyError):  # no manifest yet (it is written whole, by a rename)
            return None

    def runs_here():
        return sorted(p for p in exp_dir.iterdir() if p.is_dir()) if exp_dir.is_dir() else []

    with open(tmp_path / "ablate.out", "wb") as log:
        ablate = subprocess.Popen([str(MINIGPT), "ablate", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=tmp_path)
    manual = None
    try:
        wait_for("the ablation to start its cell", lambda: cell_status() == "running")
        ablate.send_signal(signal.SIGSTOP)  # its cell goes on
        own = wait_for("the cell's run directory", runs_here)
        assert len(own) == 1
        own = own[0]
        with open(tmp_path / "manual.out", "wb") as log:  # by hand: 3x the cell's steps, on its very spec
            manual = subprocess.Popen([str(MINIGPT), "train", str(exp_dir / "cell.toml"), "--no-progress",
                                       "--set", "train.max_steps=12"], stdout=log, stderr=subprocess.STDOUT,
                                      env=env, cwd=tmp_path)
        theirs = wait_for("the manual run's directory", lambda: [p for p in runs_here() if p != own])[0]
        ablate.send_signal(signal.SIGCONT)
        assert ablate.wait(timeout=PATIENCE_S) == 0, (tmp_path / "ablate.out").read_text()
        assert manual.wait(timeout=PATIENCE_S) == 0, (tmp_path / "manual.out").read_text()
    finally:
        for proc in (ablate, manual):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

    cell = cells_by_id(root)["only/seed-1"]
    assert Path(cell["run_dir"]).resolve() == own.resolve() != theirs.resolve()
    records = [json.loads(line) for line in (own / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "train/loss" in r) == cell["steps"] == 4
    assert max(r["train/tokens"] for r in records if "train/tokens" in r) == cell["tokens"]
    ours, manual_val = final_val(own), final_val(theirs)
    assert ours != manual_val
    report = (root / "report.md").read_text()
    assert f"{ours:.4f}" in report and f"{manual_val:.4f}" not in report
    rows = (root / "results.csv").read_text()
    assert str(own) in rows and str(theirs) not in rows
    assert not list(exp_dir.glob("ablate.run-dir*"))  # the per-attempt answer files are cleaned up
