"""Several processes: torchrun with gloo on CPU gives the losses of one process (DDP and FSDP2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_core.train import load_checkpoint
from training_utils import ROOT, losses, run_minigpt, runs_of, write_spec

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "ddp",
    pytest.param("fsdp", marks=pytest.mark.skipif(not _fsdp2_available(), reason="needs FSDP2 (torch >= 2.6)")),
])
def test_two_gloo_ranks_log_the_losses_of_one_process(tmp_path, strategy):
    # 8 sequences per step in micro-batches of 2: 1 process accumulates 4, each of 2 ranks 2
    # (so the inner micro-batches skip the all-reduce).
    spec = write_spec(tmp_path, train={"max_steps": 6, "batch_size": 8, "micro_batch_size": 2, "strategy": strategy,
                                       "eval_every": 3, "save_every": 3, "sample_every": 6, "sample_tokens": 8,
                                       "log_every": 1})
    one = run_minigpt("train", spec, "--no-progress", "--set", f"train.out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "minigpt", "train", str(spec),
         "--no-progress", "--set", f"train.out_dir={tmp_path / 'two'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "1 process(es)" in one.stdout
    assert two.stdout.count("validation loss") == 1  # only rank 0 reports
    (run_one,), (run_two,) = runs_of(tmp_path / "one"), runs_of(tmp_path / "two")  # one run dir, by rank 0
    for key in ("train/loss", "val/loss"):
        a, b = losses(run_one, key), losses(run_two, key)
        assert list(a) == list(b) and a
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5, (key, step, a[step], b[step])
    # the checkpoint written by rank 0 holds the full model and resumes in a single process
    ckpt = load_checkpoint(run_two / "checkpoints" / "step_00000006")
    assert ckpt.trainer["world_size"] == 2 and set(ckpt.rng_states) == {0, 1}
    if strategy == "fsdp":
        return  # the gathered checkpoint is the same format; resuming it once (ddp) is enough
    resumed = run_minigpt("train", spec, "--resume", run_two, "--no-progress", "--set", "train.max_steps=7",
                          "--set", f"train.out_dir={tmp_path / 'two'}")
    assert resumed.returncode == 0, resumed.stderr
    assert "re-seeded" in resumed.stdout and 7 in losses(run_two)
