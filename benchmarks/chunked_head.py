"""Where the chunked output head + loss spends its time in a fresh process, and the fixes measured.

One call = the head's logits, cross-entropy and the gradients of hidden and weight (forward and
backward through autograd, then the gradients dropped as ``zero_grad(set_to_none=True)`` does), for
hidden (tokens, emb) against a (vocab, emb) head, fp32. Each variant runs in its own new process
(``--warmup`` untimed calls, then the median of ``--steps``), the processes alternating ``--repeats``
times; page faults are counted over the timed calls.

* ``plain``: ``F.cross_entropy(F.linear(h, W), t)``, the whole (tokens, vocab) logits at once;
* ``fresh per chunk``: the previous implementation: a new (vocab, chunk) logits tensor per chunk,
  ``torch.logsumexp`` (another such temporary) and a zero-filled weight gradient;
* ``fresh per chunk, chunk 128``: the same with chunks small enough (26 MB at vocab 50,257) to stay
  under glibc's largest dynamic mmap threshold (32 MB);
* ``buffer per call``: minigpt's chunked loss without a kept workspace: one buffer per call, reused
  by its chunks, softmax in place;
* ``buffer kept`` (what ``GPT.forward`` does): the same buffer kept from call to call;
* ``buffer kept, grads kept``: also ``zero_grad(set_to_none=False)``, the gradients' memory reused;
* ``... + malloc env``: the first variant with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
  at 2 GB, glibc keeping freed memory instead of returning it.

    python benchmarks/chunked_head.py                      # vocab 50,257, emb 384, 1,024 tokens, chunk 256
    python benchmarks/chunked_head.py --emb 768 --write    # the 124M model's width
    python benchmarks/chunked_head.py --profile "fresh per chunk"   # torch.profiler table of one variant
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, proc_status_kib, timed_calls  # noqa: E402

from minigpt_core.model.gpt import HeadWorkspace, chunked_head_loss  # noqa: E402

MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "2000000000"}


class _PreviousChunkedLoss(torch.autograd.Function):
    """The implementation before this benchmark (commit 401a3ea), kept to measure against: the same
    math, with a new logits tensor per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n = hidden.shape[0]
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
        total = torch.zeros(())
        for i in range(0, n, chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            cols = torch.arange(len(t))
            logits_t = torch.mm(weight, h.t())  # (V, c): a new allocation every chunk
            lse = torch.logsumexp(logits_t, dim=0)  # and a (V, c) temporary inside
            total += (lse - logits_t[t, cols]).sum()
            g = logits_t.sub_(lse).exp_()
            g[t, cols] -= 1
            grad_h[i:i + chunk] = g.t() @ weight
            grad_w.addmm_(g, h)
        ctx.grads = grad_h.div_(n), grad_w.div_(n)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.grads
        return gh.mul_(grad_out), gw.mul_(grad_out), None, None


# name -> (loss function of (hidden, weight, targets, chunk, workspace), chunk override, keep grads, env)
def _variants() -> dict:
    previous = lambda h, w, t, c, ws: _PreviousChunkedLoss.apply(h, w, t, c)  # noqa: E731
    return {
        "plain": (lambda h, w, t, c, ws: chunked_head_loss(h, w, t, 0), None, False, {}),
        "fresh per chunk": (previous, None, False, {}),
        "fresh per chunk, chunk 128": (previous, 128, False, {}),
        "buffer per call": (lambda h, w, t, c, ws: chunked_head_loss(h, w, t, c), None, False, {}),
        "buffer kept": (lambda h, w, t, c, ws: chunked_head_loss(h, w, t, c, ws), None, False, {}),
        "buffer kept, grads kept": (lambda h, w, t, c, ws: chunked_head_loss(h, w, t, c, ws), None, True, {}),
        "plain + malloc env": (lambda h, w, t, c, ws: chunked_head_loss(h, w, t, 0), None, False, MALLOC_KEEP),
        "fresh per chunk + malloc env": (previous, None, False, MALLOC_KEEP),
    }


def run_here(name: str, a: argparse.Namespace) -> dict:
    loss_fn, chunk, keep_grads, _ = _variants()[name]
    chunk = chunk or a.chunk
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.tokens, a.emb, generator=gen).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(a.vocab, a.emb, generator=gen) * 0.02)
    targets = torch.randint(0, a.vocab, (a.tokens,), generator=gen)
    workspace = HeadWorkspace()
    before = proc_status_kib("VmRSS:")

    def call() -> None:
        loss_fn(hidden, weight, targets, chunk, workspace).backward()
        for t in (hidden, weight):
            if keep_grads:
                t.grad.zero_()
            else:
                t.grad = None

    if a.profile:
        for _ in range(a.warmup):
            call()
        from torch.profiler import profile

        with profile(profile_memory=True) as prof:
            for _ in range(a.steps):
                call()
        return {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)}
    times, faults = timed_calls(call, a.warmup, a.steps)
    return {"s": statistics.median(times[a.warmup:]), "faults": faults,
            "peak_mib": (proc_status_kib("VmHWM:") - before) / 1024}


def child(name: str, a: argparse.Namespace) -> dict:
    env = {**os.environ, **_variants()[name][3]}
    cmd = [sys.executable, __file__, "--_child", name, *sys.argv[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the process for {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--emb", type=int, default=384)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per call (batch x context)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="processes per variant, alternating")
    p.add_argument("--variants", default=None, help="comma list (default: all)")
    p.add_argument("--profile", default=None, metavar="VARIANT", help="print a torch.profiler table of one variant")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(run_here(a._child, a)))
        return
    if a.profile:
        print(child(a.profile, a)["table"])
        return
    names = a.variants.split(",") if a.variants else list(_variants())
    print(machine(), flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(child(name, a))
            print(f"  repeat {r + 1}/{a.repeats} {name}: {runs[name][-1]['s'] * 1000:.0f} ms", flush=True)
    med = {n: statistics.median(x["s"] for x in v) for n, v in runs.items()}
    ref = med.get("fresh per chunk")
    lines = [f"Chunked head + loss, forward and backward: vocab {a.vocab:,}, emb {a.emb}, {a.tokens:,} tokens, "
             f"chunk {a.chunk}, fp32, {torch.get_num_threads()} threads; each variant in a fresh process, "
             f"{a.warmup} warm-up call(s) then the median of {a.steps}; {a.repeats} processes per variant, "
             f"alternating, median over them.", "",
             "| variant | ms per call | vs fresh per chunk | page faults per call | peak RSS growth MiB |",
             "|---|---|---|---|---|"]
    for n, v in runs.items():
        lines.append(f"| {n} | {med[n] * 1000:,.0f} | {f'{ref / med[n]:.2f}x' if ref else '-'} | "
                     f"{statistics.median(x['faults'] for x in v):,.0f} | "
                     f"{statistics.median(x['peak_mib'] for x in v):,.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        append_results("Chunked head in a fresh process: where the time goes, the fixes", table)


if __name__ == "__main__":
    main()
