"""Layers the first-party plugins share, and any plugin may use (through :mod:`minigpt_core.plugin`).

The book's GELU, feed-forward and pre-norm transformer block (``book.*`` registers them; the
``modern.*`` post-norm block rearranges the block's parts and its mixture of experts uses the
feed-forward as experts), and causal attention on ``F.scaled_dot_product_attention``
(:func:`causal_attention`, wrapped with projections and the modern options by
:class:`SDPAttention`; ``torch.*`` and ``modern.*`` attentions are built on it). Plugins import
these from ``minigpt_core.plugin``, never from each other.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import BuildContext, LayerKVCache, mark_residual_projection

__all__ = [
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "attention_bias",
    "causal_attention",
    "SDPAttention",
]


# -- the book's layers (chapter 4) --------------------------------------------------------------
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


# -- causal attention on PyTorch's fused kernels ---------------------------------------------------
# One core, causal_attention, does the attention proper for SDPAttention and every attention built
# on it: it calls F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU, the fused
# CPU kernel otherwise) and builds an explicit mask only when it must: a sliding window, ALiBi, or
# several new queries after a KV-cache prefix (is_causal aligns the triangle to the top-left
# corner, which is wrong once keys precede the queries).
def attention_bias(t_q: int, t_k: int, past: int, *, window: int | None = None,
                   alibi_slopes: torch.Tensor | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive attention bias (T_q, T_k), or (1, H, T_q, T_k) with ALiBi.

    Query i sits at absolute position past + i and may see key j when 0 <= past + i - j < window;
    ALiBi adds -slope_h * (past + i - j), a penalty growing with distance.
    """
    dist = torch.arange(past, past + t_q, device=device)[:, None] - torch.arange(t_k, device=device)[None, :]
    hidden = dist < 0
    if window is not None:
        hidden |= dist >= window
    bias = torch.zeros(t_q, t_k, device=device, dtype=dtype).masked_fill(hidden, -torch.inf)
    if alibi_slopes is not None:
        # 4-D: SDPA's fused CPU kernel takes a (1, H, T_q, T_k) mask but falls back to the
        # score-materialising math kernel for a 3-D one.
        bias = bias - alibi_slopes.to(dtype)[None, :, None, None] * dist.to(dtype)
    return bias


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0, *,
                     dropout_p: float = 0.0, window: int | None = None,
                     alibi_slopes: torch.Tensor | None = None, return_weights: bool = False):
    """Causal attention of queries at positions past.. over all keys so far.

    q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with T_k = past + T_q and H divisible by H_kv.
    Returns (B, H, T_q, D), and the (B, H, T_q, T_k) weights with ``return_weights``.
    """
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves H / H_kv query heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t_q, t_k = q.shape[2], k.shape[2]
    plain = window is None and alibi_slopes is None
    if plain and not return_weights and (t_q == 1 or past == 0):
        # A fresh sequence is causal from the top-left corner; one new query sees every cached key.
        # (t_q tested first: under torch.compile `past` is symbolic and SDPA wants a plain bool.)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=t_q > 1 and past == 0)
    bias = attention_bias(t_q, t_k, past, window=window, alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype)
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1)  # (B, H, T_q, T_k)
    return F.dropout(weights, dropout_p) @ v, weights


class SDPAttention(nn.Module):
    """Multi-head causal attention on scaled_dot_product_attention, with the modern options.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query (1: multi-query) attention; ``rotary`` is a
    module applying rotary embeddings as ``rotary(x, offset)``; ``qk_norm`` builds a norm over
    head_dim for queries and keys; ``alibi_slopes`` (n_heads,) and ``window`` shape the mask.
    With the defaults it computes exactly the book's MultiHeadAttention, in its weight layout.
    """

    def __init__(self, emb_dim: int, n_heads: int, dropout: float = 0.0, qkv_bias: bool = False, *,
                 n_kv_heads: int | None = None, rotary: nn.Module | None = None,
                 qk_norm: Callable[[int], nn.Module] | None = None,
                 alibi_slopes: torch.Tensor | None = None, window: int | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if emb_dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"emb_dim {emb_dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not divide")
        self.emb_dim = emb_dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = emb_dim // n_heads
        self.dropout = dropout
        # Same creation order as the book's MultiHeadAttention: a seed gives the same weights.
        self._build_projections(emb_dim, n_kv_heads * self.head_dim, qkv_bias)
        self.out_proj = mark_residual_projection(nn.Linear(emb_dim, emb_dim))
        self.q_norm = qk_norm(self.head_dim) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm else None
        self.rotary = rotary
        self.window = window
        # Derived from n_heads, not learned: kept out of the state dict.
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)

    def _build_projections(self, emb_dim: int, kv_dim: int, bias: bool) -> None:
        self.W_query = nn.Linear(emb_dim, emb_dim, bias=bias)
        self.W_key = nn.Linear(emb_dim, kv_dim, bias=bias)
        self.W_value = nn.Linear(emb_dim, kv_dim, bias=bias)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.W_query(x), self.W_key(x), self.W_value(x)

    def _attend(self, q, k, v, past: int, return_weights: bool):
        return causal_attention(q, k, v, past, dropout_p=self.dropout if self.training else 0.0,
                                window=self.window, alibi_slopes=self.alibi_slopes, return_weights=return_weights)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, return_weights: bool = False):
        b, t, _ = x.shape  # (B, T, C)
        q, k, v = self._project(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = 0 if kv_cache is None else kv_cache.length  # absolute position of x[:, 0]
        if self.rotary is not None:
            q, k = self.rotary(q, past), self.rotary(k, past)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # the cache holds H_kv heads: GQA's memory saving
        out = self._attend(q, k, v, past, return_weights)
        out, weights = out if return_weights else (out, None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.emb_dim))
        return (out, weights) if return_weights else out
