"""The book's non-attention layers: LayerNorm, GELU, FeedForward, the transformer block.

GELU, FeedForward and TransformerBlock live in the core (:mod:`minigpt_core.model.layers`), because other
plugins build on them too; they are re-exported here under the book's names.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt_core.plugin import GELU, FeedForward, TransformerBlock

__all__ = ["LayerNorm", "GELU", "FeedForward", "LearnedPositionalEmbedding", "TransformerBlock"]


class LayerNorm(nn.Module):
    """Normalise the last dimension to zero mean and unit (biased) variance, then scale and shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class LearnedPositionalEmbedding(nn.Embedding):
    """One trained vector per absolute position (the book's ``pos_emb``): positions (T,) -> (T, C)."""
