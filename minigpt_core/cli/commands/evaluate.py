"""``minigpt evaluate``: downstream tasks through EleutherAI's lm-evaluation-harness (docs/evaluate.md)."""

from __future__ import annotations

import argparse

from ...base.errors import MinigptError
from ..inference import _WHICH
from ..parser import arguments, command


def _limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_WHICH)
    p.add_argument("--tasks", required=True, action="append", metavar="NAMES",
                   help="lm_eval tasks, comma-separated or repeated: pydoc_mc, pydoc_cloze, pydoc (both; they ship "
                        "with minigpt, offline) or any task lm_eval knows (hellaswag, lambada_openai, ...: "
                        "downloaded on first use)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples shown before each question (default: the task's own, usually 0)")
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="at most N examples per task (a fraction below 1: that share); for a quick look")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per forward pass (default 8)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where <task>.json go (default: RUN/eval of the checkpoint's run, or CHECKPOINT/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantize the model's linear layers to int8 after loading (CPU): int8-dynamic or int8-weight")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (default: as the run's [wandb] says)")
    p.add_argument("--verbose", action="store_true", help="show lm_eval's own log messages")


@command("evaluate", "score a checkpoint on downstream tasks with EleutherAI's lm-evaluation-harness (RUN/eval/)")
@arguments(_evaluate_args)
def _evaluate(args) -> int:
    from ...downstream.run import check_options, evaluate_checkpoint, format_table

    check_options(args.num_fewshot, args.limit, args.batch_size)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise MinigptError(f"--threads must be >= 1, not {args.threads}.")
        torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.checkpoint, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                 batch_size=args.batch_size, device=args.device, out=args.out, quantize=args.quantize,
                                 progress=not args.no_progress, wandb=not args.no_wandb, verbose=args.verbose)
    print()
    for line in format_table(result):
        print(line)
    print()
    print(f"{len(result.files)} result file(s) in {result.out_dir} ({result.seconds:.1f} s)")
    if result.wandb_dir is not None:
        print(f"W&B run: {result.wandb_dir}")
    return 0
