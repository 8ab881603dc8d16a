"""Loading the checkpoint an inference command (sample, eval, attention, classify, quantize) names."""

from __future__ import annotations

import sys

from ..base.device import select_device
from ..checkpoints.checkpoint import read_meta
from ..checkpoints.state import pick_checkpoint
from ..model.tokenizers import build_tokenizer, tokenizer_from_state

_WHICH = "checkpoint directory, or a run / experiment directory (its best checkpoint, else its latest)"


def _load_for_inference(path: str, device: str, file=None, quantize: str | None = None):
    """Load the checkpoint every inference command uses (see pick_checkpoint), saying which it is.

    An int8 checkpoint (minigpt quantize) loads as such; ``quantize`` (--quantize METHOD) quantizes a
    float one after loading. Both run on the CPU ("auto" picks it)."""
    from ..assembly import load_model

    ckpt, which = pick_checkpoint(path)
    record = read_meta(ckpt).get("quantization")
    stored = record.get("method") if isinstance(record, dict) else "?"  # a damaged record: load_model says so
    if quantize is not None:
        from ..quantize import QuantizationError, get_method

        get_method(quantize)  # an unknown method or a missing library before the load
        if record:
            raise QuantizationError(f"{ckpt} is already quantized (method {stored}); leave out "
                                    f"--quantize, or give the float checkpoint it was made from.")
    int8 = bool(record) or quantize is not None
    print(f"checkpoint: {ckpt} ({which}{', int8 ' + (quantize or stored) if int8 else ''})",
          file=file or sys.stdout, flush=True)
    if int8 and device != "auto":  # before select_device: the reason is int8, not a missing GPU
        from ..quantize import check_device

        check_device(device)
    dev = select_device("cpu" if int8 else device)
    model, spec = load_model(ckpt, map_location=dev, quantized=True)
    if quantize is not None:
        from ..quantize import quantize_model

        model = quantize_model(model, quantize)
    from ..tasks import require_lm

    require_lm(spec, ckpt, "sampling or next-token evaluation")
    state = read_meta(ckpt).get("tokenizer")
    tokenizer = tokenizer_from_state(state) if state else build_tokenizer(spec)
    return ckpt, model, spec, tokenizer, dev
