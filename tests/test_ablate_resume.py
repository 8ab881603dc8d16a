"""`minigpt ablate` SIGKILLed in the middle of a cell, then rerun: the cell resumes from its checkpoint
and ends as an uninterrupted run would. The console script in a real process, since it is killed.

A file of its own (the longest ablation test) so that it runs beside the other ablation files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ablation_utils import cells_by_id, write_ablation
from minigpt_core.train.lock import lock_holder
from minigpt_core.checkpoints.state import list_checkpoints
from training_utils import MINIGPT, PATIENCE_S, cli, wait_for


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


SLOW = '''
name = "killed"
base = "base.toml"
seeds = [1]
plugins = []
[variants.first]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
[variants.second]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.slow"
"model.norm.name" = "modern.rmsnorm"
'''


@pytest.mark.slow
def test_sigkill_mid_cell_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    from minigpt_core.ablation.runner import cores

    path = write_ablation(tmp_path, SLOW.replace("plugins = []\n", ""), max_steps=40, save_every=10,
                          eval_every=10)
    root = tmp_path / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(MINIGPT), "ablate", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)

    def running_second_cell():
        # its run directory once the manifest names it (the runner records it a moment after the
        # trainer makes it) and a checkpoint is in it to resume from
        try:
            cell = cells_by_id(root)["second/seed-1"]
        except (OSError, ValueError, KeyError):  # no manifest yet (it is written whole, by a rename)
            return None
        run = cell["run_dir"]
        return run if cell["status"] == "running" and run and list_checkpoints(Path(run) / "checkpoints") else None

    try:
        killed_run = wait_for("the second cell to run and save a checkpoint", running_second_cell, interval=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=PATIENCE_S)
    cells = cells_by_id(root)
    assert cells["first/seed-1"]["status"] == "done" and cells["second/seed-1"]["status"] == "running"
    assert cells["second/seed-1"]["run_dir"] == killed_run
    # the cell dies with its parent (and the kernel drops its run's lock then): its run never reaches step 40
    wait_for("the killed cell's process to end", lambda: lock_holder(killed_run) is None)
    steps = [json.loads(x).get("step") for x in (Path(killed_run) / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 40
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    assert "1 done, 1 to run" in out and f"resuming {killed_run}" in out and out.count("[first/seed-1]") == 0
    after = cells_by_id(root)
    assert after["second/seed-1"]["run_dir"] == killed_run and after["first/seed-1"] == cells["first/seed-1"]
    records = [json.loads(x) for x in (Path(killed_run) / "metrics.jsonl").read_text().splitlines()]
    (resumed,) = [r for r in records if r.get("event") == "resume"]
    assert 10 <= resumed["step"] < 40  # from the checkpoint the killed cell left, not from its end
    # the same cells, uninterrupted, in this process
    threads = max(1, cores())
    for cid in ("first/seed-1", "second/seed-1"):
        cell = root / cid / "cell.toml"
        status, out, err = cli(capsys, "train", cell, "--no-progress", "--set", f"train.threads={threads}",
                               "--set", f"train.out_dir={tmp_path / 'reference' / cid}")
        assert status == 0, err
        (ref,) = [p for p in (tmp_path / "reference" / cid / "seed-1").iterdir() if p.is_dir()]
        ref_vals = {json.loads(x)["step"]: json.loads(x)["val/loss"]
                    for x in (ref / "metrics.jsonl").read_text().splitlines() if "val/loss" in x}
        got_vals = {json.loads(x)["step"]: json.loads(x)["val/loss"]
                    for x in (Path(after[cid]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
                    if "val/loss" in x}
        assert got_vals == ref_vals and len(ref_vals) == 4


# -- stopping an ablation -----------------------------------------------------------------------------
def _ablate_then_stop(tmp_path: Path, how: str, sig: signal.Signals):
    """`minigpt ablate` on two endless cells (its own process group), stopped by ``sig`` sent to ``how``
    ("group": a terminal's Ctrl-C, "ablate": that process alone, "cell": the running cell alone) once the
    first cell is training. Returns (process, stdout, stderr, ablation root)."""
    path = write_ablation(tmp_path, SLOW.replace("plugins = []\n", ""), max_steps=100_000, save_every=0,
                          eval_every=0)
    root = tmp_path / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")
    from minigpt_core.ablation.runner import _die_with_parent

    def own_group_dying_with_us():  # a process group of its own, and no orphan if pytest itself is killed
        os.setsid()
        _die_with_parent()

    proc = subprocess.Popen([str(MINIGPT), "ablate", str(path), "--set", "train.log_every=1"], stdout=out,
                            stderr=err, env=env, cwd=tmp_path, preexec_fn=own_group_dying_with_us)

    def first_cell_training():
        # its run (which its trainer reports at once) with a logged step: the training loop, and its
        # Ctrl-C handler, are running
        try:
            cell = cells_by_id(root)["first/seed-1"]
            lines = (Path(cell["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        whole = [json.loads(line) for line in lines[:-1]]  # the last line may be half written
        return cell if any("train/loss" in r for r in whole) else None

    try:
        cell = wait_for("the first cell to train", first_cell_training)
        if how == "group":
            os.killpg(proc.pid, sig)
        elif how == "ablate":
            proc.send_signal(sig)
        else:
            os.kill(int(cell["job_id"]), sig)
        proc.wait(timeout=PATIENCE_S)  # the cells would train for hours if nothing stopped them
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out.seek(0), err.seek(0)
    return proc, out.read(), err.read(), root


@pytest.mark.slow
@pytest.mark.parametrize("how,sig", [("group", signal.SIGINT), ("ablate", signal.SIGINT),
                                     ("ablate", signal.SIGTERM), ("cell", signal.SIGINT)],
                         ids=["ctrl-c-to-group", "sigint-to-ablate", "sigterm-to-ablate", "sigint-to-cell"])
def test_ctrl_c_or_sigterm_stops_the_ablation_with_the_cell_saved_and_no_next_cell(tmp_path, how, sig):
    proc, out, err, root = _ablate_then_stop(tmp_path, how, sig)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (") and "continue with: minigpt ablate " in last and \
        "--set=train.log_every=1" in last, err
    assert err.count("interrupted (") == 1, err
    cells = cells_by_id(root)
    first, second = cells["first/seed-1"], cells["second/seed-1"]
    # the stopped cell: resumable (not "running"), from the checkpoint it saved on the way out
    assert first["status"] == "pending" and "interrupted" in first["error"], first
    saved = [s for s, _ in list_checkpoints(Path(first["run_dir"]) / "checkpoints")]
    assert saved and 0 < saved[-1] < 100_000
    assert lock_holder(first["run_dir"]) is None  # its process is gone
    # no next cell was started
    assert second["status"] == "pending" and second["attempts"] == 0 and second["run_dir"] is None
    assert not (root / "second").exists()
    assert "[second/seed-1]" not in out
