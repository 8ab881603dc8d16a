"""Several processes: torchrun with gloo on CPU gives the losses of one process (DDP and FSDP2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_core.train import load_checkpoint
from training_utils import PATIENCE_S, ROOT, cli, losses, runs_of, wait_for, write_spec

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
def test_two_gloo_ranks_log_the_losses_of_one_process(tmp_path, capsys, strategy):
    # 8 sequences per step in micro-batches of 2: 1 process accumulates 4, each of 2 ranks 2
    # (so the inner micro-batches skip the all-reduce).
    spec = write_spec(tmp_path, train={"max_steps": 6, "batch_size": 8, "micro_batch_size": 2, "strategy": strategy,
                                       "eval_every": 3, "save_every": 3, "sample_every": 6, "sample_tokens": 8,
                                       "log_every": 1})
    # the one-process reference in this process (no start-up); the two ranks are processes
    status, one_out, err = cli(capsys, "train", spec, "--no-progress", "--set", f"train.out_dir={tmp_path / 'one'}")
    assert status == 0, err
    two = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "minigpt", "train", str(spec),
         "--no-progress", "--set", f"train.out_dir={tmp_path / 'two'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "1 process(es)" in one_out
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
    status, out, err = cli(capsys, "train", spec, "--resume", run_two, "--no-progress", "--set", "train.max_steps=7",
                           "--set", f"train.out_dir={tmp_path / 'two'}")
    assert status == 0, err
    assert "re-seeded" in out and 7 in losses(run_two)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and _fsdp2_available()), reason="reads /proc; needs FSDP2")
def test_train_joins_the_process_group_threads_before_returning(tmp_path, monkeypatch):
    # Threads of a group left alive (FSDP2 and torch's DTensor caches hold it) run on into
    # interpreter exit, where a rank could abort ("terminate called without an active exception").
    import torch.distributed as dist

    from minigpt_core import parse_spec
    from minigpt_core.train import train
    from training_utils import tiny_spec_data

    def gloo_threads():
        names = []
        for task in Path("/proc/self/task").iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except OSError:  # the thread ended meanwhile
                pass
        return [n for n in names if "gloo" in n]

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    # torchrun --nproc_per_node 1 in this process: a file store, so no port to race for
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wait_for("gloo's threads to start", gloo_threads)  # a new thread names itself a moment after it starts
        spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 2, "strategy": "fsdp", "eval_every": 2,
                                                          "save_every": 2, "peak_flops": 1e12}))
        result = train(spec, progress=False, write=lambda s: None)
        assert result.step == 2 and not dist.is_initialized()
        # the threads end once the group is destroyed; a leak keeps them for good, so a few minutes is generous
        wait_for("gloo's threads to end", lambda: not gloo_threads(), timeout=300)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
