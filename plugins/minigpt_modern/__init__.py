"""minigpt plugin: components from the models after GPT-2, registered as ``modern.*``.

Attention variants are the core's ``SDPAttention`` (from ``minigpt_core.plugin``) with different
options (grouped-query heads, RoPE, ALiBi, a sliding window, QK-norm), so they share one tested core.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from minigpt_core.plugin import FeedForward, SDPAttention, hookimpl

from .attention import RotaryEmbedding, alibi_slopes, rotary_dims
from .layers import (
    DyT,
    GatedFeedForward,
    MoEFeedForward,
    ParallelBlock,
    PostNormBlock,
    RMSNorm,
    SinusoidalPositionalEmbedding,
    SquaredReLU,
    glu_hidden_dim,
)

__all__ = [
    "RotaryEmbedding",
    "alibi_slopes",
    "rotary_dims",
    "RMSNorm",
    "DyT",
    "SquaredReLU",
    "glu_hidden_dim",
    "GatedFeedForward",
    "MoEFeedForward",
    "SinusoidalPositionalEmbedding",
    "PostNormBlock",
    "ParallelBlock",
    "minigpt_register",
]

ATTENTION_CAPS = {"causal", "kv_cache", "attn_weights", "multihead"}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- attention params: every variant takes qk_norm; all but MQA take n_kv_heads --------------
class MQAParams(_Params):
    qk_norm: bool = Field(False, description="RMS-normalise queries and keys per head before the dot product")


class AttentionParams(MQAParams):
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (None: n_heads); fewer is grouped-query")


class GQAParams(AttentionParams):
    n_kv_heads: int = Field(2, gt=0, description="key/value heads, each shared by n_heads / n_kv_heads query heads")


class RoPEParams(AttentionParams):
    base: float = Field(10000.0, gt=1, description="wavelength base of the rotation frequencies")
    fraction: float = Field(1.0, gt=0, le=1, description="share of each head's features that is rotated")


class WindowParams(AttentionParams):
    window: int = Field(256, gt=0, description="each token attends to itself and the window - 1 before it")


def _check_attention(model, p: MQAParams) -> None:
    n_kv = getattr(p, "n_kv_heads", 1) or model.n_heads
    if model.n_heads % n_kv:
        raise ValueError(
            f"n_heads ({model.n_heads}) must be divisible by n_kv_heads ({n_kv}) so every key/value head "
            f"serves the same number of query heads; choose n_kv_heads among the divisors of n_heads"
        )
    if isinstance(p, RoPEParams):
        rot = rotary_dims(model.head_dim, p.fraction)
        if rot < 2 or rot % 2:
            raise ValueError(
                f"RoPE rotates pairs of features, but head_dim ({model.head_dim} = emb_dim / n_heads) x fraction "
                f"({p.fraction}) gives {rot} rotary dims; it must be even and at least 2 (change emb_dim, "
                f"n_heads or fraction)"
            )


def _attention(ctx, p: MQAParams, *, n_kv_heads: int | None = None, alibi: bool = False) -> SDPAttention:
    rotary = None
    if isinstance(p, RoPEParams):
        rotary = RotaryEmbedding(ctx.head_dim, ctx.context_length, p.base, p.fraction)
    return SDPAttention(
        ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias,
        n_kv_heads=n_kv_heads or getattr(p, "n_kv_heads", None), rotary=rotary,
        qk_norm=RMSNorm if p.qk_norm else None,
        alibi_slopes=alibi_slopes(ctx.n_heads) if alibi else None, window=getattr(p, "window", None),
    )


# -- other params ---------------------------------------------------------------------------
class RMSNormParams(_Params):
    eps: float = Field(1e-6, gt=0, description="added to the mean square for numerical stability")


class DyTParams(_Params):
    alpha_init: float = Field(0.5, gt=0, description="initial value of the learned input scale alpha")


class GLUParams(_Params):
    hidden_dim: int | None = Field(None, gt=0, description="hidden width (None: the 4x MLP's parameter count)")
    bias: bool = Field(False, description="bias terms in the three projections")


class MoEParams(_Params):
    n_experts: int = Field(4, ge=2, description="expert feed-forwards per layer")
    top_k: int = Field(2, ge=1, description="experts each token is routed to")
    expert_hidden_dim: int | None = Field(None, gt=0, description="hidden width of each expert MLP (None: 4 emb_dim)")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss added to training")


class SinusoidalParams(_Params):
    base: float = Field(10000.0, gt=1, description="wavelength base of the sin/cos frequencies")


def _check_moe(model, p: MoEParams) -> None:
    if p.top_k > p.n_experts:
        raise ValueError(f"top_k ({p.top_k}) cannot exceed n_experts ({p.n_experts}): each token picks "
                         f"top_k distinct experts")


def _glu(activation: type[nn.Module]):
    return lambda ctx, p: GatedFeedForward(
        ctx.emb_dim, p.hidden_dim or glu_hidden_dim(ctx.emb_dim, p.bias), activation(), p.bias)


def _moe(ctx, p: MoEParams) -> MoEFeedForward:
    hidden = p.expert_hidden_dim or 4 * ctx.emb_dim
    return MoEFeedForward(ctx.emb_dim, p.n_experts, p.top_k,
                          lambda: FeedForward(ctx.emb_dim, hidden, ctx.build("activation")), p.aux_loss_weight)


@hookimpl
def minigpt_register(registry):
    def attention(name, factory, params, description, extra=()):
        registry.add("attention", name, factory, params=params, check=_check_attention,
                     description=description, capabilities=ATTENTION_CAPS | set(extra))

    attention("modern.gqa", _attention, GQAParams,
              "grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads shared by groups of "
              "query heads; a smaller KV cache")
    attention("modern.mqa", lambda ctx, p: _attention(ctx, p, n_kv_heads=1), MQAParams,
              "multi-query attention (Shazeer 2019): one key/value head shared by all query heads")
    attention("modern.rope", _attention, RoPEParams,
              "attention with rotary position embeddings (RoFormer) on queries and keys; pair with "
              "positional 'modern.none'", extra={"positions"})
    attention("modern.alibi", lambda ctx, p: _attention(ctx, p, alibi=True), AttentionParams,
              "ALiBi (Press et al. 2022): a per-head linear penalty on query-key distance instead of position "
              "embeddings; pair with positional 'modern.none'", extra={"positions"})
    attention("modern.sliding_window", _attention, WindowParams,
              "local causal attention (Longformer / Mistral): each token sees the last `window` positions")

    registry.add("norm", "modern.rmsnorm", lambda ctx, p: RMSNorm(ctx.emb_dim, p.eps), params=RMSNormParams,
                 description="RMSNorm: x / rms(x) * weight, no centring and no shift (Llama, T5)")
    registry.add("norm", "modern.dyt", lambda ctx, p: DyT(ctx.emb_dim, p.alpha_init), params=DyTParams,
                 description="Dynamic Tanh (Transformers without Normalization, 2025): weight * tanh(alpha x) + bias")

    registry.add("activation", "modern.relu2", lambda ctx, p: SquaredReLU(),
                 description="squared ReLU, relu(x)^2 (Primer)")

    registry.add("feedforward", "modern.swiglu", _glu(nn.SiLU), params=GLUParams,
                 description="SwiGLU: down(silu(gate(x)) * up(x)); its gate is SiLU whatever the activation slot "
                             "says; hidden width defaults to the 4x MLP's parameter count")
    registry.add("feedforward", "modern.geglu", _glu(nn.GELU), params=GLUParams,
                 description="GEGLU: down(gelu(gate(x)) * up(x)) with exact GELU; hidden width defaults to the "
                             "4x MLP's parameter count")
    registry.add("feedforward", "modern.moe", _moe, params=MoEParams, check=_check_moe,
                 description="mixture of experts: top-k routing to n_experts MLPs (using the activation slot), "
                             "with Switch Transformer's load-balancing loss as the model's aux loss")

    registry.add("positional", "modern.sinusoidal",
                 lambda ctx, p: SinusoidalPositionalEmbedding(ctx.context_length, ctx.emb_dim, p.base),
                 params=SinusoidalParams, capabilities={"absolute"},
                 description="fixed sinusoidal absolute positions (the original Transformer); no parameters")
    registry.add("positional", "modern.none", lambda ctx, p: None,
                 description="no absolute positions: for RoPE or ALiBi attention (or NoPE, causal masking alone)")

    registry.add("block", "modern.post_norm", lambda ctx, p: PostNormBlock(ctx),
                 description="post-norm (the original Transformer): norm(x + att(x)), then norm(x + ff(x))")
    registry.add("block", "modern.parallel", lambda ctx, p: ParallelBlock(ctx),
                 description="parallel attention and feed-forward (GPT-J): x + att(norm(x)) + ff(norm(x)), one norm")
