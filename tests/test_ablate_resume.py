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
