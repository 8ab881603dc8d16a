"""The speed benchmarks run end to end on tiny shapes: each model or variant timed in its own fresh process.

The figures themselves are machine-dependent and live in benchmarks/RESULTS.md; these tests check that
the scripts behind them work and report what they say they report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from training_utils import PATIENCE_S, ROOT

pytestmark = pytest.mark.slow  # several fresh Python processes, each importing torch (and transformers)


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(table_text: str) -> dict[str, list[str]]:
    rows = {}
    for line in table_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not set(cells[0]) <= {"-"} and cells[0] not in ("model", "variant"):
            rows[cells[0]] = cells[1:]
    return rows


def test_train_throughput_times_each_model_in_its_own_fresh_process():
    out = _run("benchmarks/train_throughput.py", "--quick", "--precisions", "fp32", "--repeats", "2")
    # two processes per model, alternating: A B C, then C B A
    order = re.findall(r"repeat (\d)/2 (\S+) fp32", out)
    assert order == [("1", "fast"), ("1", "fast/loss_chunk=0"), ("1", "transformers"),
                     ("2", "transformers"), ("2", "fast/loss_chunk=0"), ("2", "fast")]
    rows = _rows(out)
    assert set(rows) == {"fast", "fast/loss_chunk=0", "transformers"}
    for name, cells in rows.items():
        tokens_s = float(cells[1].split()[0].replace(",", ""))
        assert tokens_s > 0, name
        assert cells[2].endswith("x") and cells[3].endswith("x")  # vs transformers, vs the plain loss
        assert float(cells[5].replace(",", "")) >= 0 and float(cells[6].replace(",", "")) > 0  # faults, peak MiB
    assert rows["transformers"][2] == "1.00x" and rows["fast/loss_chunk=0"][3] == "1.00x"


def test_chunked_head_benchmark_compares_the_variants_in_fresh_processes():
    out = _run("benchmarks/chunked_head.py", "--vocab", "600", "--emb", "16", "--tokens", "64", "--chunk", "16",
               "--steps", "2", "--repeats", "1", "--variants", "fresh per chunk,buffer kept,plain")
    rows = _rows(out)
    assert set(rows) == {"fresh per chunk", "buffer kept", "plain"}
    assert rows["fresh per chunk"][1] == "1.00x"
    assert all(float(cells[0].replace(",", "")) >= 0 for cells in rows.values())
