"""Does assembling a GPT from registry components cost anything at run time?

Times forward+backward of the assembled book recipe against a hand-written copy of the
book's GPTModel (tests/book_reference.py) with the same weights, alternating the two.

    python benchmarks/assembly_overhead.py [--repeats 20] [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, time_alternating  # noqa: E402
from book_reference import RefGPTModel  # noqa: E402

from minigpt_core import build_model, spec_from_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    cfg = dict(vocab_size=50257, context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.0, qkv_bias=False)
    torch.manual_seed(123)
    ref = RefGPTModel(cfg)
    model = build_model(spec_from_preset("gpt2-124m", model=cfg))
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg["vocab_size"], (args.batch, cfg["context_length"]))

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(idx).float().logsumexp(-1).mean().backward()
        return run

    t = time_alternating({"hand-written": step(ref), "assembled": step(model)}, args.repeats, warmup=2)
    ratio = t["assembled"] / t["hand-written"]
    body = (f"Shape: emb {cfg['emb_dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, batch {args.batch} x "
            f"{cfg['context_length']} tokens, fp32, forward+backward, median of {args.repeats}.\n\n"
            f"| model | ms/step |\n|---|---|\n| hand-written book GPTModel | {t['hand-written'] * 1e3:.1f} |\n"
            f"| assembled from registry (book recipe) | {t['assembled'] * 1e3:.1f} |\n\n"
            f"Assembled / hand-written time ratio: **{ratio:.3f}**")
    print(machine())
    print(body)
    if args.write:
        append_results("Assembly overhead: assembled vs hand-written GPT", body)


if __name__ == "__main__":
    main()
