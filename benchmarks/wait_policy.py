"""Step time of the quickstart model with OMP_WAIT_POLICY=ACTIVE (spinning threads) and PASSIVE.

The policy is read once, when libgomp starts (at `import torch`), so each measurement is a fresh
process; the two policies alternate, ROUNDS processes each. A step is the quickstart's: forward,
backward and AdamW on a 32 x 128 batch, all of torch's threads (OMP_NUM_THREADS unset).
Prints one line per process and the medians; the load average says how idle the machine was.

    python benchmarks/wait_policy.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, time
import torch
from minigpt_core import build_model, load_spec

spec = load_spec(sys.argv[1])
model = build_model(spec)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(0)
x = torch.randint(0, spec.model.vocab_size, (spec.train.batch_size, spec.model.context_length), generator=gen)
times = []
for i in range(3 + int(sys.argv[2])):  # 3 warm-up steps
    t0 = time.perf_counter()
    loss = model(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(json.dumps({"median_s": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    spec = ROOT / "experiments" / "quickstart.toml"
    got: dict[str, list[float]] = {"ACTIVE": [], "PASSIVE": []}
    print(f"load average before: {os.getloadavg()[0]:.2f}, cores {len(os.sched_getaffinity(0))}")
    for r in range(args.rounds):
        for policy in (("ACTIVE", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "ACTIVE")):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
            env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            got[policy].append(result["median_s"])
            print(f"round {r + 1} {policy:7s} {result['median_s'] * 1000:7.1f} ms/step "
                  f"({result['threads']} threads, load {os.getloadavg()[0]:.2f})", flush=True)
    a, p = statistics.median(got["ACTIVE"]), statistics.median(got["PASSIVE"])
    print(f"median ACTIVE {a * 1000:.1f} ms, PASSIVE {p * 1000:.1f} ms: PASSIVE/ACTIVE {p / a:.3f}")


if __name__ == "__main__":
    main()
