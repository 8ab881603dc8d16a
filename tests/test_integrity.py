"""Hardening: kills during checkpoint pruning/re-saving, divergence, a full disk (issue 8, items 5, 6, 8)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from minigpt_core import parse_spec
from minigpt_core.train import Trainer, load_checkpoint, train
from minigpt_core.checkpoints.state import (
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from minigpt_core.base.errors import MinigptError
from training_utils import PATIENCE_S, cli, read_metrics, runs_of, tiny_spec_data, write_spec

quiet = dict(progress=False, write=lambda s: None)


def _spec(tmp_path, **train_values):
    values = {"max_steps": 4, "save_every": 2, "eval_every": 0, "keep_last": 2, **train_values}
    return parse_spec(tiny_spec_data(tmp_path, train=values))


def _steps(root):
    return [s for s, _ in list_checkpoints(root)]


def _continue(spec, run_dir, max_steps):
    t = spec.train.model_copy(update={"max_steps": max_steps})
    return Trainer(spec.model_copy(update={"train": t}), resume=run_dir, **quiet)


# -- item 5: checkpoint directory edge cases -------------------------------------------------------
def test_a_step_dir_left_half_deleted_is_never_listed_resolved_or_resumed(tmp_path):
    spec = _spec(tmp_path, max_steps=6)
    result = train(spec, **quiet)
    root = result.run_dir / "checkpoints"
    assert _steps(root) == [4, 6]
    # what a SIGKILL in the middle of deleting step 6 used to leave: trainer.json, no weights
    (root / "step_00000006" / "model.safetensors").unlink()
    assert _steps(root) == [4]
    assert resolve_checkpoint(result.run_dir) == root / "step_00000004"
    assert resolve_checkpoint(root / "latest") == root / "step_00000004"  # the link's target is incomplete
    (root / "best").unlink(missing_ok=True)
    os.symlink("step_00000006", root / "best")
    assert resolve_checkpoint(result.run_dir, prefer="best") == root / "step_00000004"
    resumed = _continue(spec, result.run_dir, 8)
    assert resumed.step == 4
    resumed.run()
    # the partial directory is gone, every remaining one is complete
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == ["step_00000006", "step_00000008"]
    for _, path in list_checkpoints(root):
        verify_checkpoint(path)


def test_a_kill_between_the_renames_of_a_re_save_keeps_the_step(tmp_path):
    spec = _spec(tmp_path)
    result = train(spec, **quiet)
    root = result.run_dir / "checkpoints"
    step4 = root / "step_00000004"
    record = (step4 / "trainer.json").read_bytes()
    # save_checkpoint of step 4 again, killed after step_4 -> .step_4.old and before tmp -> step_4
    shutil.copytree(step4, root / ".step_00000004.x1y2.tmp")
    os.replace(step4, root / ".step_00000004.old")
    assert _steps(root) == [2, 4]  # the old copy is still the checkpoint of step 4
    assert resolve_checkpoint(root / "latest").name == ".step_00000004.old"
    resumed = _continue(spec, result.run_dir, 6)
    assert resumed.step == 4
    resumed.run()
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == ["step_00000004", "step_00000006"]
    assert (step4 / "trainer.json").read_bytes() == record  # put back, not deleted
    verify_checkpoint(step4)


def _fs_ops_killed_at(k):
    """In a forked child: SIGKILL the process at its k-th rename/unlink/rmdir/symlink."""
    count = [0]

    def wrap(fn):
        def hooked(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return hooked

    for name in ("replace", "rename", "unlink", "rmdir", "symlink"):
        setattr(os, name, wrap(getattr(os, name)))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a save at each point")
def test_sigkill_at_any_point_of_a_save_leaves_only_complete_checkpoints(tmp_path):
    import torch

    spec = _spec(tmp_path)
    result = train(spec, **quiet)
    root = result.run_dir / "checkpoints"
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    state = load_checkpoint(root / "step_00000004")
    from minigpt_core.model.build import build_model

    model = build_model(spec)
    model.load_state_dict(state.model_state, strict=False)

    def save(step):  # re-save step 4 or write step 6; keep_last=1 prunes the others
        save_checkpoint(root, step, model=model, spec=spec, model_state=None,
                        optimizer_state=state.optimizer_state, rng_states=[{"cpu": torch.get_rng_state()}],
                        trainer={k: v for k, v in state.trainer.items() if k not in ("step", "optimizer", "sha256")},
                        meta=state.meta, keep_last=1)

    for step in (4, 6):
        for k in range(1, 200):
            shutil.rmtree(root)
            shutil.copytree(pristine, root, symlinks=True)
            pid = os.fork()
            if pid == 0:  # the child: save, killed at the k-th filesystem change
                try:
                    _fs_ops_killed_at(k)
                    save(step)
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status)
            listed = list_checkpoints(root)
            latest = resolve_checkpoint(result.run_dir)
            for _, path in listed:
                verify_checkpoint(path)
            assert 4 in dict(listed) or (step == 6 and 6 in dict(listed)), (step, k, os.listdir(root))
            for link in ("latest", "best"):  # the links may lag a step behind, never at a partial dir
                verify_checkpoint(resolve_checkpoint(root / link) if (root / link).exists() else latest)
            save(step)  # the next save recovers
            assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == [f"step_0000000{step}"]
            if not killed:
                break
        assert not killed and k > 5


# -- item 6: divergence ------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_a_message_and_keeps_finite_checkpoints(tmp_path, capsys):
    import torch

    # lr 1e4: finite (if absurd) losses up to step 5, NaN from step 6; logged every 5 steps only, so the
    # NaN is caught at the step-6 evaluation/save from the device-side flag
    spec = write_spec(tmp_path, train={"lr": 1e4, "warmup_steps": 0, "schedule": "constant", "max_steps": 12,
                                       "log_every": 5, "eval_every": 2, "save_every": 2, "keep_last": 10})
    status, _, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2 and "Traceback" not in err
    m = re.search(r"Training diverged at step (\d+): the (training loss|gradient norm) became NaN or infinite", err)
    assert m and 5 < int(m.group(1)) < 12, err  # step 6 here; a different BLAS may shift it by a step
    assert "the last finite training loss was" in err and "at step 5" in err
    assert "Lower train.lr (now 10000)" in err and "warmup_steps" in err
    (run,) = runs_of(tmp_path / "runs")
    root = run / "checkpoints"
    assert _steps(root) == list(range(2, int(m.group(1)), 2))  # nothing saved at or after the divergence
    for link in ("latest", "best"):
        ckpt = resolve_checkpoint(run, prefer=link)
        state = load_checkpoint(ckpt)
        assert all(torch.isfinite(t).all() for t in state.model_state.values())
        assert state.trainer["best_val_loss"] is not None and state.trainer["best_val_loss"] < float("inf")
    assert read_metrics(run)[-1]["event"] == "diverged"
    status, out, err = cli(capsys, "sample", run, "--prompt", "The", "--max-new-tokens", "5", "--seed", "0")
    assert status == 0 and out.startswith("The"), err


def test_a_non_finite_validation_loss_never_becomes_best_and_nan_weights_are_never_saved(tmp_path):
    import torch

    spec = _spec(tmp_path, max_steps=4, eval_every=2)
    trainer = Trainer(spec, **quiet)
    finite_eval = trainer.evaluate
    trainer.evaluate = lambda: float("nan") if trainer.step == 2 else finite_eval()
    with pytest.raises(MinigptError, match="diverged at step 2: the validation loss"):
        trainer.run()
    assert trainer.best_step is None and not list_checkpoints(trainer.run_dir / "checkpoints")
    # the safety net: a save of NaN weights is refused, whatever let them through
    trainer = Trainer(spec, **quiet)
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(MinigptError, match="the weights became NaN or infinite"):
        trainer.save()
    assert not list_checkpoints(trainer.run_dir / "checkpoints")


def test_the_learning_rate_must_be_finite(tmp_path, capsys):
    status, _, err = cli(capsys, "train", write_spec(tmp_path), "--set", "train.lr=inf")
    assert status == 2 and "train.lr: Input should be a finite number" in err
    status, _, err = cli(capsys, "train", write_spec(tmp_path), "--set", "train.min_lr=nan")
    assert status == 2 and "train.min_lr: Input should be a finite number" in err


# -- item 8: a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 1 MiB (a tmpfs): writes past it fail with ENOSPC, as on a full disk."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_message_and_earlier_checkpoints_stay_intact(tmp_path, small_disk, capsys):
    # a checkpoint of this model is ~0.4 MB: the second fits on the 1 MiB disk, the third cannot
    spec = write_spec(tmp_path, train={"out_dir": str(small_disk / "runs"), "max_steps": 12, "save_every": 2,
                                       "eval_every": 2, "keep_last": 3})
    status, _, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1, err
    (run,) = runs_of(small_disk / "runs")
    root = run / "checkpoints"
    assert f"error: Cannot write {root / 'step_00000006'}: the disk (or your quota) is full (" in err
    assert " free on " in err and "it needs about 3" in err and "--resume" in err
    assert _steps(root) == [2, 4]
    for _, path in list_checkpoints(root):
        verify_checkpoint(path)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no partial leftovers take space


def test_a_full_disk_while_logging_metrics_names_the_log(small_disk):
    from minigpt_core.base.disk import DiskFullError
    from minigpt_core.train.loggers import JsonlLogger

    logger = JsonlLogger(small_disk / "metrics.jsonl")
    logger.log({"train/loss": 1.5}, step=1)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # someone else fills the disk
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
    with pytest.raises(DiskFullError, match=f"Cannot write {small_disk / 'metrics.jsonl'}: the disk"):
        for step in range(2, 10_000):
            logger.log({"train/loss": 1.5}, step=step)
    logger.close()  # quietly: the lost line was reported already
    assert (small_disk / "metrics.jsonl").read_text().startswith('{"step": 1,')


def _fill(disk):
    with open(disk / "filler", "wb", buffering=0) as f:  # someone else fills the disk
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)


@pytest.mark.slow
def test_a_full_disk_under_wandb_is_one_message_not_a_traceback_per_line(tmp_path, small_disk, capsys):
    from minigpt_core.base.disk import DiskFullError
    from minigpt_core.spec import WandbSpec
    from minigpt_core.train.loggers import WandbLogger

    logger = WandbLogger(WandbSpec(mode="offline"), name="full", run_dir=small_disk / "a", config={})
    logger.log({"train/loss": 1.0}, step=1)
    _fill(small_disk)
    with pytest.raises(DiskFullError, match=r"Cannot write .*table\.json: the disk \(or your quota\) is full"):
        logger.log_sample(2, "The", " end")
    logger.close()
    # a run started on the full disk: W&B's own log file fails at every line it writes
    with pytest.raises(MinigptError, match=r"Cannot write .*debug\.log: the disk \(or your quota\) is full"):
        WandbLogger(WandbSpec(mode="offline"), name="full", run_dir=small_disk / "b", config={})
    _, err = capsys.readouterr()
    assert "Traceback" not in err and "Logging error" not in err, err


@pytest.mark.slow
def test_a_file_size_limit_stops_with_one_message_too(tmp_path):
    # needs no root (unlike the tmpfs above): ulimit -f makes a large write fail with EFBIG
    import subprocess
    import sys

    spec = write_spec(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 0})
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from minigpt_core.cli.app import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "train", str(spec), "--no-progress"], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=PATIENCE_S)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    (run,) = runs_of(tmp_path / "runs")
    assert f"error: Cannot write {run / 'checkpoints' / 'step_00000002'}: the file size limit (ulimit -f)" in r.stderr
    assert not list((run / "checkpoints").iterdir())  # nothing partial left behind
