"""Parameter accounting and a training-FLOPs estimate for an assembled GPT."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .gpt import GPT

__all__ = ["ParameterSummary", "summarize", "count_parameters"]


def count_parameters(module: nn.Module | None) -> int:
    # parameters() yields each tensor once, so tied weights count once.
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass
class ParameterSummary:
    rows: list[tuple[str, str, int, int]] = field(default_factory=list)  # (part, component, each, copies)
    total: int = 0
    output_head: int = 0  # 0 when tied to the token embedding
    tied: bool = False
    flops_per_token: int = 0
    trainable: int = 0  # parameters with requires_grad
    fine_tuning: bool = False  # a fine-tuning spec: report the trainable count too

    @property
    def without_output_head(self) -> int:
        return self.total - self.output_head

    def format(self) -> str:
        lines = [f"{'part':<22} {'component':<26} {'params':>14} {'x':>4} {'total':>14}"]
        for part, comp, each, n in self.rows:
            lines.append(f"{part:<22} {comp:<26} {each:>14,} {n:>4} {each * n:>14,}")
        lines.append("-" * 84)
        lines.append(f"{'total parameters':<49} {self.total:>35,}")
        if self.tied:
            lines.append(f"{'output head':<49} {'tied to tok_emb':>35}")
        else:
            lines.append(f"{'without output head':<49} {self.without_output_head:>35,}")
        if self.fine_tuning or self.trainable != self.total:
            lines.append(f"{'trainable parameters':<49} {self.trainable:>35,}")
        lines.append(f"{'training FLOPs/token':<49} {self.flops_per_token:>35,}")
        lines.append("  (6 x matmul params + 12 x n_layers x context_length x emb_dim: "
                     "forward+backward at full context)")
        return "\n".join(lines)


def summarize(model: GPT) -> ParameterSummary:
    """Per-component counts of a built model (build it on the meta device to skip allocation)."""
    s = model.spec
    first = model.trf_blocks[0]
    rows = [("token embedding", "nn.Embedding", count_parameters(model.tok_emb), 1)]
    if model.pos_emb is not None:
        rows.append(("positional", s.positional.name, count_parameters(model.pos_emb), 1))
    parts = {"attention": ("att", s.attention.name), "feedforward": ("ff", s.feedforward.name)}
    accounted = 0
    for part, (attr, comp) in parts.items():
        n = count_parameters(getattr(first, attr, None))
        if n:
            rows.append((part, comp, n, s.n_layers))
            accounted += n
    norms = sum(count_parameters(getattr(first, a, None)) for a in ("norm1", "norm2"))
    if norms:
        rows.append(("block norms", s.norm.name, norms, s.n_layers))
        accounted += norms
    if count_parameters(first) > accounted:  # a layout with parts of its own (e.g. extra gates)
        rows.append(("other block params", s.block.name, count_parameters(first) - accounted, s.n_layers))
    rows.append(("final norm", s.norm.name, count_parameters(model.final_norm), 1))
    tied = model.out_head.weight is model.tok_emb.weight
    head = 0 if tied else count_parameters(model.out_head)
    if not tied:
        rows.append(("output head", "nn.Linear", head, 1))
    total = count_parameters(model)
    # Embedding lookups cost no FLOPs; the head's matmul does, tied or not.
    matmul_params = total - count_parameters(model.tok_emb) - count_parameters(model.pos_emb)
    matmul_params += s.vocab_size * s.emb_dim if tied else 0
    flops = 6 * matmul_params + 12 * s.n_layers * s.context_length * s.emb_dim
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterSummary(rows, total, head, tied, flops, trainable)


