"""Checkpoints: exact resume after SIGKILL, corruption is detected, compiled <-> plain interop."""

from __future__ import annotations

import signal

import pytest
import torch

from minigpt_core import parse_spec
from minigpt_core.checkpoints.checkpoint import load_model_state, model_state_for_saving
from minigpt_core.base.errors import CheckpointError
from minigpt_core.train import Trainer, load_checkpoint, train
from training_utils import cli, kill_training_at, losses, run_minigpt, runs_of, tiny_spec_data, write_spec

quiet = dict(progress=False, write=lambda s: None)


@pytest.mark.slow
def test_resume_after_sigkill_logs_bitwise_identical_losses(tmp_path, capsys):
    # dropout on, so the RNG state must be restored too
    common = dict(model={**tiny_spec_data(tmp_path)["model"], "drop_rate": 0.1},
                  train={"max_steps": 60, "batch_size": 16, "save_every": 5, "eval_every": 20, "keep_last": 20,
                         "deterministic": True, "log_every": 1})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the uninterrupted reference in this process (no start-up); the killed run and its resume are processes
    status, _, err = cli(capsys, "train", write_spec(tmp_path / "a", **common), "--no-progress")
    assert status == 0, err
    spec_b = write_spec(tmp_path / "b", **common)
    still_running, returncode = kill_training_at(spec_b, tmp_path / "b" / "runs", 10)
    assert still_running and returncode == -signal.SIGKILL, "the run finished before it could be killed"
    (killed_run,) = runs_of(tmp_path / "b" / "runs")
    before = losses(killed_run)
    assert 10 <= max(before) < 60  # killed part-way

    resumed = run_minigpt("train", spec_b, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    (ref_run,) = runs_of(tmp_path / "a" / "runs")
    expected, got = losses(ref_run), losses(killed_run)
    assert list(got) == list(range(1, 61))
    assert got == expected  # bitwise: the floats compare equal, step by step
    assert losses(killed_run, "val/loss") == losses(ref_run, "val/loss")


def test_corrupt_or_truncated_checkpoint_is_refused_and_the_previous_one_still_works(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 8, "save_every": 4, "eval_every": 4})
    status, _, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs")
    latest, previous = run / "checkpoints" / "step_00000008", run / "checkpoints" / "step_00000004"

    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    status, _, err = cli(capsys, "train", spec, "--resume", "--no-progress", "--set", "train.max_steps=12")
    assert status == 2 and "Traceback" not in err
    assert "model.safetensors is truncated or corrupt" in err
    assert f"previous checkpoint {previous} is intact" in err

    optimizer = previous / "optimizer.safetensors"
    pristine = optimizer.read_bytes()
    flipped = bytearray(pristine)
    flipped[-3] ^= 0x01  # same size, one bit: only the hash notices
    optimizer.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is truncated or corrupt"):
        load_checkpoint(previous)
    optimizer.write_bytes(pristine)

    status, out, _ = cli(capsys, "sample", previous, "--prompt", "The", "--max-new-tokens", "5", "--seed", "0")
    assert status == 0 and out.startswith("The")
    status, _, err = cli(capsys, "train", spec, "--resume", previous, "--no-progress", "--set", "train.max_steps=12")
    assert status == 0, err
    assert sorted(losses(run)) == list(range(1, 13))
    assert load_checkpoint(run / "checkpoints" / "step_00000008").trainer["step"] == 8  # rewritten intact


def test_checkpoint_write_is_atomic_and_leftovers_are_ignored(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 0}))
    result = train(spec, **quiet)
    root = result.run_dir / "checkpoints"
    # what a write killed half-way leaves behind: a temp dir, never a step_* name
    (root / ".step_00000006.abc.tmp").mkdir()
    (root / ".step_00000006.abc.tmp" / "model.safetensors").write_bytes(b"partial")
    resumed = Trainer(spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 6})}),
                      resume=result.run_dir, **quiet)
    assert resumed.step == 4
    resumed.run()
    assert not list(root.glob(".step_*")) and (root / "step_00000006").is_dir()


def test_compiled_and_plain_models_share_checkpoints(tmp_path):
    # dynamo's wrapper (OptimizedModule) prefixes every key with _orig_mod.; checkpoints never do
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 3, "save_every": 3, "eval_every": 0}))
    trainer = Trainer(spec, **quiet)
    trainer.engine.forward = torch.compile(trainer.engine.wrapped, backend="eager")  # what train.compile sets up
    assert any(k.startswith("_orig_mod.") for k in trainer.engine.forward.state_dict())
    compiled_run = trainer.run()
    plain = Trainer(spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 5})}),
                    resume=compiled_run.checkpoint, **quiet)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                   trainer.model.state_dict().values()))
    plain.run()
    again = Trainer(spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 6})}),
                    resume=compiled_run.run_dir, **quiet)
    again.engine.forward = torch.compile(again.engine.wrapped, backend="eager")
    assert again.step == 5
    assert again.run().step == 6
    # and the model-level helpers accept either form
    compiled = torch.compile(plain.model, backend="eager")
    state = model_state_for_saving(compiled)
    assert not any(k.startswith("_orig_mod") for k in state)
    load_model_state(compiled, state, "test")


def test_documents_split_trains_and_resumes_exactly_from_a_fresh_cache(tmp_path):
    import shutil

    text = tiny_spec_data(tmp_path)["data"]["source"]["params"]["paths"][0]
    body = open(text, encoding="utf-8").read()
    docs = tmp_path / "docs"
    docs.mkdir()
    paths = []
    for i in range(10):  # ten documents: one held out (val_fraction 0.1)
        paths.append(str(docs / f"doc_{i}.txt"))
        open(paths[-1], "w", encoding="utf-8").write(body[i * 4_000:(i + 1) * 4_000])
    data = {"source": {"name": "text", "params": {"paths": paths}}, "split": "documents"}
    train_section = {"max_steps": 8, "save_every": 4, "eval_every": 4, "deterministic": True}

    def spec(out, steps):
        return parse_spec(tiny_spec_data(tmp_path, data=data, tokenizer={"name": "bpe", "params": {"vocab_size": 300}},
                                         model={"vocab_size": 300},
                                         train={**train_section, "out_dir": str(tmp_path / out), "max_steps": steps}))

    reference = train(spec("a", 8), **quiet)
    first = train(spec("b", 8), **quiet)
    shutil.rmtree(tmp_path / "cache")  # the resume splits and tokenizes again, with the checkpoint's tokenizer
    resumed = Trainer(spec("b", 8), resume=first.run_dir / "checkpoints" / "step_00000004", **quiet)
    assert resumed.step == 4
    branch = resumed.run().run_dir  # from a checkpoint before the run's last: a branch in a new run directory
    assert branch != first.run_dir and (tmp_path / "cache").is_dir()
    after = {k: v for k, v in losses(branch).items() if k > 4}
    assert list(after) == [5, 6, 7, 8]
    assert after == {k: v for k, v in losses(reference.run_dir).items() if k > 4}  # bitwise, step by step
    assert losses(first.run_dir) == losses(reference.run_dir)
    assert losses(branch, "val/loss")[8] == losses(reference.run_dir, "val/loss")[8]
