"""The trainer's own speed from a cold start: ``minigpt train`` with the chunked loss (train.loss_chunk
256, the default) against the plain loss (0), each run a new process, alternating.

The model is GPT-2's recipe at 6 layers, width 384, 6 heads, context 256, batch 4, the GPT-2 tokenizer
(vocab 50,257) on the python-stdlib corpus (no download), fp32. The trainer logs tokens/s over each
window of ``--log-every`` steps (evaluation and saving left out); the table gives the first window
(what a user sees in their first minutes) and the mean of the windows after ``--after`` steps.

    python benchmarks/trainer_speed.py                 # 2 runs per setting, 120 steps each (CPU: ~20 min)
    python benchmarks/trainer_speed.py --repeats 3 --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine  # noqa: E402

SPEC = """name = "trainer-speed"
preset = "gpt2-124m"
seed = 1

[model]
vocab_size = 50257
context_length = 256
emb_dim = {emb}
n_heads = {heads}
n_layers = {layers}
drop_rate = 0.0
qkv_bias = true
tie_weights = true

[model.init]
name = "gpt2.normal"

[data.source]
name = "python-stdlib"

[train]
max_steps = {steps}
batch_size = 4
log_every = {log_every}
eval_every = 0
sample_every = 0
save_every = 0
precision = "fp32"

[wandb]
mode = "disabled"
"""


def train_once(spec: Path, out: Path, chunk: int) -> list[dict]:
    """One ``minigpt train`` process; its logged train records (step, tokens/s)."""
    run_root = out / f"chunk-{chunk}-{len(list(out.glob(f'chunk-{chunk}-*')))}"
    cmd = [sys.executable, "-m", "minigpt", "train", str(spec), "--no-progress",
           "--set", f"train.loss_chunk={chunk}", "--set", f"train.out_dir={run_root}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"minigpt train failed:\n{done.stderr[-3000:]}")
    [metrics] = run_root.glob("*/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "train/tokens_per_s" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--emb", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--after", type=int, default=100, help="the steady figure: windows that start after this step")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    p.add_argument("--chunks", default="256,0", help="train.loss_chunk values to compare")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args()
    chunks = [int(c) for c in a.chunks.split(",")]
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        spec = out / "spec.toml"
        spec.write_text(SPEC.format(emb=a.emb, heads=a.heads, layers=a.layers, steps=a.steps, log_every=a.log_every))
        prepare = out / "prepare.toml"  # tokenize the corpus once, outside the timed runs
        prepare.write_text(SPEC.format(emb=a.emb, heads=a.heads, layers=a.layers, steps=1, log_every=1))
        train_once(prepare, out, chunks[0])
        results: dict[int, list[list[dict]]] = {c: [] for c in chunks}
        for r in range(a.repeats):
            for c in (chunks if r % 2 == 0 else chunks[::-1]):
                results[c].append(train_once(spec, out, c))
                first = results[c][-1][0]["train/tokens_per_s"]
                print(f"  run {r + 1}/{a.repeats} loss_chunk={c}: first {a.log_every} steps {first:,.0f} tokens/s",
                      flush=True)
    rows = {}
    for c, runs in results.items():
        first = statistics.median(run[0]["train/tokens_per_s"] for run in runs)
        late = statistics.median(statistics.mean(x["train/tokens_per_s"] for x in run if x["step"] > a.after)
                                 for run in runs)
        rows[c] = (first, late)
    ref = rows.get(0)
    lines = [f"`minigpt train`, GPT-2 recipe: {a.layers} layers, width {a.emb}, {a.heads} heads, context 256, "
             f"batch 4 (1,024 tokens/step), GPT-2 tokenizer (vocab 50,257), python-stdlib, fp32, {a.steps} steps; "
             f"tokens/s as the trainer logs it every {a.log_every} steps; {a.repeats} runs per setting (each a new "
             f"process, alternating), median over runs.", "",
             f"| train.loss_chunk | steps 1-{a.log_every} tokens/s | vs plain | steps {a.after + 1}-{a.steps} tokens/s "
             f"| vs plain |", "|---|---|---|---|---|"]
    for c, (first, late) in rows.items():
        lines.append(f"| {c} | {first:,.0f} | {f'{first / ref[0]:.2f}x' if ref else '-'} | {late:,.0f} | "
                     f"{f'{late / ref[1]:.2f}x' if ref else '-'} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        append_results("The trainer's tokens/s from a cold start: chunked vs plain loss", table)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
