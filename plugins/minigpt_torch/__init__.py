"""minigpt plugin: PyTorch's own building blocks, registered as ``torch.*``.

Attention on ``scaled_dot_product_attention`` (separate or fused QKV projections),
``nn.MultiheadAttention`` and FlexAttention; ``nn.LayerNorm``; exact and tanh-approximate GELU, SiLU and ReLU.
``torch.sdpa``, ``torch.layernorm`` and ``torch.gelu_tanh`` compute GPT-2's function with fused kernels:
the ``gpt2-*`` presets and ``minigpt import-hf`` use them (``book-gpt2-*`` keeps the book's classes).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from minigpt_core.plugin import hookimpl

from .attention import (
    FlexAttention,
    FusedQKVAttention,
    SDPAttention,
    TorchMultiheadAttention,
    attention_bias,
    causal_attention,
    flex_unavailable_reason,
)

__all__ = [
    "attention_bias",
    "causal_attention",
    "SDPAttention",
    "FusedQKVAttention",
    "TorchMultiheadAttention",
    "FlexAttention",
    "minigpt_register",
]

ATTENTION_CAPS = {"causal", "kv_cache", "attn_weights", "multihead"}


class LayerNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-5, gt=0, description="added to the variance for numerical stability")
    bias: bool = Field(True, description="learn an additive shift (False: scale only)")


class FlexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int | None = Field(None, gt=0, description="attend to at most this many latest positions (None: all)")
    compile: bool = Field(True, description="torch.compile the kernel (uncompiled it materialises the scores)")


def _sdpa(cls):
    return lambda ctx, p: cls(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias)


@hookimpl
def minigpt_register(registry):
    registry.add(
        "attention", "torch.sdpa", _sdpa(SDPAttention),
        description="multi-head causal attention on F.scaled_dot_product_attention (flash / memory-efficient "
                    "kernels on GPU, fused kernel on CPU); the book's MultiHeadAttention layout and math",
        capabilities=ATTENTION_CAPS | {"gpt2"},
    )
    registry.add(
        "attention", "torch.fused_qkv", _sdpa(FusedQKVAttention),
        description="torch.sdpa with one fused (C, 3C) query/key/value projection (nanoGPT's c_attn)",
        capabilities=ATTENTION_CAPS | {"gpt2"},
    )
    registry.add(
        "attention", "torch.mha",
        lambda ctx, p: TorchMultiheadAttention(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias),
        description="torch.nn.MultiheadAttention with a causal mask (batch_first; its fused fast path at inference)",
        capabilities=ATTENTION_CAPS | {"gpt2"},
    )
    reason = flex_unavailable_reason()
    if reason:
        registry.unavailable("attention", "torch.flex", reason)
    else:
        registry.add(
            "attention", "torch.flex",
            lambda ctx, p: FlexAttention(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias,
                                         window=p.window, compile=p.compile),
            params=FlexParams,
            description="FlexAttention (torch.nn.attention.flex_attention) with a causal, optionally windowed "
                        "block mask; no attention dropout",
            capabilities=ATTENTION_CAPS | {"gpt2"},
        )
    registry.add(
        "norm", "torch.layernorm",
        lambda ctx, p: nn.LayerNorm(ctx.emb_dim, eps=p.eps, bias=p.bias), params=LayerNormParams,
        description="torch.nn.LayerNorm over the embedding (fused kernel; same math as book.layernorm)",
        capabilities={"gpt2"},  # exports as GPT-2's ln_* (weight/bias are the book's scale/shift)
    )
    registry.add("activation", "torch.gelu", lambda ctx, p: nn.GELU(),
                 description="exact GELU, x * Phi(x) (torch.nn.GELU; book.gelu is the tanh approximation)")
    registry.add("activation", "torch.gelu_tanh", lambda ctx, p: nn.GELU(approximate="tanh"),
                 description="GELU with GPT-2's tanh approximation in one fused kernel (nn.GELU(approximate="
                             "'tanh')); the same function as book.gelu",
                 capabilities={"gpt2"})
    registry.add("activation", "torch.silu", lambda ctx, p: nn.SiLU(),
                 description="SiLU / swish, x * sigmoid(x) (torch.nn.SiLU)")
    registry.add("activation", "torch.relu", lambda ctx, p: nn.ReLU(),
                 description="ReLU, max(x, 0) (torch.nn.ReLU)")
