"""Training throughput and memory: minigpt's GPT-2 recipes vs Hugging Face transformers' GPT2LMHeadModel.

One training step = forward, loss, backward, AdamW step, on random tokens, for models of identical
shapes (GPT-2's recipe: q/k/v biases, tied head, tanh GELU, LayerNorm, dropout 0), in fp32 and bf16
autocast. Two ways of timing them (``--mode``):

* ``fresh`` (default): each model in its own new process, ``--warmup`` untimed steps then the median
  of ``--steps`` timed ones; the processes alternate (model A, B, C, then C, B, A, ...) ``--repeats``
  times and a model's figure is the median over its processes. This is what a user timing their
  first minutes sees: a new process's allocator, page faults and caches included. Its peak memory is
  the process's peak RSS growth with the default allocator.
* ``in-process``: all models built in one long-lived process and timed round-robin (the steady
  state); peak memory from a child per model with freed blocks returned to the OS.
* ``both``: the two tables.

The models:

* ``fast``: the default ``gpt2-*`` recipe (torch.sdpa, torch.layernorm, torch.gelu_tanh) with the
  trainer's default chunked head + cross-entropy (train.loss_chunk);
* ``fast/fused_qkv``: the same with torch.fused_qkv attention (which SDPA attention is faster);
* ``fast/loss_chunk=0``: the plain loss (full-vocabulary logits of the whole batch at once);
* ``fast/ckpt``: with activation checkpointing (train.activation_checkpointing);
* ``book``: the ``book-gpt2-*`` recipe (the book's classes) with the plain loss, as before;
* ``transformers``: GPT2LMHeadModel, its default attention implementation.

A second table compares the book and the fast recipe at the quickstart shape (fp32).
MFU is achieved model FLOP/s over this machine's matmul peak in the same dtype, measured here
(minigpt_core.train.flops.measure_matmul_peak). Peak memory of a training step is measured in a
fresh child process per model (CPU, Linux: growth of the peak resident set VmHWM over the RSS
after imports, freed blocks returned to the OS; CUDA: torch.cuda.max_memory_allocated).

    python benchmarks/train_throughput.py --precisions fp32   # 124M shape, fresh processes (CPU: ~25 min)
    python benchmarks/train_throughput.py --precisions fp32 --layers 6 --emb 384 --heads 6 --repeats 7
    python benchmarks/train_throughput.py --mode in-process   # the round-robin table, every variant
    python benchmarks/train_throughput.py --quick    # tiny shapes, a smoke test under a minute
    python benchmarks/train_throughput.py --write    # also append the tables to benchmarks/RESULTS.md
    python benchmarks/train_throughput.py --quickstart-only --compile   # + compiled recipes, compile time apart
    python benchmarks/train_throughput.py --ctx 1024 --batch 8   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, proc_status_kib, time_alternating, timed_calls  # noqa: E402

from minigpt_core import build_model, spec_from_preset  # noqa: E402
from minigpt_core.spec import TrainSpec  # noqa: E402
from minigpt_core.model.summary import summarize  # noqa: E402
from minigpt_core.train import autocast, build_optimizer, lm_loss, select_device  # noqa: E402
from minigpt_core.train.flops import PRECISION_DTYPES, measure_matmul_peak  # noqa: E402

HF = "transformers"
FRESH_DEFAULT_MODELS = ("fast", "fast/loss_chunk=0", HF)  # a process per model per repeat: the ones that matter
DEFAULT_CHUNK = TrainSpec.model_fields["loss_chunk"].default
# name -> (preset, model overrides, loss_chunk, activation checkpointing)
VARIANTS = {
    "fast": ("gpt2-124m", {}, DEFAULT_CHUNK, False),
    "fast/fused_qkv": ("gpt2-124m", {"attention": {"name": "torch.fused_qkv"}}, DEFAULT_CHUNK, False),
    "fast/loss_chunk=0": ("gpt2-124m", {}, 0, False),
    "fast/ckpt": ("gpt2-124m", {}, DEFAULT_CHUNK, True),
    "book": ("book-gpt2-124m", {}, 0, False),
}


def build(name: str, a: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == HF:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=a.vocab, n_positions=a.ctx, n_embd=a.emb, n_layer=a.layers, n_head=a.heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)
    preset, overrides, chunk, ckpt = VARIANTS[name]
    spec = spec_from_preset(preset, model={
        "vocab_size": a.vocab, "context_length": a.ctx, "emb_dim": a.emb, "n_layers": a.layers, "n_heads": a.heads,
        "drop_rate": 0.0, "qkv_bias": True, "tie_weights": a.tied, "init": {"name": "gpt2.normal"}, **overrides},
        tokenizer={"name": "char"})  # no text is tokenized here
    model = build_model(spec)
    model.loss_chunk, model.activation_checkpointing = chunk, ckpt
    return model


def make_step(model: torch.nn.Module, precision: str, a: argparse.Namespace, device: torch.device,
              compiled: bool = False):
    """A closure running one full training step (the same loss and optimizer for every model); ``compiled``:
    the forward (with its loss) through torch.compile, as train.compile does."""
    model.to(device).train()
    forward = torch.compile(model) if compiled else model
    optimizer = build_optimizer(model, TrainSpec(), device)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, a.vocab, (a.batch, a.ctx + 1), generator=gen).to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    is_hf = not hasattr(model, "trf_blocks")

    def step() -> None:
        with autocast(device, precision):  # ours: the loss as the trainer takes it (inside forward)
            loss = lm_loss(forward(input_ids=x).logits, y) if is_hf else forward(x, targets=y, loss_chunk=model.loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync_fn(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# -- peak memory (one child process per model) ---------------------------------------------------
def _peak_memory_here(name: str, precision: str, a: argparse.Namespace, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step = make_step(build(name, a), precision, a, device)
        step()
        step()  # the second step also holds the optimizer state
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    import transformers  # noqa: F401  imported before the baseline, for every model alike

    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    before = proc_status_kib("VmRSS:")
    step = make_step(build(name, a), precision, a, device)
    step()
    step()
    return (proc_status_kib("VmHWM:") - before) / 1024


def peak_memory(name: str, precision: str, a: argparse.Namespace) -> float | None:
    if not Path("/proc/self/clear_refs").exists():
        return None  # not Linux: no resettable peak-RSS counter
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed big blocks go back to the OS
    cmd = [sys.executable, __file__, "--_memory", name, precision, *sys.argv[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.strip().splitlines()[-1])


# -- fresh processes (one per model per repeat) ------------------------------------------------------
def _fresh_here(name: str, precision: str, a: argparse.Namespace, device: torch.device) -> dict:
    """Build one model in this new process and time its steps; what a first-minutes user measures."""
    import transformers  # noqa: F401  the same imports in every model's process

    before = proc_status_kib("VmRSS:")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = sync_fn(device)
    step = make_step(build(name, a), precision, a, device)
    times, faults = timed_calls(step, a.warmup, a.steps, sync)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = None if before is None else (proc_status_kib("VmHWM:") - before) / 1024
    return {"first_s": times[0], "step_s": statistics.median(times[a.warmup:]), "peak_mib": peak,
            "faults_per_step": faults}


def time_fresh(names: list[str], a: argparse.Namespace) -> dict:
    """Each (model, precision) in its own process, alternating (forward then backward order), repeats times."""
    keys = [(n, p) for n in names for p in a.precisions]
    runs: dict = {k: [] for k in keys}
    for r in range(a.repeats):
        for name, precision in (keys if r % 2 == 0 else keys[::-1]):
            cmd = [sys.executable, __file__, "--_fresh", name, precision, *sys.argv[1:]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"the process timing {name} ({precision}) failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[(name, precision)].append(run)
            print(f"  repeat {r + 1}/{a.repeats} {name} {precision}: {a.batch * a.ctx / run['step_s']:,.0f} tokens/s, "
                  f"first step {run['first_s']:.2f} s", flush=True)
    return runs


def report_fresh(runs: dict, a: argparse.Namespace, n_params: int) -> str:
    tokens = a.batch * a.ctx
    med = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    lines = [
        f"Training step (forward, loss, backward, fused AdamW), {a.layers} layers, emb {a.emb}, {a.heads} heads, "
        f"context {a.ctx}, vocab {a.vocab}, batch {a.batch} ({tokens:,} tokens/step), dropout 0, "
        f"{'tied' if a.tied else 'untied'} head, {n_params:,} parameters; each model in a fresh process: "
        f"{a.warmup} warm-up step(s), median of {a.steps} timed steps; {a.repeats} processes per model, "
        f"alternating; the figure is the median over processes (range in brackets). Peak memory: growth of "
        f"the process's peak RSS over its RSS after imports, default allocator. loss_chunk default {DEFAULT_CHUNK}.",
        "",
        "| model | precision | tokens/s [range] | vs transformers | vs plain loss | first step s | page faults/step "
        "| peak memory MiB | memory vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, precision), v in runs.items():
        tok_s = tokens / med[(name, precision)]
        lo, hi = (tokens / max(r["step_s"] for r in v), tokens / min(r["step_s"] for r in v))
        rel = {ref: tokens / med[(ref, precision)] for ref in (HF, "fast/loss_chunk=0") if (ref, precision) in med}
        peaks = [r["peak_mib"] for r in v if r["peak_mib"] is not None]
        peak = statistics.median(peaks) if peaks else None
        peaks_hf = [r["peak_mib"] for r in runs.get((HF, precision), []) if r["peak_mib"] is not None]
        peak_hf = statistics.median(peaks_hf) if peaks_hf else None
        fmt = lambda ref: f"{tok_s / rel[ref]:.2f}x" if ref in rel else "-"  # noqa: E731
        lines.append(
            f"| {name} | {precision} | {tok_s:,.0f} [{lo:,.0f}-{hi:,.0f}] | {fmt(HF)} | {fmt('fast/loss_chunk=0')} | "
            f"{statistics.median(r['first_s'] for r in v):.2f} | "
            f"{statistics.median(r['faults_per_step'] for r in v):,.0f} | {f'{peak:,.0f}' if peak is not None else '-'} | "
            f"{f'{peak / peak_hf:.2f}x' if peak and peak_hf else '-'} |")
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------------------
def report(times: dict, memory: dict, peaks: dict, flops_per_token: int, a: argparse.Namespace, n_params: dict) -> str:
    tokens = a.batch * a.ctx
    lines = [
        f"Training step (forward, loss, backward, fused AdamW) of GPT-2-recipe models: {a.layers} layers, emb {a.emb}, "
        f"{a.heads} heads, context {a.ctx}, vocab {a.vocab}, batch {a.batch} ({tokens:,} tokens/step), dropout 0, "
        f"{'tied' if a.tied else 'untied'} head; {n_params[HF]:,} parameters each"
        f"{'' if len(set(n_params.values())) == 1 else ' (ours differ: ' + str(n_params) + ')'}. Median of {a.repeats} "
        f"round-robin repeats after a warm-up step; loss_chunk default {DEFAULT_CHUNK}. Matmul peak measured here: "
        + ", ".join(f"{p} {peaks[p] / 1e9:,.0f} GFLOP/s" for p in a.precisions) + ".",
        "",
        "| model | precision | tokens/s | vs transformers | vs book | vs own fp32 | MFU | peak memory MiB "
        "| memory vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, precision), seconds in times.items():
        tok_s = tokens / seconds
        hf = tokens / times[(HF, precision)]
        book = tokens / times[("book", precision)] if ("book", precision) in times else None
        own_fp32 = tokens / times[(name, "fp32")] if (name, "fp32") in times else None
        mfu = flops_per_token * tok_s / peaks[precision]
        mem = memory.get((name, precision))
        mem_hf = memory.get((HF, precision))
        lines.append(
            f"| {name} | {precision} | {tok_s:,.0f} | {tok_s / hf:.2f}x | {f'{tok_s / book:.2f}x' if book else '-'} | "
            f"{f'{tok_s / own_fp32:.2f}x' if own_fp32 else '-'} | {mfu:.1%} | "
            f"{f'{mem:,.0f}' if mem is not None else '-'} | {f'{mem / mem_hf:.2f}x' if mem and mem_hf else '-'} |")
    return "\n".join(lines)


def quickstart_table(a: argparse.Namespace, device: torch.device) -> str:
    """experiments/quickstart.toml's shape (char vocab 128, ctx 128, emb 128, 4 heads, 4 layers, batch 32), fp32."""
    q = argparse.Namespace(**{**vars(a), "vocab": 128, "ctx": 128, "emb": 128, "heads": 4, "layers": 4, "batch": 32,
                              "tied": True})
    if a.quick:
        q.batch = 8
    names = ["book", "fast"]
    steps = {n: make_step(build(n, q), "fp32", q, device) for n in names}
    compile_s = {}
    if a.compile:  # the first call compiles: timed on its own, apart from the steady-state speed
        for n in list(names):
            step = steps[n + ", compiled"] = make_step(build(n, q), "fp32", q, device, compiled=True)
            t0 = time.perf_counter()
            step()
            compile_s[n + ", compiled"] = time.perf_counter() - t0
        names = list(steps)
    times = time_alternating(steps, repeats=a.repeats, warmup=1, sync=sync_fn(device))
    tokens = q.batch * q.ctx
    book = tokens / times["book"]
    rows = "\n".join(f"| {n} | {tokens / times[n]:,.0f} | {tokens / times[n] / book:.2f}x | "
                     f"{f'{compile_s[n]:.1f}' if n in compile_s else '-'} |" for n in names)
    return (f"Quickstart shape (vocab 128, ctx 128, emb 128, 4 heads, 4 layers, batch {q.batch}, fp32; median of "
            f"{a.repeats} round-robin repeats; a compiled recipe's first step, its compilation, is timed apart and "
            f"left out of its tokens/s):\n\n| recipe | tokens/s | vs book | first step (compile) s |\n"
            f"|---|---|---|---|\n{rows}")


