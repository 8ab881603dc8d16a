"""Progress bars on the long phases (the final evaluation of a fine-tune, `check`, `attention`,
`eval --per-token`), drawn on stderr only when it is a terminal; and why `minigpt` exits promptly
after its last line (no final garbage-collector walk, no threads or processes left behind).

A terminal is a real pseudo-terminal (pty.openpty) given to a real `minigpt` process as its stderr."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from minigpt_core.base import toml as _toml
from test_classification import _cls_spec, _easy_set
from training_utils import MINIGPT, PATIENCE_S, ROOT, runs_of, tiny_spec_data, wait_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def on_terminal(*cmd, cwd: Path = ROOT) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal (100 columns): (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"minigpt-pty-{os.getpid()}-{id(cmd)}.out"
    with open(out_path, "w+", encoding="utf-8") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=slave,
                                cwd=cwd, env=ENV)
        os.close(slave)
        seen = bytearray()

        def drained() -> bool:  # read what the terminal got; done when the process closed its end
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    return True
                seen.extend(chunk)
                return not chunk
            return False

        try:
            wait_for(f"{cmd[1]} to finish", drained, PATIENCE_S, interval=0)
            status = proc.wait(timeout=PATIENCE_S)
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        stdout = out.read()
    out_path.unlink()
    return status, stdout, seen.decode("utf-8", errors="replace")


def piped(*cmd, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=PATIENCE_S, stdin=subprocess.DEVNULL)


BAR = "\r"  # tqdm redraws its line with carriage returns; nothing else we print does


# -- the helper ---------------------------------------------------------------------------------------
_HELPER = """
from minigpt_core.base.progress import progress_bar
with progress_bar(3, desc="phase-x", unit="item", enabled={enabled}) as bar:
    for _ in range(3):
        bar.update(1)
print("done")
"""


def test_progress_bar_draws_on_a_terminal_and_nothing_in_a_pipe_or_when_turned_off():
    status, out, term = on_terminal(sys.executable, "-c", _HELPER.format(enabled=True))
    assert status == 0 and out == "done\n"
    assert "phase-x" in term and "item" in term, term
    status, out, term = on_terminal(sys.executable, "-c", _HELPER.format(enabled=False))
    assert status == 0 and "phase-x" not in term and BAR not in term, term  # --no-progress
    p = piped(sys.executable, "-c", _HELPER.format(enabled=True))
    assert p.returncode == 0 and p.stdout == "done\n" and p.stderr == "", p.stderr  # a log file stays clean


# -- minigpt check ------------------------------------------------------------------------------------
def test_check_names_the_running_check_on_a_terminal_and_keeps_its_table_on_stdout():
    status, out, term = on_terminal(MINIGPT, "check", "book.layernorm")
    assert status == 0, (out, term)
    assert "book.layernorm: " in term and "check" in term, term  # "book.layernorm: <check>  ...| n/11 [..."
    assert "norm         book.layernorm" in out and "1 components, " in out, out
    p = piped(MINIGPT, "check", "book.layernorm")
    assert p.returncode == 0 and p.stdout == out and BAR not in p.stderr, p.stderr


# -- the final evaluation of a fine-tune ------------------------------------------------------------------
def test_the_final_evaluation_of_a_fine_tune_shows_a_bar_on_a_terminal_only(tmp_path):
    spec = _cls_spec(tmp_path, _easy_set(tmp_path / "data.csv", n=60))
    spec["train"] = {**spec["train"], "max_steps": 2, "eval_every": 0, "save_every": 0}
    path = tmp_path / "cls.toml"
    path.write_text(_toml.dumps(spec), encoding="utf-8")
    status, out, term = on_terminal(MINIGPT, "train", path)
    assert status == 0, (out, term)
    # Every split in turn (the training split is evaluated again at the end: minutes on a CPU).
    assert "final evaluation: train" in term and "example" in term, term
    assert "classification results" in out  # the report itself is unchanged, on stdout
    assert "step/s" in term  # the training steps' own bar
    p = piped(MINIGPT, "train", path)
    assert p.returncode == 0 and "final evaluation" not in p.stderr and BAR not in p.stderr, p.stderr


# -- attention and eval --per-token ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from minigpt_core.spec import parse_spec
    from minigpt_core.train import train

    tmp = tmp_path_factory.mktemp("progress")
    spec = parse_spec(tiny_spec_data(tmp, train={"max_steps": 2, "save_every": 2, "eval_every": 0}))
    train(spec, progress=False, write=lambda s: None)
    return runs_of(tmp / "runs")[0]


def test_attention_and_per_token_show_their_slow_parts_on_a_terminal(run, tmp_path):
    status, out, term = on_terminal(MINIGPT, "attention", run, "--text", "The object is", "--out", tmp_path / "a")
    assert status == 0, (out, term)
    assert "drawing attention maps" in term and "layer" in term, term
    status, out, term = on_terminal(MINIGPT, "eval", run, "--per-token", "--max-windows", "4", "--out",
                                    tmp_path / "p")
    assert status == 0, (out, term)
    assert "eval" in term and "window" in term and "writing per-token files" in term, term
    p = piped(MINIGPT, "eval", run, "--per-token", "--max-windows", "4", "--out", tmp_path / "q")
    assert p.returncode == 0 and BAR not in p.stderr, p.stderr


# -- exiting after the last line -----------------------------------------------------------------------
_EXIT_PROBE = """
import gc, json, os, sys, threading
import minigpt
sys.argv = ["minigpt", "check", "peft.lora"]
status = minigpt.main()
kids = []
for t in os.listdir(f"/proc/{os.getpid()}/task"):
    with open(f"/proc/{os.getpid()}/task/{t}/children") as f:
        kids += f.read().split()
others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
print(json.dumps({"status": status, "frozen": gc.get_freeze_count(), "objects": len(gc.get_objects()),
                  "threads": others, "children": kids}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_minigpt_leaves_its_objects_out_of_the_final_collections_and_nothing_running():
    """`check` lingered 8-12 s after its last line on a busy machine: the interpreter's shutdown ran the
    garbage collector over everything the checks made and imported (about 4,000 modules with PEFT,
    torchao and torch.compile's). The console script freezes them (gc.freeze) so those collections
    skip them, and nothing that would hold the exit up (a thread, a worker process) is left."""
    pytest.importorskip("peft")
    p = piped(sys.executable, "-c", _EXIT_PROBE)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["status"] == 0
    assert got["frozen"] > 100_000 and got["objects"] < got["frozen"] // 10, got  # nearly all of it frozen
    assert got["threads"] == [] and got["children"] == [], got
