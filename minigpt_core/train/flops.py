"""Model FLOPs utilisation: achieved training FLOP/s over the device's measured matmul peak."""

from __future__ import annotations

import time

import torch

__all__ = ["measure_matmul_peak", "mfu", "PRECISION_DTYPES"]

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        n: int | None = None, seconds: float = 0.5, repeats: int = 3) -> float:
    """FLOP/s of square (n x n) @ (n x n) matmuls: the best of ``repeats`` timings of ~``seconds`` each.

    A practical peak for this process on this machine (its thread count, its clock), which is
    what MFU should be measured against; a datasheet number is rarely reached by any kernel.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout streams) untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    per_call = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(seconds / per_call))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2.0 * n ** 3 / best


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Fraction of the peak that the training step's useful FLOPs reach."""
    return flops_per_token * tokens_per_second / peak_flops if peak_flops > 0 else 0.0
