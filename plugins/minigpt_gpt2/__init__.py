"""minigpt plugin: what makes a model GPT-2 (OpenAI's initialisation scheme)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minigpt_core.plugin import hookimpl

from .hf import GPT2Weights
from .init import gpt2_normal_init

__all__ = ["GPT2InitParams", "GPT2Weights", "gpt2_normal_init", "minigpt_register"]


class GPT2InitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    std: float = Field(0.02, gt=0, description="standard deviation of weights and embeddings")
    scale_residual: bool = Field(True, description="divide residual projections' std by sqrt(2 * n_layers)")


@hookimpl
def minigpt_register(registry):
    registry.add(
        "init", "gpt2.normal",
        lambda ctx, p: (lambda model: gpt2_normal_init(model, p.std, ctx.n_layers if p.scale_residual else None)),
        params=GPT2InitParams,
        description="GPT-2's normal(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)",
    )
    registry.add(
        "weights", "gpt2.hf", lambda ctx, p: GPT2Weights(),
        description="Hugging Face GPT-2 checkpoints (GPT2LMHeadModel): import-hf, export-hf, init_from = \"hf:...\"",
    )
