"""Every registered causal attention, side by side: speed, memory, and KV-cache generation.

For each batch size and sequence length (GPT-2 124M layer shape: 12 heads, emb 768, fp32,
dropout 0), one attention layer's forward (no grad), forward+backward (input and weight
gradients) and peak extra memory of forward+backward. The attentions of one shape are timed
round-robin, so machine noise hits them alike. Then greedy generation of --gen-tokens new
tokens with the 124M model, with and without the KV cache.

    python benchmarks/attention.py                 # the full run (minutes)
    python benchmarks/attention.py --quick         # batch 2, 256 and 1024 tokens, 50 new tokens
    python benchmarks/attention.py --write         # append the tables to benchmarks/RESULTS.md

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the process's peak
resident set (Linux VmHWM, reset through /proc/self/clear_refs) in a child process whose
allocator returns freed blocks to the system (MALLOC_MMAP_THRESHOLD_), so it measures the pass
rather than memory cached by earlier ones.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, proc_status_kib, time_alternating  # noqa: E402

from minigpt_core import build_model, get_registry, spec_from_preset  # noqa: E402
from minigpt_core.model.generate import generate  # noqa: E402
from minigpt_core.model.gpt import BuildContext  # noqa: E402
from minigpt_core.testing import Subject  # noqa: E402

BASELINE = "book.multihead"
SHAPE = dict(emb_dim=768, n_heads=12, drop_rate=0.0, qkv_bias=False)


def causal_attentions(patterns: list[str]) -> list[str]:
    reg = get_registry()
    return [e.name for e in reg.entries("attention") if e.has("causal") and not e.not_for_lm
            and any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]


def build_attention(name: str, context_length: int, device: torch.device) -> torch.nn.Module:
    """The layer exactly as a GPT of this shape would build it (default params, via the registry)."""
    reg = get_registry()
    subject = Subject(reg.get("attention", name), reg, device=device)
    model = subject.model_spec(**SHAPE, context_length=context_length, vocab_size=50257)
    torch.manual_seed(0)
    return BuildContext(model, subject.components(model), 0).build("attention").to(device)


def inputs(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, seq, SHAPE["emb_dim"], generator=torch.Generator().manual_seed(0)).to(device)


def sync_fn(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_shape(names: list[str], batch: int, seq: int, repeats: int, device: torch.device) -> dict[str, dict]:
    layers = {n: build_attention(n, seq, device) for n in names}
    x = inputs(batch, seq, device)
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).sum().backward()
        return run

    sync = sync_fn(device)
    f = time_alternating({n: fwd(m) for n, m in layers.items()}, repeats, warmup=1, sync=sync)
    fb = time_alternating({n: fwd_bwd(m) for n, m in layers.items()}, repeats, warmup=1, sync=sync)
    return {n: {"fwd": f[n], "fwd_bwd": fb[n]} for n in names}


# -- peak memory --------------------------------------------------------------------------------
def peak_memory_mib(names: list[str], batch: int, seq: int, device: torch.device) -> dict[str, float]:
    """Peak extra memory of one forward+backward per attention (runs in this process)."""
    out = {}
    for name in names:
        layer = build_attention(name, seq, device)
        x = inputs(batch, seq, device).requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            layer(x).sum().backward()
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = proc_status_kib("VmRSS:")
            layer(x).sum().backward()
            out[name] = (proc_status_kib("VmHWM:") - before) / 1024
        del layer, x
    return out


def peak_memory_child(names: list[str], batch: int, seq: int, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return peak_memory_mib(names, batch, seq, device)
    if not Path("/proc/self/clear_refs").exists():
        return {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big blocks go back to the OS when freed
    cmd = [sys.executable, __file__, "--_memory", json.dumps([names, batch, seq])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- generation ---------------------------------------------------------------------------------
def generation(names: list[str], tokens: int, device: torch.device) -> dict[str, dict]:
    out = {}
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    sync = sync_fn(device)
    for name in names:
        model = build_model(spec_from_preset("gpt2-124m", model={"drop_rate": 0.0, "attention": {"name": name}}))
        model.to(device).eval()
        res = {}
        for mode, use_cache in (("cached", True), ("uncached", False)):
            generate(model, prompt, 2, use_cache=use_cache)  # warm-up
            sync()
            t0 = time.perf_counter()
            ids = generate(model, prompt, tokens, use_cache=use_cache)
            sync()
            res[mode] = tokens / (time.perf_counter() - t0)
            res[f"{mode}_ids"] = ids
        res["same_tokens"] = torch.equal(res.pop("cached_ids"), res.pop("uncached_ids"))
        out[name] = res
        print(f"  generate {name}: {res['cached']:.1f} tok/s cached, {res['uncached']:.1f} uncached", flush=True)
    return out


# -- report -------------------------------------------------------------------------------------
def format_tables(results: dict, names: list[str], repeats: int) -> str:
    lines = []
    for (batch, seq), per in results.items():
        base = per.get(BASELINE, {}).get("fwd_bwd")
        lines += [f"\n### batch {batch} x {seq} tokens\n",
                  "| attention | forward ms | forward+backward ms | fwd+bwd speed-up vs book | peak MiB (fwd+bwd) |",
                  "|---|---:|---:|---:|---:|"]
        for name in sorted(names, key=lambda n: per[n]["fwd_bwd"]):
            r = per[name]
            speedup = f"{base / r['fwd_bwd']:.2f}x" if base else "-"
            mem = f"{r['mem']:.0f}" if r.get("mem") is not None else "n/a"
            lines.append(f"| {name} | {r['fwd'] * 1e3:.1f} | {r['fwd_bwd'] * 1e3:.1f} | {speedup} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", nargs="+", default=["*"], help="name patterns of the attentions to compare")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per attention and shape (median)")
    ap.add_argument("--gen-tokens", type=int, default=200, help="new tokens in the generation benchmark (0: skip)")
    ap.add_argument("--gen-attention", nargs="+", default=["torch.sdpa"],
                    help="attentions whose 124M model generates with and without the cache (uncached "
                         "generation of 200 tokens takes minutes on a CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="batch 2, 256 and 1024 tokens, 2 repeats, 50 new tokens")
    ap.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args._memory:  # child process of peak_memory_child
        names, batch, seq = json.loads(args._memory)
        print(json.dumps(peak_memory_mib(names, batch, seq, device)))
        return
    if args.quick:
        args.batch, args.seq, args.repeats, args.gen_tokens = [2], [256, 1024], 2, 50

    names = causal_attentions(args.attention)
    print(machine())
    print(f"attentions: {', '.join(names)}")
    results = {}
    for batch in args.batch:
        for seq in args.seq:
            t0 = time.perf_counter()
            per = time_shape(names, batch, seq, args.repeats, device)
            for name, mib in peak_memory_child(names, batch, seq, device).items():
                per[name]["mem"] = mib
            results[(batch, seq)] = per
            print(f"batch {batch} x {seq}: done in {time.perf_counter() - t0:.0f} s", flush=True)
            print(format_tables({(batch, seq): per}, names, args.repeats), flush=True)

    body = [f"One attention layer of the GPT-2 124M shape (12 heads, emb 768), fp32, dropout 0, device "
            f"{device.type}; median of {args.repeats} round-robin calls after a warm-up. Forward runs under "
            f"no_grad; forward+backward computes input and weight gradients. Peak memory: growth of peak "
            f"{'allocated CUDA memory' if device.type == 'cuda' else 'resident memory (VmHWM)'} during one "
            f"forward+backward.", format_tables(results, names, args.repeats)]
    target = (8, 1024) if (8, 1024) in results else next(iter(results))
    per = results[target]
    if BASELINE in per:
        best = min((n for n in names if n != BASELINE), key=lambda n: per[n]["fwd_bwd"])
        ratio = per[BASELINE]["fwd_bwd"] / per[best]["fwd_bwd"]
        body.append(f"\nFastest forward+backward at batch {target[0]} x {target[1]}: **{best}**, "
                    f"{per[best]['fwd_bwd'] * 1e3:.0f} ms vs {BASELINE} {per[BASELINE]['fwd_bwd'] * 1e3:.0f} ms: "
                    f"**{ratio:.2f}x**.")
    if args.gen_tokens:
        gen = generation(args.gen_attention, args.gen_tokens, device)
        body.append(f"\n### generation, GPT-2 124M, batch 1, 8-token prompt, {args.gen_tokens} new tokens, greedy\n")
        body.append("| attention | KV cache tok/s | no cache tok/s | cached / uncached | same tokens |")
        body.append("|---|---:|---:|---:|---|")
        for name, r in gen.items():
            body.append(f"| {name} | {r['cached']:.1f} | {r['uncached']:.1f} | "
                        f"**{r['cached'] / r['uncached']:.1f}x** | {'yes' if r['same_tokens'] else 'NO'} |")
    text = "\n".join(body)
    print(text)
    if args.write:
        append_results("Attention: every registered causal attention", text)


if __name__ == "__main__":
    main()
