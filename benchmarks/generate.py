"""Generation speed: minigpt's sampling path vs Hugging Face transformers' ``generate``.

Both sides hold the same weights: a GPT-2-shaped minigpt model (the gpt2-124m preset's
components, with GPT-2's q/k/v biases and tied head; --attention / --norm / --activation
override them) is randomly initialised, nothing is downloaded, and its weights go through
minigpt's GPT-2 interop (the ``gpt2.hf`` weights format that ``minigpt export-hf`` writes) into
transformers' ``GPT2LMHeadModel``. Each continues the same random prompt greedily with its KV
cache: ours through ``minigpt_core.model.generate.generate`` (what ``minigpt sample`` runs), theirs
through ``GPT2LMHeadModel.generate(do_sample=False, use_cache=True)``. Weights are cast to the
precision (fp32, bf16), as a checkpoint in that precision holds them.

* tokens/s: new tokens of all rows over the whole call (prompt processing included);
* time to first token (TTFT): a call that generates one token;
* decode tokens/s: the tokens after the first over (call - TTFT).

Every call of one batch size and precision is timed round-robin (median of --repeats) so
machine noise hits both alike. Output tokens must be identical: asserted in fp32; in bf16 the
two libraries' kernels may round differently, so the first position where they differ is
reported instead.

    python benchmarks/generate.py              # 124M shape, batch 1 and 8, fp32 and bf16 (minutes)
    python benchmarks/generate.py --quick      # a tiny model and a few tokens (seconds)
    python benchmarks/generate.py --compile    # also ours with generate(..., compile=True)
    python benchmarks/generate.py --bf16-batches 1   # bf16 at batch 1 only (minutes per call otherwise on AVX2 CPUs)
    python benchmarks/generate.py --write      # replace this benchmark's section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, append_results, machine, time_alternating  # noqa: E402

from minigpt_core import build_model, get_registry, spec_from_preset  # noqa: E402
from minigpt_core.model.generate import generate  # noqa: E402
from minigpt_core.pretrained import weights_format  # noqa: E402
from minigpt_core.train import select_device  # noqa: E402

TITLE = "Generation: minigpt generate vs transformers generate"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK = dict(layers=2, emb=64, heads=4, ctx=128, vocab=1000, prompt_len=8, new_tokens=16, repeats=3)


def build_pair(a: argparse.Namespace):
    """(our GPT, transformers' GPT2LMHeadModel holding the same weights), both fp32 in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = {"vocab_size": a.vocab, "context_length": a.ctx, "emb_dim": a.emb, "n_layers": a.layers,
             "n_heads": a.heads, "drop_rate": 0.0, "qkv_bias": True, "tie_weights": True,
             # A wide init gives peaked logits: no near-ties that rounding noise could flip.
             "init": {"name": "gpt2.normal", "params": {"std": a.init_std}}}
    for slot in ("attention", "norm", "activation"):
        if getattr(a, slot):
            model[slot] = {"name": getattr(a, slot)}
    spec = spec_from_preset("gpt2-124m", model=model, tokenizer={"name": "char"})  # no text is tokenized
    ours = build_model(spec, seed=0).eval()
    fmt = weights_format(get_registry(), name="gpt2.hf")
    fmt.check(spec.components, export=True)  # refuses components GPT-2 has no equivalent for
    config = GPT2Config(**fmt.config(ours))
    theirs = GPT2LMHeadModel(config).eval()
    missing, unexpected = theirs.load_state_dict(fmt.state(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is the embedding
        raise SystemExit(f"weights do not fit transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    # No end-of-text stop on either side: every call generates exactly the asked tokens.
    theirs.generation_config.eos_token_id = theirs.generation_config.bos_token_id = None
    theirs.generation_config.pad_token_id = None
    return ours, theirs, spec


def components(spec) -> str:
    m = spec.model
    return ", ".join(f"{slot} {getattr(m, slot).name}" for slot in ("attention", "norm", "activation", "block"))


def hf_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True)


def first_difference(a: torch.Tensor, b: torch.Tensor, start: int) -> str:
    """'identical', or where the generated tokens first differ (0 = the first new token)."""
    if a.shape == b.shape and torch.equal(a, b):
        return "identical"
    n = min(a.shape[1], b.shape[1])
    differs = (a[:, start:n] != b[:, start:n]).any(dim=0).nonzero()
    pos = int(differs[0]) if len(differs) else n - start
    rows = (a[:, start + pos] != b[:, start + pos]).nonzero()[:, 0].tolist() if len(differs) else []
    return f"differ from new token {pos}" + (f" (rows {rows})" if rows else "")


def run(a: argparse.Namespace, device: torch.device) -> tuple[list[dict], str, str]:
    ours32, theirs32, spec = build_pair(a)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for precision in a.precisions:
        dtype = DTYPES[precision]
        ours = (ours32 if dtype == torch.float32 else copy.deepcopy(ours32)).to(device, dtype)
        theirs = (theirs32 if dtype == torch.float32 else copy.deepcopy(theirs32)).to(device, dtype)
        for batch in (a.bf16_batches or a.batches) if precision == "bf16" else a.batches:
            prompt = torch.randint(0, a.vocab, (batch, a.prompt_len),
                                   generator=torch.Generator().manual_seed(batch)).to(device)
            n = a.new_tokens
            # Outputs first (the warm-up calls): the speed of a wrong answer is no result.
            got = generate(ours, prompt, n)
            want = hf_generate(theirs, prompt, n)
            same = first_difference(got, want, a.prompt_len)
            if precision == "fp32" and same != "identical":
                raise SystemExit(f"fp32 batch {batch}: minigpt and transformers generated different tokens: {same}")
            fns = {
                ("ours", "gen"): lambda: generate(ours, prompt, n),
                ("transformers", "gen"): lambda: hf_generate(theirs, prompt, n),
                ("ours", "ttft"): lambda: generate(ours, prompt, 1),
                ("transformers", "ttft"): lambda: hf_generate(theirs, prompt, 1),
            }
            compile_s = None
            if a.compile:
                t0 = time.perf_counter()
                compiled = generate(ours, prompt, n, compile=True)  # compiles the decode step
                compile_s = time.perf_counter() - t0
                if not torch.equal(compiled, got):
                    same += f"; compiled: {first_difference(compiled, got, a.prompt_len)} from eager"
                fns[("ours, compiled", "gen")] = lambda: generate(ours, prompt, n, compile=True)
                fns[("ours, compiled", "ttft")] = lambda: generate(ours, prompt, 1, compile=True)
            times = time_alternating(fns, repeats=a.repeats, warmup=1, sync=sync)
            for who in dict.fromkeys(k[0] for k in fns):
                gen, ttft = times[(who, "gen")], times[(who, "ttft")]
                row = dict(batch=batch, precision=precision, who=who, tok_s=batch * n / gen, ttft_ms=ttft * 1e3,
                           decode_tok_s=batch * (n - 1) / max(gen - ttft, 1e-9), same=same, compile_s=compile_s)
                rows.append(row)
                print(f"batch {batch} {precision} {who}: {row['tok_s']:.1f} tok/s, TTFT {row['ttft_ms']:.1f} ms, "
                      f"decode {row['decode_tok_s']:.1f} tok/s ({same})", flush=True)
        del ours, theirs
    return rows, components(spec), theirs32.config._attn_implementation


def report(rows: list[dict], comps: str, a: argparse.Namespace, attn_impl: str) -> str:
    hf = {(r["batch"], r["precision"]): r for r in rows if r["who"] == "transformers"}
    lines = [
        f"Greedy generation of {a.new_tokens} new tokens after a {a.prompt_len}-token random prompt, KV cache on "
        f"both sides, same weights (random init, std {a.init_std}): {a.layers} layers, emb {a.emb}, {a.heads} heads, "
        f"context {a.ctx}, vocab {a.vocab}; ours: {comps}; transformers GPT2LMHeadModel, attn_implementation "
        f"{attn_impl}. Median of {a.repeats} round-robin repeats after a warm-up call; {torch.get_num_threads()} "
        f"torch threads.",
        "",
        "| batch | precision | generator | tokens/s | vs transformers | TTFT ms | TTFT speed-up | "
        "decode tokens/s | same tokens |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = hf[(r["batch"], r["precision"])]
        who = r["who"] + (f" ({r['compile_s']:.0f} s to compile)" if r["compile_s"] and r["who"] != "ours"
                          and r["who"] != "transformers" else "")
        lines.append(
            f"| {r['batch']} | {r['precision']} | {who} | {r['tok_s']:,.1f} | **{r['tok_s'] / base['tok_s']:.2f}x** | "
            f"{r['ttft_ms']:,.1f} | {base['ttft_ms'] / r['ttft_ms']:.2f}x | {r['decode_tok_s']:,.1f} | "
            f"{r['same']} |")
    return "\n".join(lines)


def write_results(body: str) -> None:
    """Replace this benchmark's section of RESULTS.md (appended at the end), keeping every other one."""
    if RESULTS.exists():
        text = RESULTS.read_text(encoding="utf-8")
        pattern = re.compile(rf"\n## {re.escape(TITLE)}\n.*?(?=\n## |\Z)", re.S)
        RESULTS.write_text(pattern.sub("", text), encoding="utf-8")
    append_results(TITLE, body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--bf16-batches", default=None,
                   help="batch sizes for bf16 (default: --batches); on a CPU without bf16 matrix instructions a "
                        "bf16 batch-8 call takes minutes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--init-std", type=float, default=0.2)
    p.add_argument("--attention", default=None, help="override the preset's attention (e.g. torch.sdpa)")
    p.add_argument("--norm", default=None, help="override the preset's norm (e.g. torch.layernorm)")
    p.add_argument("--activation", default=None, help="override the preset's activation")
    p.add_argument("--compile", action="store_true", help="also time ours with generate(..., compile=True)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens: checks that it all runs")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.bf16_batches = [int(b) for b in a.bf16_batches.split(",")] if a.bf16_batches else None
    a.precisions = a.precisions.split(",")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        import transformers
    except ImportError:
        sys.exit("this benchmark compares with Hugging Face transformers: pip install transformers")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    device = select_device(a.device)
    print(f"{machine()}\ntransformers {transformers.__version__}", flush=True)
    rows, comps, attn_impl = run(a, device)
    table = report(rows, comps, a, attn_impl)
    print(table)
    if a.write:
        write_results(table + f"\n\ntransformers {transformers.__version__}.")


if __name__ == "__main__":
    main()
