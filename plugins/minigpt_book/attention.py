"""The book's attention classes, from plain self-attention to multi-head attention.

Constructors keep the book's signatures so the classes work standalone as in the
book. The LM-ready ones (CausalAttention, MultiHeadAttentionWrapper,
MultiHeadAttention) also accept ``kv_cache=`` for incremental decoding and
``return_weights=True`` for attention visualisation.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt_core.plugin import LayerKVCache, mark_residual_projection

__all__ = [
    "SelfAttention_v1",
    "SelfAttention_v2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
]


class SelfAttention_v1(nn.Module):
    """Scaled dot-product self-attention with raw weight matrices; every token sees every token."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, d_in) as in the book, or (B, T, d_in)
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.transpose(-2, -1)  # (.., T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values  # (.., T, d_out)


class SelfAttention_v2(nn.Module):
    """SelfAttention_v1 with nn.Linear projections (better initialisation, optional bias)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(-2, -1)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


def _causal_mask(mask: torch.Tensor, past: int, new: int) -> torch.Tensor:
    # Rows: the new queries at positions past..past+new-1; columns: every key so far.
    return mask.bool()[past:past + new, :past + new]


class CausalAttention(nn.Module):
    """Single-head attention that masks future tokens and drops out attention weights."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, return_weights: bool = False):
        # x: (B, T, d_in)
        b, num_tokens, _ = x.shape
        keys = self.W_key(x)  # (B, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(keys.unsqueeze(1), values.unsqueeze(1))  # cache holds (B, 1, T_all, d)
            keys, values = k.squeeze(1), v.squeeze(1)
        attn_scores = queries @ keys.transpose(1, 2)  # (B, T, T_all)
        attn_scores.masked_fill_(_causal_mask(self.mask, past, num_tokens), -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = self.dropout(attn_weights) @ values  # (B, T, d_out)
        return (context_vec, attn_weights.unsqueeze(1)) if return_weights else context_vec


class MultiHeadAttentionWrapper(nn.Module):
    """num_heads independent CausalAttention heads, outputs concatenated (no output projection)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, return_weights: bool = False):
        # Each head keeps its own cache; (B, T, d_out) per head -> (B, T, num_heads * d_out)
        outs = [head(x, kv_cache=None if kv_cache is None else kv_cache.child(i), return_weights=return_weights)
                for i, head in enumerate(self.heads)]
        if return_weights:
            return torch.cat([o for o, _ in outs], dim=-1), torch.cat([w for _, w in outs], dim=1)
        return torch.cat(outs, dim=-1)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """Multi-head attention in the canonical layout: the heads' projections stacked, and an
        identity output projection (the wrapper only concatenates). It cannot load that layout back:
        a learnt output projection has no place here."""
        state = {}
        for name in ("W_query", "W_key", "W_value"):
            for part in ("weight", "bias"):
                if getattr(getattr(self.heads[0], name), part) is not None:
                    state[f"{name}.{part}"] = torch.cat([getattr(getattr(h, name), part).detach() for h in self.heads])
        c = state["W_query.weight"].shape[0]
        state["out_proj.weight"] = torch.eye(c, device=state["W_query.weight"].device)
        state["out_proj.bias"] = torch.zeros(c, device=state["W_query.weight"].device)
        return state


class MultiHeadAttention(nn.Module):
    """Multi-head causal attention with one weight matrix per projection, split into heads."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = mark_residual_projection(nn.Linear(d_out, d_out))
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, return_weights: bool = False):
        b, num_tokens, _ = x.shape  # (B, T, d_in)
        # (B, T, d_out) -> (B, H, T, head_dim)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            keys, values = kv_cache.append(keys, values)  # (B, H, T_all, head_dim)
        attn_scores = queries @ keys.transpose(2, 3)  # (B, H, T, T_all)
        attn_scores.masked_fill_(_causal_mask(self.mask, past, num_tokens), -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = (self.dropout(attn_weights) @ values).transpose(1, 2)  # (B, T, H, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        out = self.out_proj(context_vec)
        return (out, attn_weights) if return_weights else out
