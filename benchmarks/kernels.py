"""The measurements behind two shape-dependent fast paths, at GPT-2 124M's shapes (fp32, CPU).

1. The chunked head + loss (minigpt_core.model.gpt._ChunkedHeadLoss) computes each chunk's logits
   transposed, (V, c) = W @ h.T, and accumulates the weight gradient with addmm_: GFLOP/s of each
   GEMM in both layouts, and the whole head + loss forward and backward against the plain path.
2. generate() runs the few-row products of decoding on all threads (minigpt_core.model.generate.threaded_gemv):
   GB/s of weights read by F.linear and by the threaded path, each weight read cold (cycling through
   more copies than the caches hold), and the single- and all-thread read bandwidth of a plain sum.

Every pair is timed round-robin in one process (median of --repeats).

    python benchmarks/kernels.py            # about two minutes on 2 cores
    python benchmarks/kernels.py --write    # append the tables to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, time_alternating  # noqa: E402

from minigpt_core.model import generate as generate_module  # noqa: E402
from minigpt_core.model.generate import threaded_gemv  # noqa: E402
from minigpt_core.model.gpt import chunked_head_loss  # noqa: E402

EMB, VOCAB = 768, 50257


def head_tables(a) -> str:
    torch.manual_seed(0)
    lines = ["**Head GEMMs** (GFLOP/s; h: (c, 768) hidden rows, W: (50257, 768) the head, g: the logits' gradient)",
             "", "| c rows | logits h @ W.T | logits.T = W @ h.T | grad_h g @ W | grad_W g.T @ h | "
             "grad_W addmm_(g.T, h) |", "|---:|---:|---:|---:|---:|---:|"]
    w = torch.randn(VOCAB, EMB)
    acc = torch.zeros(VOCAB, EMB)
    for c in (256, 1024):
        h, g = torch.randn(c, EMB), torch.randn(c, VOCAB)
        gt = g.t().contiguous()  # the transposed path holds the gradient as (V, c)
        fns = {"fwd": lambda: h @ w.t(), "fwd_t": lambda: w @ h.t(), "gh": lambda: g @ w,
               "gw": lambda: g.t() @ h, "gw_acc": lambda: acc.addmm_(gt, h)}
        t = time_alternating(fns, repeats=a.repeats)
        gf = 2 * c * EMB * VOCAB / 1e9
        lines.append(f"| {c} | {gf / t['fwd']:.0f} | {gf / t['fwd_t']:.0f} | {gf / t['gh']:.0f} | "
                     f"{gf / t['gw']:.0f} | {gf / t['gw_acc']:.0f} |")
    lines += ["", "**Head + cross-entropy, forward and backward** (1024 tokens; seconds; the "
              "previous chunked layout is the plain F.linear per chunk, kept here for comparison)", "",
              "| path | s | vs plain |", "|---|---:|---:|"]
    weight = (torch.randn(VOCAB, EMB) * 0.02).requires_grad_()
    hidden = torch.randn(1024, EMB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (1024,))

    def step(loss_fn):
        def run():
            weight.grad = hidden.grad = None
            loss_fn().backward()
        return run

    paths = {"plain (full logits)": step(lambda: F.cross_entropy(hidden @ weight.t(), targets)),
             "chunked, 256 rows (default)": step(lambda: chunked_head_loss(hidden, weight, targets, 256)),
             "chunked, 512 rows": step(lambda: chunked_head_loss(hidden, weight, targets, 512))}
    t = time_alternating(paths, repeats=a.repeats)
    base = t["plain (full logits)"]
    lines += [f"| {k} | {v:.2f} | {base / v:.2f}x |" for k, v in t.items()]
    return "\n".join(lines)


def gemv_table(a) -> str:
    torch.manual_seed(0)
    lines = [f"**Decoding GEMVs** (GB/s of fp32 weights read, each weight cold; generate() threads up to "
             f"{generate_module.GEMV_MAX_ROWS} rows)", "",
             "| weight (out, in) | rows | F.linear | threaded_gemv | speed-up |", "|---|---:|---:|---:|---:|"]
    for n, k in ((2304, 768), (3072, 768), (768, 3072), (VOCAB, EMB)):
        copies = max(2, int(300e6 // (n * k * 4)))  # ~300 MB: more than any cache
        mods = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for _ in range(copies))
        gb = n * k * 4 * copies / 1e9
        for rows in (1, 4, 8, 16):  # the threaded path forced on, to show where GEMV_MAX_ROWS should sit
            x = torch.randn(rows, k)
            with torch.inference_mode():
                def plain():
                    for m in mods:
                        F.linear(x, m.weight)

                def threaded():
                    with threaded_gemv(mods):
                        for m in mods:
                            m(x)
                saved, generate_module.GEMV_MAX_ROWS = generate_module.GEMV_MAX_ROWS, rows
                try:
                    t = time_alternating({"plain": plain, "threaded": threaded}, repeats=a.repeats)
                finally:
                    generate_module.GEMV_MAX_ROWS = saved
            lines.append(f"| ({n}, {k}) | {rows} | {gb / t['plain']:.1f} | {gb / t['threaded']:.1f} | "
                         f"{t['plain'] / t['threaded']:.2f}x |")
    big = torch.randn(2**27)  # 512 MiB
    threads = torch.get_num_threads()
    t_all = time_alternating({"sum": lambda: big.sum()}, repeats=a.repeats)["sum"]
    torch.set_num_threads(1)
    try:
        t_one = time_alternating({"sum": lambda: big.sum()}, repeats=a.repeats)["sum"]
    finally:
        torch.set_num_threads(threads)
    lines += ["", f"Read bandwidth of a 512 MiB fp32 sum: {big.numel() * 4 / 1e9 / t_one:.1f} GB/s on one thread, "
              f"{big.numel() * 4 / 1e9 / t_all:.1f} GB/s on {threads}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    print(machine(), flush=True)
    parts = []
    for make in (head_tables, gemv_table):
        parts.append(make(a))
        print(parts[-1] + "\n", flush=True)
    if a.write:
        append_results("Kernels: head layout, threaded decoding GEMVs", "\n\n".join(parts))


if __name__ == "__main__":
    main()
