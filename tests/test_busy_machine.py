"""A busy CPU (issue 23.5): `minigpt train` says so in one line, with what to do, when other processes
already occupy the cores its threads need (spinning OpenMP threads then make training 5-10x slower)."""

from __future__ import annotations

import pytest

from minigpt_core.base.device import LOADAVG_ENV_VAR, busy_cpu_note, cpu_load
from training_utils import run_minigpt, write_spec


@pytest.mark.parametrize("load, cores, threads, policy, advice", [
    (2.0, 2, 2, None, "OMP_WAIT_POLICY=PASSIVE"),  # the cores are taken before we start
    (9.5, 2, 2, "active", "OMP_WAIT_POLICY=PASSIVE"),
    (17.0, 16, 4, None, "OMP_WAIT_POLICY=PASSIVE"),
    (3.0, 2, 2, "passive", "train.threads=1"),  # already passive: only fewer threads are left to try
    (1.9, 2, 2, None, None),  # a core is still free
    (0.1, 16, 16, None, None),
    (8.0, 2, 1, None, None),  # one thread neither spins nor waits for another
    (None, 2, 2, None, None),  # no load average (Windows)
])
def test_the_note_needs_a_load_of_at_least_the_cores_and_more_than_one_thread(load, cores, threads, policy, advice):
    note = busy_cpu_note(load, cores, threads, policy)
    if advice is None:
        assert note is None
        return
    assert note.startswith("note: this machine is busy") and "\n" not in note
    assert f"load average {load:.1f} on {cores} cores" in note and f"{threads} threads" in note
    assert advice in note and "train.threads=1" in note
    assert ("OMP_WAIT_POLICY=PASSIVE" in note) == (policy != "passive")


def test_the_load_reading_is_the_machines_unless_the_test_hook_supplies_it(monkeypatch):
    monkeypatch.setenv(LOADAVG_ENV_VAR, "7.25")
    assert cpu_load() == 7.25
    monkeypatch.delenv(LOADAVG_ENV_VAR)
    assert cpu_load() >= 0.0


def test_train_on_a_busy_machine_prints_one_line_on_stderr_and_trains(tmp_path):
    spec = write_spec(tmp_path, train={"max_steps": 1, "eval_every": 1, "save_every": 1})
    busy = run_minigpt("train", spec, "--no-progress", "--set", "train.threads=2",
                       env={LOADAVG_ENV_VAR: "40", "OMP_WAIT_POLICY": "ACTIVE"})
    assert busy.returncode == 0, busy.stderr
    notes = [line for line in busy.stderr.splitlines() if "machine is busy" in line]
    assert len(notes) == 1 and "load average 40.0" in notes[0] and "2 threads" in notes[0], busy.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in notes[0]
    idle = run_minigpt("train", spec, "--no-progress", "--set", "train.threads=2", env={LOADAVG_ENV_VAR: "0"})
    assert idle.returncode == 0, idle.stderr
    assert "machine is busy" not in idle.stderr
