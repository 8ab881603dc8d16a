"""Moving attention weights between layouts: the canonical (book / GPT-2) one and a module's own.

The canonical layout of one attention layer is four nn.Linear-shaped tensors and their biases:
``W_query.weight`` (C, C), ``W_key.weight``, ``W_value.weight``, ``out_proj.weight`` and the
matching ``.bias`` entries when present. An attention that declares the ``gpt2`` capability but
stores its weights differently (a fused QKV matrix, torch.nn.MultiheadAttention) implements

    def canonical_state(self) -> dict[str, torch.Tensor]: ...
    def load_canonical_state(self, state: dict[str, torch.Tensor]) -> None: ...

so Hugging Face import/export and the equivalence checks work with it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base.contracts import CanonicalStateProtocol, CanonicalStateSource

__all__ = ["CANONICAL_ATTENTION_KEYS", "attention_canonical_state", "load_attention_canonical_state"]

CANONICAL_ATTENTION_KEYS = ("W_query", "W_key", "W_value", "out_proj")


def attention_canonical_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """An attention's weights under the canonical names (its ``canonical_state()``, else its own state dict's)."""
    if isinstance(module, CanonicalStateSource):
        return module.canonical_state()
    state = module.state_dict()
    return {k: v for k, v in state.items() if k.split(".")[0] in CANONICAL_ATTENTION_KEYS}


@torch.no_grad()
def load_attention_canonical_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy canonical-named weights into an attention (its ``load_canonical_state()``, else by name)."""
    if isinstance(module, CanonicalStateProtocol):
        module.load_canonical_state(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected]
    missing = [k for k in missing if k.split(".")[0] in CANONICAL_ATTENTION_KEYS]
    if missing or unexpected:
        raise ValueError(f"{type(module).__name__} does not take the canonical attention layout: "
                         f"missing {missing}, unexpected {unexpected}")
