"""int8 quantization for CPU inference: weight size, batch-1 generation speed, validation perplexity.

Two parts, both against fp32 and bf16 weights:

* **124M shape** (GPT-2 small: 12 layers, emb 768, tied head, random init; speed and size do not
  depend on the weights): bytes of the linear layers' weights (the output head included) and
  greedy batch-1 generation tokens/s through ``minigpt sample``'s path (minigpt_core.model.generate,
  KV cache), every variant timed round-robin so machine noise hits them alike.
* **perplexity** on a trained model (random weights have no perplexity to keep): a checkpoint of
  experiments/quickstart.toml trained for --train-steps steps on the shipped python-docs text
  (trained here once and cached under benchmarks/.cache/, or --checkpoint PATH), evaluated on its
  whole validation split by each variant.

    python benchmarks/quantize.py                 # 100 new tokens, 3 repeats, a 300-step quickstart model
    python benchmarks/quantize.py --quick         # 16 tokens, 1 repeat, 100 training steps: a smoke run
    python benchmarks/quantize.py --write         # also append the tables to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, time_alternating  # noqa: E402

from minigpt_core import build_model, spec_from_preset  # noqa: E402
from minigpt_core.model.generate import generate  # noqa: E402
from minigpt_core.quantize import METHODS, linear_weight_bytes, quantize_model, quantized_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
VARIANTS = ["fp32", "bf16", *METHODS]


def variant(model: torch.nn.Module, name: str) -> torch.nn.Module:
    m = copy.deepcopy(model)
    if name == "fp32":
        return m
    if name == "bf16":
        return m.to(torch.bfloat16)
    return quantize_model(m, name)


def linear_bytes(model: torch.nn.Module, name: str) -> int:
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if name in ("fp32", "bf16"):
        return sum(m.weight.numel() for m in linears) * (4 if name == "fp32" else 2)
    return linear_weight_bytes(*quantized_state(model))


def speed_table(a: argparse.Namespace) -> str:
    spec = spec_from_preset("gpt2-124m", model={"tie_weights": True, "qkv_bias": True, "drop_rate": 0.0,
                                                "init": {"name": "gpt2.normal"}}, tokenizer={"name": "char"})
    base = build_model(spec).eval()
    models = {n: variant(base, n) for n in VARIANTS}
    prompt = torch.randint(0, spec.model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    fns = {n: (lambda m=m: generate(m, prompt, a.new_tokens)) for n, m in models.items()}
    print(f"timing {len(fns)} variants x {a.repeats} repeats of {a.new_tokens} tokens...", file=sys.stderr)
    secs = time_alternating(fns, a.repeats, warmup=1)
    rows = ["| weights | linear weights MB | vs fp32 | tokens/s | vs fp32 |", "|---|---|---|---|---|"]
    fp32_bytes, fp32_tps = linear_bytes(base, "fp32"), a.new_tokens / secs["fp32"]
    for n in VARIANTS:
        b, tps = linear_bytes(base, n), a.new_tokens / secs[n]
        rows.append(f"| {n} | {b / 1e6:,.1f} | {fp32_bytes / b:.2f}x smaller | {tps:.2f} | {tps / fp32_tps:.2f}x |")
    return (f"### 124M shape (tied head, random init): batch 1, 8-token prompt, {a.new_tokens} new tokens greedy, "
            f"KV cache, median of {a.repeats} round-robin repeats, {torch.get_num_threads()} threads\n\n"
            + "\n".join(rows))


def trained_checkpoint(a: argparse.Namespace) -> Path:
    if a.checkpoint:
        return Path(a.checkpoint)
    out = CACHE / f"quickstart-{a.train_steps}"
    from minigpt_core.checkpoints.state import pick_checkpoint

    try:
        return pick_checkpoint(out / "quickstart")[0]
    except Exception:  # noqa: BLE001 - not trained yet
        pass
    print(f"training experiments/quickstart.toml for {a.train_steps} steps into {out} (once)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "minigpt_core", "train", str(ROOT / "experiments/quickstart.toml"),
                    "--no-progress", "--set", f"train.max_steps={a.train_steps}", "--set", f"train.out_dir={out}",
                    "--set", f"train.save_every={a.train_steps}", "--set", f"train.eval_every={a.train_steps}",
                    "--set", "train.sample_every=0", "--set", "wandb.mode=disabled"], check=True, cwd=ROOT)
    return pick_checkpoint(out / "quickstart")[0]


def perplexity_table(a: argparse.Namespace) -> str:
    import numpy as np

    from minigpt_core.checkpoints.checkpoint import read_meta
    from minigpt_core.assembly import load_model
    from minigpt_core.data import load_training_data
    from minigpt_core.tasks.evaluate import evaluate

    ckpt = trained_checkpoint(a)
    model, spec = load_model(ckpt)
    data = load_training_data(spec, tokenizer_state=read_meta(ckpt).get("tokenizer"))
    split = data.split
    starts = np.asarray(split.val)
    if a.max_windows and a.max_windows < len(starts):
        from minigpt_core.tasks.evaluate import eval_windows

        starts = starts[eval_windows(len(starts), a.max_windows)]
    rows = ["| weights | val loss | perplexity | vs fp32 |", "|---|---|---|---|"]
    ppl = {}
    for n in VARIANTS:
        loss = evaluate(variant(model, n), split.corpus, starts, split.length, micro_batch=8,
                        device=torch.device("cpu"))
        ppl[n] = math.exp(loss)
        rows.append(f"| {n} | {loss:.4f} | {ppl[n]:.3f} | {100 * (ppl[n] / ppl['fp32'] - 1):+.2f} % |")
    m = spec.model
    return (f"### perplexity: {ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt} "
            f"({m.n_layers} layers, emb {m.emb_dim}, {spec.train.max_steps} steps of "
            f"experiments/quickstart.toml), {len(starts):,} of its {len(split.val):,} validation windows of {split.length - 1} tokens\n\n"
            + "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, a 100-step model")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint for the perplexity part")
    p.add_argument("--max-windows", type=int, default=None, help="validation windows (default all; --quick 256)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    a = p.parse_args()
    a.new_tokens = a.new_tokens or (16 if a.quick else 100)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.train_steps = a.train_steps or (100 if a.quick else 300)
    a.max_windows = a.max_windows or (256 if a.quick else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*(sliding window|deprecated).*")
    t0 = time.time()
    print(f"Machine: {machine()}\n", flush=True)
    ppl = perplexity_table(a)
    print(ppl + "\n", flush=True)
    speed = speed_table(a)
    print(f"{speed}\n\n({time.time() - t0:.0f} s)")
    body = ppl + "\n\n" + speed
    if a.write:
        append_results("int8 quantization: weight size, batch-1 generation, perplexity", body)


if __name__ == "__main__":
    main()
