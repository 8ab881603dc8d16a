"""Causal attention on PyTorch's fused kernels.

One core, :func:`causal_attention`, does the attention proper for every variant here and in
``minigpt_modern``: it calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU, the fused CPU kernel otherwise) and builds an explicit mask only when it must: a sliding
window, ALiBi, or several new queries after a KV-cache prefix (``is_causal`` aligns the triangle
to the top-left corner, which is wrong once keys precede the queries).

:class:`SDPAttention` wraps it with projections, grouped-query heads, optional QK-norm and
rotary embeddings; :class:`FusedQKVAttention` and :class:`FlexAttention` change only how it
projects or which kernel it calls. :class:`TorchMultiheadAttention` runs
``torch.nn.MultiheadAttention`` itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_core.model import LayerKVCache, mark_residual_projection

__all__ = [
    "attention_bias",
    "causal_attention",
    "SDPAttention",
    "FusedQKVAttention",
    "TorchMultiheadAttention",
    "FlexAttention",
    "flex_unavailable_reason",
]


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
    if plain and not return_weights and (past == 0 or t_q == 1):
        # A fresh sequence is causal from the top-left corner; one new query sees every cached key.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=past == 0 and t_q > 1)
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


class FusedQKVAttention(SDPAttention):
    """SDPAttention with one (C, C + 2 kv_dim) projection for queries, keys and values (nanoGPT's c_attn)."""

    def _build_projections(self, emb_dim: int, kv_dim: int, bias: bool) -> None:
        self._split = [emb_dim, kv_dim, kv_dim]
        self.c_attn = nn.Linear(emb_dim, emb_dim + 2 * kv_dim, bias=bias)

    def _project(self, x):
        return self.c_attn(x).split(self._split, dim=-1)

    # Canonical layout (minigpt_core.interop): c_attn's rows are W_query, W_key, W_value stacked.
    def canonical_state(self) -> dict[str, torch.Tensor]:
        state = {f"out_proj.{n}": p.detach() for n, p in self.out_proj.named_parameters()}
        for part in ("weight", "bias"):
            fused = getattr(self.c_attn, part)
            if fused is not None:
                for name, piece in zip(("W_query", "W_key", "W_value"), fused.detach().split(self._split)):
                    state[f"{name}.{part}"] = piece
        return state

    @torch.no_grad()
    def load_canonical_state(self, state: dict[str, torch.Tensor]) -> None:
        for part in ("weight", "bias"):
            fused = getattr(self.c_attn, part)
            if fused is not None:
                fused.copy_(torch.cat([state[f"{n}.{part}"] for n in ("W_query", "W_key", "W_value")]))
        self.out_proj.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("out_proj.")})


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with a causal mask (its fused fast path at inference).

    Incremental decoding projects the new tokens with the module's own weights, caches keys
    and values, and attends with :func:`causal_attention`, the math nn.MultiheadAttention does.
    """

    def __init__(self, emb_dim: int, n_heads: int, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = emb_dim // n_heads
        self.mha = nn.MultiheadAttention(emb_dim, n_heads, dropout=dropout, bias=True, batch_first=True)
        if not qkv_bias:  # GPT-2 has an output bias but no q/k/v biases; `bias=` sets both
            self.mha.register_parameter("in_proj_bias", None)
        mark_residual_projection(self.mha.out_proj)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None, return_weights: bool = False):
        b, t, c = x.shape
        if kv_cache is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
            out, weights = self.mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=return_weights,
                                    average_attn_weights=False)
            return (out, weights) if return_weights else out
        past = kv_cache.length
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        k, v = kv_cache.append(k, v)
        drop = self.mha.dropout if self.training else 0.0
        out = causal_attention(q, k, v, past, dropout_p=drop, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        out = self.mha.out_proj(out.transpose(1, 2).reshape(b, t, c))
        return (out, weights) if return_weights else out

    # Canonical layout: in_proj_weight is W_query, W_key, W_value stacked; out_proj is as is.
    def canonical_state(self) -> dict[str, torch.Tensor]:
        state = {f"out_proj.{n}": p.detach() for n, p in self.mha.out_proj.named_parameters()}
        for part in ("weight", "bias"):
            fused = getattr(self.mha, f"in_proj_{part}")
            if fused is not None:
                for name, piece in zip(("W_query", "W_key", "W_value"), fused.detach().chunk(3)):
                    state[f"{name}.{part}"] = piece
        return state

    @torch.no_grad()
    def load_canonical_state(self, state: dict[str, torch.Tensor]) -> None:
        for part in ("weight", "bias"):
            fused = getattr(self.mha, f"in_proj_{part}")
            if fused is not None:
                fused.copy_(torch.cat([state[f"{n}.{part}"] for n in ("W_query", "W_key", "W_value")]))
        self.mha.out_proj.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("out_proj.")})


def flex_unavailable_reason() -> str | None:
    """Why FlexAttention cannot be offered here, or None when it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (added in torch 2.5)"
    if not torch.cuda.is_available():
        # torch raises NotImplementedError for backward on CPU, so it could not train a model here.
        return (f"FlexAttention in torch {torch.__version__} has no backward pass on CPU and no CUDA "
                f"device is available, so a model using it could not train here")
    return None


class FlexAttention(SDPAttention):
    """SDPAttention whose kernel is ``flex_attention`` with a causal (optionally windowed) block mask.

    The kernel is compiled once per process for full sequences (uncompiled, flex_attention
    materialises the score matrix); KV-cache decoding steps and heads narrower than 16 run it
    uncompiled. It has no attention dropout: drop_rate still applies to embeddings and residuals.
    """

    _compiled = None

    def __init__(self, *args, compile: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile = compile
        self._masks: dict[tuple, object] = {}  # fresh-sequence block masks by (T, device)

    def _block_mask(self, t_q: int, t_k: int, past: int, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if past and t_q == 1 and self.window is None:
            return None  # one new query sees every cached key
        window = self.window

        def visible(b, h, q_idx, kv_idx):
            dist = q_idx + past - kv_idx
            return (dist >= 0) if window is None else (dist >= 0) & (dist < window)

        if past:  # decoding offsets change every step: not worth keeping
            return create_block_mask(visible, None, None, t_q, t_k, device=device)
        key = (t_q, str(device))
        if key not in self._masks:
            self._masks[key] = create_block_mask(visible, None, None, t_q, t_k, device=device)
        return self._masks[key]

    def _kernel(self, past: int):
        from torch.nn.attention.flex_attention import flex_attention

        # Compiled kernels need head_dim >= 16, and a compiled graph is specialised to the key
        # length, so decoding (which grows it every step) would recompile: it runs eagerly.
        if not self.compile or self.head_dim < 16 or past:
            return flex_attention
        if FlexAttention._compiled is None:
            FlexAttention._compiled = torch.compile(flex_attention, dynamic=False)
        return FlexAttention._compiled

    def _attend(self, q, k, v, past: int, return_weights: bool):
        if return_weights:  # flex_attention returns no weights: take the reference path
            return super()._attend(q, k, v, past, return_weights)
        mask = self._block_mask(q.shape[2], k.shape[2], past, q.device)
        return self._kernel(past)(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
