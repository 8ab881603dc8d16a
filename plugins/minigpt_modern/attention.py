"""Position schemes that live inside attention: rotary embeddings (RoPE) and ALiBi slopes.

The attention itself is the core's ``SDPAttention`` (from ``minigpt_core.plugin``); these are
the options it is given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["rotary_dims", "RotaryEmbedding", "alibi_slopes"]


def rotary_dims(head_dim: int, fraction: float) -> int:
    """How many features of each head RoPE rotates (the rest pass through, GPT-NeoX's partial rotary)."""
    return int(head_dim * fraction)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer): rotate feature pairs by angles proportional to position.

    Pairs feature i with i + rot_dim/2 ("rotate half", as GPT-NeoX and Llama). A query at
    position m and a key at n rotated this way have a dot product that depends on m - n only.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        self.rot_dim = rotary_dims(head_dim, fraction)
        if self.rot_dim < 2 or self.rot_dim % 2:
            raise ValueError(f"RoPE needs an even number (>= 2) of rotary dims, got {self.rot_dim}")
        inv_freq = base ** (-torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / self.rot_dim)
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq  # (T_max, rot/2)
        # Tables, not parameters: derived from the config, so kept out of the state dict.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # x: (B, H, T, D) at absolute positions offset .. offset + T - 1
        t = x.shape[-2]
        cos = self.cos[offset:offset + t].to(x.dtype)  # (T, rot/2)
        sin = self.sin[offset:offset + t].to(x.dtype)
        rot, rest = x[..., :self.rot_dim], x[..., self.rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the paper takes the slopes of the nearest lower
    power of two and fills up with every other slope of the next power of two.
    """
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_heads - p)]
    return torch.tensor(slopes)
