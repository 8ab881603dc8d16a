"""Norms, activations, feed-forwards, positions and block layouts from after GPT-2."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_core.plugin import BuildContext, LayerKVCache, TransformerBlock, mark_residual_projection

__all__ = [
    "RMSNorm",
    "DyT",
    "SquaredReLU",
    "glu_hidden_dim",
    "GatedFeedForward",
    "MoEFeedForward",
    "SinusoidalPositionalEmbedding",
    "PostNormBlock",
    "ParallelBlock",
]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or shift (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the mean of squares loses too much in bf16
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"): weight * tanh(alpha x) + bias."""

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))  # one learned scalar per layer
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


class SquaredReLU(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def glu_hidden_dim(emb_dim: int, bias: bool = False) -> int:
    """Hidden width at which a gated feed-forward has the parameters of the book's 4x MLP.

    MLP: 2 * C * 4C weights + 4C + C biases. GLU: 3 * C * H weights (+ 2H + C biases).
    """
    mlp = 8 * emb_dim * emb_dim + 5 * emb_dim
    if bias:
        return round((mlp - emb_dim) / (3 * emb_dim + 2))
    return round(mlp / (3 * emb_dim))


class GatedFeedForward(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020): SwiGLU with SiLU, GEGLU with GELU."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: nn.Module, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(emb_dim, hidden_dim, bias=bias)
        self.up = nn.Linear(emb_dim, hidden_dim, bias=bias)
        self.down = mark_residual_projection(nn.Linear(hidden_dim, emb_dim, bias=bias))
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, H) -> (B, T, C)
        return self.down(self.act(self.gate(x)) * self.up(x))


class MoEFeedForward(nn.Module):
    """Mixture of experts: a router sends each token to its top-k experts and mixes their outputs.

    With top_k > 1 the chosen experts' router probabilities are renormalised to sum to one
    (Mixtral); with top_k = 1 the token's output is scaled by its probability (Switch), so the
    router still gets a gradient. Each forward sets ``aux_loss`` to the weighted load-balancing
    loss of Switch Transformer, E * sum_e f_e * P_e (f_e: share of routed slots that went to
    expert e, P_e: mean router probability of e), which is 1 when routing is uniform.
    """

    def __init__(self, emb_dim: int, n_experts: int, top_k: int, make_expert: Callable[[], nn.Module],
                 aux_loss_weight: float = 0.01):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.router = nn.Linear(emb_dim, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None  # GPT.aux_loss() collects it after each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        flat = x.reshape(b * t, c)  # (N, C)
        probs = torch.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        gate, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # No branch on how many tokens an expert got: an expert with none adds nothing, and
            # torch.compile can keep the count symbolic instead of breaking the graph on it.
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(flat[token]) * gate[token, slot, None].to(x.dtype))
        load = F.one_hot(chosen, self.n_experts).float().mean(dim=(0, 1))  # f_e, sums to 1
        self.aux_loss = self.aux_loss_weight * self.n_experts * (load * probs.mean(dim=0)).sum()
        return out.view(b, t, c)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos positions (Vaswani et al. 2017): PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i)."""

    def __init__(self, max_positions: int, emb_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, emb_dim, 2, dtype=torch.float64) / emb_dim)  # w_i
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq  # (T_max, ceil(C/2))
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :emb_dim]
        self.register_buffer("table", table.float(), persistent=False)  # not learned: no state

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]  # (T,) -> (T, C)


def _attend(att: nn.Module, x: torch.Tensor, kv_cache: LayerKVCache | None) -> torch.Tensor:
    # Attentions without a cache need not accept the keyword.
    return att(x) if kv_cache is None else att(x, kv_cache=kv_cache)


class PostNormBlock(TransformerBlock):
    """The original Transformer's layout: x = norm1(x + drop(att(x))), then norm2(x + drop(ff(x))).

    The book's block's parts, in its creation order; only where the norms sit differs.
    """

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop_shortcut(_attend(self.att, x, kv_cache)))
        return self.norm2(x + self.drop_shortcut(self.ff(x)))


class ParallelBlock(nn.Module):
    """GPT-J / PaLM layout: one norm, attention and feed-forward side by side on it.

    x + drop(att(h)) + drop(ff(h)) with h = norm1(x): one sequential step fewer per layer.
    """

    def __init__(self, ctx: BuildContext):
        super().__init__()
        self.att = ctx.build("attention")
        self.ff = ctx.build("feedforward")
        self.norm1 = ctx.build("norm")
        self.drop_shortcut = nn.Dropout(ctx.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        h = self.norm1(x)
        return x + self.drop_shortcut(_attend(self.att, h, kv_cache)) + self.drop_shortcut(self.ff(h))