def in_process_table(a: argparse.Namespace, device: torch.device) -> str:
    names = a.models.split(",") if a.models else [*VARIANTS, HF]
    models = {n: build(n, a) for n in names}
    n_params = {n: sum(t.numel() for t in m.parameters()) for n, m in models.items()}
    flops_per_token = summarize(models[names[0]]).flops_per_token
    print(f"in one process, round-robin; models: {n_params}", flush=True)
    peaks = {prec: measure_matmul_peak(device, PRECISION_DTYPES[prec], seconds=0.2 if a.quick else 1.0)
             for prec in a.precisions}
    steps = {(n, prec): make_step(m, prec, a, device) for n, m in models.items() for prec in a.precisions}
    times = time_alternating(steps, repeats=a.repeats, warmup=1, sync=sync_fn(device))
    del models, steps
    memory = {} if a.no_memory else {(n, prec): peak_memory(n, prec, a) for n in names for prec in a.precisions}
    table = report(times, memory, peaks, flops_per_token, a, n_params)
    print(table, flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--untied", dest="tied", action="store_false", help="an untied output head (default tied)")
    p.add_argument("--mode", choices=["fresh", "in-process", "both"], default="fresh",
                   help="fresh: a new process per model and repeat (default); in-process: round-robin in one process")
    p.add_argument("--repeats", type=int, default=5, help="fresh: processes per model; in-process: timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="fresh: untimed steps in each process")
    p.add_argument("--steps", type=int, default=8, help="fresh: timed steps in each process (their median counts)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--models", default=None, help=f"comma list (default: {', '.join(VARIANTS)}, {HF})")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats, no memory: a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-quickstart", action="store_true", help="skip the quickstart-shape table")
    p.add_argument("--compile", action="store_true", help="quickstart table: also both recipes under torch.compile")
    p.add_argument("--quickstart-only", action="store_true", help="only the quickstart-shape table")
    p.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    p.add_argument("--_memory", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--_fresh", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.layers, a.emb, a.heads, a.ctx, a.vocab, a.batch, a.steps = 2, 64, 2, 32, 1000, 2, 3
        a.repeats = min(a.repeats, 3)
        a.no_memory = True
    a.precisions = a.precisions.split(",")
    device = select_device(a.device)
    if a._memory:
        print(_peak_memory_here(a._memory[0], a._memory[1], a, device))
        return
    if a._fresh:
        print(json.dumps(_fresh_here(a._fresh[0], a._fresh[1], a, device)))
        return

    if a.quickstart_only:
        quick = quickstart_table(a, device)
        print(quick)
        if a.write:
            append_results("Training throughput at the quickstart shape: book vs fast recipe", quick)
        return
    print(machine(), flush=True)
    tables = []
    if a.mode in ("fresh", "both"):
        names = a.models.split(",") if a.models else list(FRESH_DEFAULT_MODELS)
        n_params = sum(t.numel() for t in build(names[0], a).parameters())
        tables.append(report_fresh(time_fresh(names, a), a, n_params))
        print(tables[-1], flush=True)
    if a.mode in ("in-process", "both"):
        tables.append(in_process_table(a, device))
    table = "\n\n".join(tables)
    if not a.no_quickstart and a.mode != "fresh":
        quick = quickstart_table(a, device)
        print("\n" + quick)
        table += "\n\n" + quick
    if a.write:
        title = "fresh processes" if a.mode == "fresh" else "fresh processes and one process" if a.mode == "both" \
            else "one process, round-robin"
        append_results(f"Training throughput ({title}): minigpt GPT-2 recipes vs transformers GPT2LMHeadModel", table)


if __name__ == "__main__":
    main()
