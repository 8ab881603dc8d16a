"""GPT-2's initialisation (as in OpenAI's release and nanoGPT's description of it)."""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt_core.plugin import is_residual_projection


@torch.no_grad()
def gpt2_normal_init(model: nn.Module, std: float = 0.02, n_layers: int | None = None) -> None:
    """Linear and Embedding weights ~ N(0, std), biases 0; norms keep their ones/zeros.

    With ``n_layers``, layers tagged by ``mark_residual_projection`` get std / sqrt(2 * n_layers):
    each block adds two branches to the residual stream, and this keeps its variance flat in depth.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            s = std
            if n_layers and is_residual_projection(module):
                s = std / math.sqrt(2 * n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
