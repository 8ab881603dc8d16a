"""``minigpt quantize``: an int8 copy of a checkpoint for CPU inference."""

from __future__ import annotations

import argparse

from ...base.errors import MinigptError
from ...checkpoints.checkpoint import META_FILE, WEIGHTS_FILE
from ...checkpoints.state import pick_checkpoint
from ..inference import _WHICH
from ..parser import arguments, command


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_WHICH)
    p.add_argument("out", help="new checkpoint directory for the int8 model")
    p.add_argument("--method", default="int8-dynamic",
                   help="int8-dynamic (default: int8 activations and weights, fastest on CPU) or int8-weight "
                        "(int8 weights only, torchao); docs/quantize.md compares them")


@command("quantize", "write an int8 copy of a checkpoint for CPU inference (sample and eval load it)")
@arguments(_quantize_args)
def _quantize(args) -> int:
    from pathlib import Path

    from ...quantize import get_method
    from ...assembly import quantize_checkpoint

    get_method(args.method)
    ckpt, which = pick_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinigptError(f"{out} already exists and is not an empty directory; give a new directory for the "
                           f"quantized checkpoint (nothing was written).")
    print(f"checkpoint: {ckpt} ({which})")
    out, record = quantize_checkpoint(ckpt, out, args.method)
    before = (ckpt / WEIGHTS_FILE).stat().st_size
    after = (out / WEIGHTS_FILE).stat().st_size
    print(f"{args.method}: {len(record['layers'])} linear layers to int8 ({record['library']}); weights file "
          f"{before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB ({before / after:.2f}x smaller)")
    print(f"wrote {out} ({META_FILE} records the method); try: minigpt sample {out}")
    return 0
