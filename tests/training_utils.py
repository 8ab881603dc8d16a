"""Helpers shared by the data, training, resume, distributed and W&B tests: tiny specs on a tiny corpus."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from minigpt_core.base import toml as _toml

ROOT = Path(__file__).resolve().parents[1]
MINIGPT = Path(sys.executable).with_name("minigpt")

# Tests wait for states, never for times. This bounds only a hang (a state that never comes, a child
# that never ends): generous enough for a machine at load average 15, where a 5-minute cell takes 40.
PATIENCE_S = 3600


def wait_for(what: str, check, timeout: float = PATIENCE_S, interval: float = 0.05):
    """Poll ``check()`` until it returns something truthy, and return that; fail naming ``what`` if it
    never does. ``check`` reads only what exists and is whole (it returns None otherwise)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def corpus_text(n_chars: int = 40_000) -> str:
    """Deterministic English prose: the first language-reference topics that ship with Python."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


def write_corpus(directory: Path, n_chars: int = 40_000) -> Path:
    path = directory / "corpus.txt"
    path.write_text(corpus_text(n_chars), encoding="utf-8")
    return path


def tiny_spec_data(tmp_path: Path, corpus: Path | None = None, **sections) -> dict:
    """A raw spec: 2-layer, 32-wide char model on a 40 kB text file; wandb disabled; files in tmp_path."""
    corpus = corpus or write_corpus(tmp_path)
    data = {
        "name": "tiny-test",
        "seed": 7,
        "model": {"vocab_size": 128, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                  "drop_rate": 0.0, "tie_weights": True, "init": {"name": "gpt2.normal"}},
        "tokenizer": {"name": "char"},
        "data": {"source": {"name": "text", "params": {"paths": [str(corpus)]}}, "cache_dir": str(tmp_path / "cache"),
                 "split_block": 512, "workers": 1},
        "train": {"out_dir": str(tmp_path / "runs"), "max_steps": 12, "batch_size": 8, "lr": 3e-3,
                  "warmup_steps": 2, "log_every": 1, "eval_every": 6, "eval_batches": 2, "sample_every": 0,
                  "sample_tokens": 0, "save_every": 6, "threads": 1,
                  # given, so each run skips the ~1 s matmul timing (test_train's loss test keeps it measured)
                  "peak_flops": 1e12},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return data


def write_spec(tmp_path: Path, name: str = "spec.toml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(_toml.dumps(tiny_spec_data(tmp_path, **sections)), encoding="utf-8")
    return path


def run_minigpt(*args, env=None, timeout=PATIENCE_S, cwd=ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(MINIGPT), *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def runs_of(out_dir: Path, name: str = "tiny-test") -> list[Path]:
    return sorted(p for p in (out_dir / name).iterdir() if p.is_dir())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Step -> last logged value (a resumed run logs again the steps after its checkpoint)."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the `minigpt` command line in this process (faster than a subprocess): (status, stdout, stderr)."""
    from minigpt_core.cli.app import main

    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def kill_training_at(spec: Path, runs_dir: Path, step: int, timeout: float = PATIENCE_S) -> tuple[bool, int]:
    """`minigpt train SPEC` in a subprocess, SIGKILLed as soon as its checkpoint of ``step`` exists.

    Returns (it was still running when killed, its return code).
    """
    import signal

    # output to /dev/null: a pipe nobody reads while we wait could fill and stall the run
    proc = subprocess.Popen([str(MINIGPT), "train", str(spec), "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # the run's end also ends the wait: the caller then sees it was no longer running
        wait_for(f"the checkpoint of step {step}",
                 lambda: list(runs_dir.glob(f"*/*/checkpoints/step_{step:08d}")) or proc.poll() is not None,
                 timeout, interval=0.01)
        still_running = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=PATIENCE_S)
    return still_running, proc.returncode


def reference_and_killed_run(capsys, tmp_path: Path, spec_data: dict, kill_step: int) -> Path:
    """The resume tests' set-up: SPEC_DATA written twice, a/ trained to the end in this process and b/
    in a subprocess SIGKILLed at its checkpoint of ``kill_step``. Returns b/'s spec (to resume);
    the runs are under tmp_path/a/runs and tmp_path/b/runs."""
    import signal

    specs = {}
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        data = {**spec_data, "train": {**spec_data["train"], "out_dir": str(tmp_path / side / "runs")}}
        specs[side] = tmp_path / side / "spec.toml"
        specs[side].write_text(_toml.dumps(data), encoding="utf-8")
    status, _, err = cli(capsys, "train", specs["a"], "--no-progress")  # in this process: no start-up cost
    assert status == 0, err
    still_running, returncode = kill_training_at(specs["b"], tmp_path / "b" / "runs", kill_step)
    assert still_running and returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return specs["b"]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to ``n`` inside the block (code paths that depend on it), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
