"""The book's non-attention layers: LayerNorm, GELU, FeedForward, the transformer block."""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt_core.model import BuildContext, LayerKVCache, mark_residual_projection

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


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    """Linear(C -> hidden) -> activation -> Linear(hidden -> C), hidden = 4C in the book."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: nn.Module | None = None):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, hidden_dim),
            activation if activation is not None else GELU(),
            mark_residual_projection(nn.Linear(hidden_dim, emb_dim)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LearnedPositionalEmbedding(nn.Embedding):
    """One trained vector per absolute position (the book's ``pos_emb``): positions (T,) -> (T, C)."""


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, ctx: BuildContext):
        super().__init__()
        # Same creation order as the book (att, ff, norm1, norm2) so seeds give the same weights.
        self.att = ctx.build("attention")
        self.ff = ctx.build("feedforward")
        self.norm1 = ctx.build("norm")
        self.norm2 = ctx.build("norm")
        self.drop_shortcut = nn.Dropout(ctx.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        # x: (B, T, C)
        h = self.norm1(x)
        h = self.att(h) if kv_cache is None else self.att(h, kv_cache=kv_cache)
        x = x + self.drop_shortcut(h)
        return x + self.drop_shortcut(self.ff(self.norm2(x)))
