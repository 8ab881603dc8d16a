"""Shared helpers for benchmark scripts: machine description, alternating timers, results file."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{gpu}")


def proc_status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS:, VmHWM:, ...); None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    return int(next(line for line in status.read_text().splitlines() if line.startswith(field)).split()[1])


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def time_alternating(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each fn, run round-robin so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def timed_calls(fn: Callable[[], None], warmup: int, steps: int,
                sync: Callable[[], None] = lambda: None) -> tuple[list[float], float]:
    """Seconds of each of ``warmup + steps`` calls of ``fn`` (warm-up first), and the minor page faults
    per timed call (the warm-up's left out): what a fresh process's benchmark child reports."""
    import resource

    times = []
    for i in range(warmup + steps):
        if i == warmup:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps


def append_results(title: str, body: str) -> None:
    """Append a dated section to RESULTS.md (older sections are kept as history)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = "?"
    section = (f"\n## {title}\n\n{stamp}, commit {rev}\n\nMachine: {machine()}\n\n"
               f"Command: `{command_line()}`\n\n{body.strip()}\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(section)
