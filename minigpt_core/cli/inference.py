"""Loading the checkpoint an inference command (sample, eval, attention, classify, quantize) names."""

from __future__ import annotations

import sys

_WHICH = "checkpoint directory, or a run / experiment directory (its best checkpoint, else its latest)"


def _load_for_inference(path: str, device: str, file=None, quantize: str | None = None):
    """Load the checkpoint every inference command uses (see pick_checkpoint), saying which it is.

    An int8 checkpoint (minigpt quantize) loads as such; ``quantize`` (--quantize METHOD) quantizes a
    float one after loading. Both run on the CPU ("auto" picks it). The work is
    ``assembly.load_for_inference``'s, shared with ``minigpt evaluate``'s lm_eval adapter."""
    from ..assembly import load_for_inference

    return load_for_inference(path, device, quantize=quantize,
                              report=lambda line: print(line, file=file or sys.stdout, flush=True))
