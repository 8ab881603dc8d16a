"""torch.compile bookkeeping shared by the trainer and the ``compiles`` conformance check.

What is compiled: only the training forward (``train.compile``). Evaluation, sampling (whose
KV-cache decoding changes shapes every token) and attention maps run the plain module, so
they never meet the compiler; switching the shared modules to eval mode and back costs no
recompilation either, because the compiled graph's guards see the same training flags again.
"""

from __future__ import annotations

__all__ = ["compiled_graphs"]


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far (first compiles and
    recompiles alike): the difference across a stretch of training is its recompilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
