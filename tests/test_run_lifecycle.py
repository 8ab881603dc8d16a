"""Run directories over their life: resume from the run's own spec, one process per run, branches, names."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minigpt_core import parse_spec
from minigpt_core.base import toml as _toml
from minigpt_core.base.errors import SpecError
from minigpt_core.train import train
from minigpt_core.train.lock import RunLock, RunLockedError
from training_utils import PATIENCE_S, ROOT, cli, losses, read_metrics, runs_of, tiny_spec_data, write_spec

quiet = dict(progress=False, write=lambda s: None)


def tree_hashes(directory: Path, skip: tuple[str, ...] = (".lock",)) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink() and p.name not in skip}


def interrupt_when(path_glob: str, base: Path, ready) -> threading.Thread:
    """SIGINT this process (as Ctrl-C would) once a file under ``base`` satisfies ``ready``."""
    def watch():
        deadline = time.time() + PATIENCE_S
        while time.time() < deadline:
            found = list(base.glob(path_glob))
            if found and ready(found[0]):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- 1: resume from the run's own spec ---------------------------------------------------------
@pytest.mark.slow
def test_resume_uses_the_runs_spec_with_its_set_values_and_refuses_other_changes(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"eval_every": 0, "save_every": 0, "log_every": 1})
    # the run's spec differs from the file by its --set values; Ctrl-C after a few steps
    watcher = interrupt_when("runs/tiny-test/*/metrics.jsonl", tmp_path,
                             lambda p: p.read_text().count("train/loss") >= 3)
    status, out, err = cli(capsys, "train", spec, "--no-progress", "--set", "train.max_steps=100000",
                           "--set", "train.lr=1e-3", "--set", "train.warmup_steps=3")
    watcher.join()
    assert status == 130, err
    (run,) = runs_of(tmp_path / "runs")
    step = max(losses(run))
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert f"continue with: minigpt train --resume {ckpt}\n" in out  # no experiment file needed

    # the file without the --set values: refused, naming each field that would change, nothing written
    before = tree_hashes(run)
    status, _, err = cli(capsys, "train", spec, "--resume", run, "--no-progress")
    assert status == 2 and "Traceback" not in err
    assert "train.lr: the run has 0.001, now 0.003" in err
    assert "train.warmup_steps: the run has 3, now 2" in err
    assert "train.max_steps" not in err.split("--set may change")[0]  # a safe change is not a reason
    assert tree_hashes(run) == before

    # the printed command, with a new budget: the run's own lr and warm-up, the budget change said
    status, out, err = cli(capsys, "train", "--resume", ckpt, "--no-progress", "--set", f"train.max_steps={step + 2}")
    assert status == 0, err
    assert f"train.max_steps 100000 -> {step + 2}" in out
    saved = _toml.loads((run / "spec.toml").read_text())["train"]
    assert (saved["lr"], saved["warmup_steps"], saved["max_steps"]) == (1e-3, 3, step + 2)
    assert sorted(losses(run)) == list(range(1, step + 3))

    # the experiment file with the run's --set values still resumes its latest run
    status, _, err = cli(capsys, "train", spec, "--resume", "--no-progress", "--set", "train.lr=1e-3",
                         "--set", "train.warmup_steps=3", "--set", f"train.max_steps={step + 3}")
    assert status == 0, err
    assert max(losses(run)) == step + 3


def test_train_needs_a_file_or_a_run_to_resume(tmp_path, capsys):
    for args in ([], ["--resume"]):
        status, _, err = cli(capsys, "train", *args)
        assert status == 2 and "Traceback" not in err
        assert "needs an experiment file" in err and "--resume runs/NAME/RUN" in err


# -- 2: one process per run -------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_in_use_is_refused_naming_its_holder_and_is_free_once_the_holder_dies(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 2})
    assert cli(capsys, "train", spec, "--no-progress")[0] == 0
    (run,) = runs_of(tmp_path / "runs")
    # another process holding the run's lock the way a trainer does (flock + its PID and host)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, json, os, socket, sys; "
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.ftruncate(fd, 0); "
         "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode()); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hashes(run)
        status, _, err = cli(capsys, "train", spec, "--resume", run, "--no-progress", "--set", "train.max_steps=6")
        assert status == 2 and "Traceback" not in err
        assert f"process {holder.pid} on host {socket.gethostname()}" in err
        assert str(run / ".lock") in err
        assert tree_hashes(run) == before  # nothing written, nothing pruned
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves a stale file, not a lock
        holder.wait(timeout=PATIENCE_S)
    status, _, err = cli(capsys, "train", "--resume", run, "--no-progress", "--set", "train.max_steps=6")
    assert status == 0, err
    assert sorted(losses(run)) == list(range(1, 7))


def test_the_trainer_holds_its_runs_lock_while_it_trains(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 2}))
    first = train(spec, **quiet)
    refusals = []

    def during(text):  # called from inside the training loop of the resumed run
        if text.startswith("step 6"):
            with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
                train(spec, resume=first.run_dir, **quiet)
            refusals.append(text)

    train(spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 6})}),
          resume=first.run_dir, progress=False, write=during)
    assert refusals and sorted(losses(first.run_dir)) == list(range(1, 7))
    RunLock(first.run_dir).acquire().release()  # released at the end


# -- 3: an earlier checkpoint starts a branch ---------------------------------------------------
def test_resuming_from_an_earlier_checkpoint_branches_and_leaves_the_run_as_it_was(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 6, "save_every": 2, "eval_every": 2, "keep_last": 10,
                                       "deterministic": True})
    assert cli(capsys, "train", spec, "--no-progress")[0] == 0
    (run,) = runs_of(tmp_path / "runs")
    before = tree_hashes(run)
    parent = run / "checkpoints" / "step_00000002"
    status, out, err = cli(capsys, "train", spec, "--resume", parent, "--no-progress")
    assert status == 0, err
    assert "branch:" in out and "not the latest checkpoint" in out
    assert tree_hashes(run) == before  # steps 4 and 6 (and the metrics) untouched
    branch = next(r for r in runs_of(tmp_path / "runs") if r != run)
    record = json.loads((branch / "branch.json").read_text())
    assert Path(record["parent_checkpoint"]) == parent.resolve() and record["step"] == 2
    assert read_metrics(branch)[0]["event"] == "branch"
    assert sorted(p.name for p in (branch / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    # the same steps from the same state: the branch reproduces the parent's losses exactly
    assert losses(branch) == {s: v for s, v in losses(run).items() if s > 2}


# -- 7: run directories -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", ".", "", "x" * 300, "a/b", ".hidden", "sp ace"])
def test_experiment_names_that_are_not_a_safe_directory_name_are_refused(tmp_path, name):
    with pytest.raises(SpecError, match=r"name: .*not a valid experiment name: use 1 to 100 letters, digits"):
        parse_spec(tiny_spec_data(tmp_path, name=name))


def test_a_bad_name_on_the_command_line_writes_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path)
    status, _, err = cli(capsys, "train", spec, "--set", "name=../../escape", "--no-progress")
    assert status == 2 and "not a valid experiment name" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escape").exists()
    for good in ("quickstart", "gpt2-124m", "run_1.2", "x" * 100):
        assert parse_spec(tiny_spec_data(tmp_path, name=good)).name == good


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from minigpt_core.train.trainer import _new_run_dir

    spec = parse_spec(tiny_spec_data(tmp_path))
    n, made, failed = 24, [], []
    start = threading.Barrier(n)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between every few bytecodes: races show up

    def make():
        start.wait()
        try:
            for _ in range(5):
                made.append(_new_run_dir(spec))
        except OSError as exc:
            failed.append(exc)

    try:
        threads = [threading.Thread(target=make) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not failed
    assert len(set(made)) == len(made) == 5 * n

    # Deterministically, what a race looks like: the name was free when looked at, taken when made
    # (here a dangling link, which exists() reports as free). The next suffix is used instead.
    from datetime import datetime, timedelta

    spec = parse_spec(tiny_spec_data(tmp_path, name="race"))
    base = tmp_path / "runs" / "race"
    base.mkdir(parents=True)
    now = datetime.now()
    for s in range(4):
        (base / (now + timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S")).symlink_to(tmp_path / "gone")
    run = _new_run_dir(spec)
    assert run.is_dir() and not run.is_symlink() and run.name.endswith("-2")


# -- W&B: the upload command covers every session of a resumed run ------------------------------
@pytest.mark.slow
def test_after_a_resume_the_wandb_sync_command_uploads_every_offline_segment(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 2, "save_every": 2, "eval_every": 2},
                      wandb={"mode": "offline", "project": "minigpt-tests"})
    env = {k: os.environ.pop(k) for k in ("WANDB_MODE",) if k in os.environ}
    try:
        assert cli(capsys, "train", spec, "--no-progress")[0] == 0
        (run,) = runs_of(tmp_path / "runs")
        status, out, err = cli(capsys, "train", spec, "--resume", run, "--no-progress", "--set", "train.max_steps=4")
    finally:
        os.environ.update(env)
    assert status == 0, err
    segments = sorted((run / "wandb").glob("offline-run-*"))
    # one W&B run id: each segment holds run-<id>.wandb (the folder name can't be parsed for it: W&B adds a
    # "-1" suffix when the resumed segment starts in the same second as the first, as on a fast machine)
    run_files = [f.name for s in segments for f in s.glob("run-*.wandb")]
    assert len(segments) == 2 and len(run_files) == 2 and len(set(run_files)) == 1
    (line,) = [x for x in out.splitlines() if "wandb sync" in x]
    command = line.split("upload it with: ")[1]
    expanded = subprocess.run(f"echo {command}", shell=True, capture_output=True, text=True).stdout.split()
    assert expanded[2:] == [str(s) for s in segments]
