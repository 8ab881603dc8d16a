"""GPU checks that CPU CI cannot do: which SDPA kernels our attentions reach, and their accuracy.

For every registered causal attention, on CUDA: forward+backward under bf16 autocast at the
GPT-2 124M layer shape, forcing PyTorch's flash kernel where the attention uses SDPA
(`torch.nn.attention.sdpa_kernel`), and the max |difference| from book.multihead in fp32 and bf16
after copying weights through the canonical layout.

    python benchmarks/gpu_flash_check.py [--seq 1024] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, time_alternating  # noqa: E402
from attention import build_attention, causal_attentions  # noqa: E402

from minigpt_core import get_registry  # noqa: E402
from minigpt_core.model.interop import attention_canonical_state, load_attention_canonical_state  # noqa: E402


def run(att, x, dtype):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = att(x)
    out.float().pow(2).mean().backward()
    return out.float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    print(machine())
    reg = get_registry()
    names = causal_attentions("*")
    ref = build_attention("book.multihead", args.seq, dev)
    x = torch.randn(args.batch, args.seq, 768, device=dev, requires_grad=True)
    print(f"\n| attention | flash kernel (bf16) | max diff vs book fp32 | max diff vs book bf16 | fwd+bwd bf16 ms |")
    print("|---|---|---|---|---|")
    ref32 = run(ref, x, torch.float32).detach()
    ref16 = run(ref, x, torch.bfloat16).detach()
    for name in names:
        att = build_attention(name, args.seq, dev)
        diff32 = diff16 = "n/a"
        if reg.get("attention", name).has("gpt2"):
            try:
                load_attention_canonical_state(att, attention_canonical_state(ref))
                diff32 = f"{(run(att, x, torch.float32) - ref32).abs().max().item():.2e}"
                diff16 = f"{(run(att, x, torch.bfloat16) - ref16).abs().max().item():.2e}"
            except Exception as exc:  # report, keep checking the others
                diff32 = f"error: {type(exc).__name__}"
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                run(att, x, torch.bfloat16)
            flash = "yes"
        except RuntimeError as exc:
            flash = "no (" + str(exc).splitlines()[0][:60] + ")"
        t = time_alternating({name: lambda: run(att, x, torch.bfloat16)}, repeats=5, warmup=2,
                             sync=torch.cuda.synchronize)[name]
        print(f"| {name} | {flash} | {diff32} | {diff16} | {t * 1e3:.2f} |")


if __name__ == "__main__":
    main()
