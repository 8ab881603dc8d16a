"""Device, precision and determinism for a run."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import MinigptError

__all__ = ["DeviceError", "select_device", "autocast", "make_grad_scaler", "set_deterministic", "available_cores",
           "busy_cpu_note", "cpu_load", "LOADAVG_ENV_VAR"]

# Test hook: a 1-minute load average to use instead of the machine's (tests/test_busy_machine.py).
LOADAVG_ENV_VAR = "MINIGPT_TEST_LOADAVG"


class DeviceError(MinigptError):
    """The requested device or precision is not available here."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK), else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"train.device = {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"train.device = {name!r} but PyTorch sees no CUDA GPU here (torch "
                              f"{torch.__version__}); use train.device = \"auto\" or \"cpu\".")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise DeviceError(f"train.device = {name!r} but only {torch.cuda.device_count()} GPU(s) are visible.")
    elif device.type == "mps" and not _mps_available():
        raise DeviceError("train.device = \"mps\" but the Apple GPU backend is not available here; use \"auto\".")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"train.device = {name!r}: minigpt trains on cpu, cuda or mps.")
    return device


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast context for the forward pass (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError(
            f"train.precision = \"fp16\" needs a CUDA GPU (its gradient scaler is CUDA-only); on "
            f"{device.type} use \"bf16\" or \"fp32\"."
        )
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # Disabled scalers pass losses and steps through unchanged, so the loop has one code path.
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels only; must run before the first CUDA matmul to affect cuBLAS."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False


# -- a busy CPU ------------------------------------------------------------------------------------
def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_load() -> float | None:
    """The 1-minute load average (MINIGPT_TEST_LOADAVG instead, for tests); None where there is none."""
    if os.environ.get(LOADAVG_ENV_VAR):
        return float(os.environ[LOADAVG_ENV_VAR])
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def busy_cpu_note(load: float | None, cores: int, threads: int, wait_policy: str | None) -> str | None:
    """One line for a run about to start ``threads`` torch threads on a CPU that is already busy.

    Busy: the 1-minute load average is at least the number of cores available, so other processes
    already keep every core occupied. torch's OpenMP threads then spin while they wait for each
    other and for the cores, and a step can take 5-10x as long as on an idle machine. One thread
    neither spins nor waits, so it gets no note.
    """
    if load is None or threads <= 1 or load < cores:
        return None
    if (wait_policy or "").strip().upper() == "PASSIVE":
        fix = "fewer threads, e.g. --set train.threads=1"
    else:
        fix = ("OMP_WAIT_POLICY=PASSIVE minigpt train ... (threads that sleep instead of spinning), "
               "or fewer threads, e.g. --set train.threads=1")
    return (f"note: this machine is busy (load average {load:.1f} on {cores} cores) and training runs "
            f"{threads} threads, which can make it several times slower; try {fix} (docs/training.md)")
