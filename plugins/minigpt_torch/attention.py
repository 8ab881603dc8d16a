"""Causal attention on PyTorch's fused kernels.

The core's :func:`~minigpt_core.plugin.causal_attention` does the attention proper for every
variant here and in ``minigpt_modern``; :class:`~minigpt_core.plugin.SDPAttention` wraps it with
projections, grouped-query heads, optional QK-norm and rotary embeddings (both live in the core,
:mod:`minigpt_core.model.layers`, because other plugins build on them; re-exported here).
:class:`FusedQKVAttention` and :class:`FlexAttention` change only how it projects or which
kernel it calls. :class:`TorchMultiheadAttention` runs ``torch.nn.MultiheadAttention`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_core.plugin import LayerKVCache, SDPAttention, attention_bias, causal_attention, mark_residual_projection

__all__ = [
    "attention_bias",
    "causal_attention",
    "SDPAttention",
    "FusedQKVAttention",
    "TorchMultiheadAttention",
    "FlexAttention",
    "flex_unavailable_reason",
]


class FusedQKVAttention(SDPAttention):
    """SDPAttention with one (C, C + 2 kv_dim) projection for queries, keys and values (nanoGPT's c_attn)."""

    def _build_projections(self, emb_dim: int, kv_dim: int, bias: bool) -> None:
        self._split = [emb_dim, kv_dim, kv_dim]
        self.c_attn = nn.Linear(emb_dim, emb_dim + 2 * kv_dim, bias=bias)

    def _project(self, x):
        return self.c_attn(x).split(self._split, dim=-1)

    # Canonical layout (minigpt_core.model.interop): c_attn's rows are W_query, W_key, W_value stacked.
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
