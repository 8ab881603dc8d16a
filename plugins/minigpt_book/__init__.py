"""minigpt plugin: the components of "Build a Large Language Model From Scratch".

Registered through the ``minigpt`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minigpt_core.plugin import hookimpl

from .attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)
from .layers import GELU, FeedForward, LayerNorm, LearnedPositionalEmbedding, TransformerBlock
from .templates import AlpacaParams, AlpacaTemplate, Phi3Template

__all__ = [
    "SelfAttention_v1",
    "SelfAttention_v2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "LearnedPositionalEmbedding",
    "TransformerBlock",
    "AlpacaTemplate",
    "Phi3Template",
    "minigpt_register",
]

_TEACHING = (
    "it is the book's single-head, non-causal teaching variant: every position attends to later "
    "tokens, so a model trained with it learns to copy the answer instead of predicting it. "
    "Use 'book.causal', 'book.multihead_wrapper' or 'book.multihead' instead"
)


class LayerNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-5, gt=0, description="added to the variance for numerical stability")


class FeedForwardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expansion: int = Field(4, gt=0, description="hidden width as a multiple of emb_dim")


class LearnedPositionalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_positions: int | None = Field(None, gt=0, description="rows of the table; default context_length")


def _check_positions(model, params: LearnedPositionalParams) -> None:
    if params.max_positions is not None and params.max_positions < model.context_length:
        raise ValueError(
            f"max_positions ({params.max_positions}) is smaller than context_length "
            f"({model.context_length}); positions beyond the table would have no embedding"
        )


@hookimpl
def minigpt_register(registry):
    attn_caps = {"causal", "kv_cache", "attn_weights"}
    registry.add(
        "attention", "book.self_attention_v1",
        lambda ctx, p: SelfAttention_v1(ctx.emb_dim, ctx.emb_dim),
        description="SelfAttention_v1 (ch. 3): raw weight matrices, single head, not causal; for teaching",
        not_for_lm=_TEACHING,
        expected_failures={"causality": "not causal by design", "kv_cache": "no cache: not causal"},
    )
    registry.add(
        "attention", "book.self_attention_v2",
        lambda ctx, p: SelfAttention_v2(ctx.emb_dim, ctx.emb_dim, ctx.qkv_bias),
        description="SelfAttention_v2 (ch. 3): nn.Linear projections, single head, not causal; for teaching",
        not_for_lm=_TEACHING,
        expected_failures={"causality": "not causal by design", "kv_cache": "no cache: not causal"},
    )
    registry.add(
        "attention", "book.causal",
        lambda ctx, p: CausalAttention(ctx.emb_dim, ctx.emb_dim, ctx.context_length, ctx.drop_rate, ctx.qkv_bias),
        description="CausalAttention (ch. 3): one full-width head with a causal mask and attention dropout",
        capabilities=attn_caps,
    )
    registry.add(
        "attention", "book.multihead_wrapper",
        lambda ctx, p: MultiHeadAttentionWrapper(
            ctx.emb_dim, ctx.head_dim, ctx.context_length, ctx.drop_rate, ctx.n_heads, ctx.qkv_bias),
        description="MultiHeadAttentionWrapper (ch. 3): n_heads CausalAttention heads concatenated, no output projection",
        capabilities=attn_caps | {"multihead"},
    )
    registry.add(
        "attention", "book.multihead",
        lambda ctx, p: MultiHeadAttention(
            ctx.emb_dim, ctx.emb_dim, ctx.context_length, ctx.drop_rate, ctx.n_heads, ctx.qkv_bias),
        description="MultiHeadAttention (ch. 3): split q/k/v projections into heads, causal mask, output projection",
        capabilities=attn_caps | {"multihead", "gpt2"},
    )
    registry.add(
        "norm", "book.layernorm", lambda ctx, p: LayerNorm(ctx.emb_dim, p.eps), params=LayerNormParams,
        description="LayerNorm (ch. 4): biased variance, eps 1e-5, learned scale and shift",
        capabilities={"gpt2"},
    )
    registry.add(
        "activation", "book.gelu", lambda ctx, p: GELU(),
        description="GELU with the tanh approximation GPT-2 uses (ch. 4)", capabilities={"gpt2"},
    )
    registry.add(
        "feedforward", "book.feedforward",
        lambda ctx, p: FeedForward(ctx.emb_dim, p.expansion * ctx.emb_dim, ctx.build("activation")),
        params=FeedForwardParams,
        description="FeedForward (ch. 4): Linear(C, 4C) -> activation -> Linear(4C, C)",
        capabilities={"gpt2"},
    )
    registry.add(
        "positional", "book.learned",
        lambda ctx, p: LearnedPositionalEmbedding(p.max_positions or ctx.context_length, ctx.emb_dim),
        params=LearnedPositionalParams, check=_check_positions,
        description="learned absolute positional embeddings, one vector per position (ch. 2)",
        capabilities={"gpt2", "absolute"},
    )
    registry.add(
        "block", "book.pre_norm", lambda ctx, p: TransformerBlock(ctx),
        description="TransformerBlock (ch. 4): pre-norm, x + drop(att(norm1(x))), x + drop(ff(norm2(x)))",
        capabilities={"gpt2"},
    )
    registry.add(
        "init", "book.pytorch_default", lambda ctx, p: (lambda model: None),
        description="keep PyTorch's default initialisation, as the book's GPTModel does",
    )
    registry.add(
        "template", "book.alpaca", lambda ctx, p: AlpacaTemplate(p.preamble), params=AlpacaParams,
        description="the book's Alpaca prompt (ch. 7): preamble, ### Instruction:, ### Input:, ### Response:",
    )
    registry.add(
        "template", "book.phi3", lambda ctx, p: Phi3Template(),
        description="the Phi-3 chat layout of the book's exercise 7.1: <|user|> ... <|assistant|> ...",
    )
