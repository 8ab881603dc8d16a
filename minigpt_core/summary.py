"""Parameter accounting and a training-FLOPs estimate for an assembled GPT."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .model import GPT

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


def summarize_spec(spec) -> ParameterSummary:
    """Build on the meta device (no memory, no init cost) and count."""
    from .model import build_model

    if getattr(spec, "task", "lm") != "lm":
        return _summarize_task_spec(spec)
    with torch.device("meta"):
        return summarize(build_model(spec, seed=None))


def _summarize_task_spec(spec) -> ParameterSummary:
    """A fine-tuning spec: the init_from model's shape, with the task's head (classes read from the data
    file when the spec does not declare them)."""
    from .pretrained import init_from_model
    from .tasks import build_task_model

    spec = spec.model_copy(deep=True)
    if spec.init_from is not None:
        spec.model = init_from_model(spec)
    with_task_classes(spec)
    with torch.device("meta"):
        model = build_task_model(spec, seed=None)
        out = summarize(model)
        from .finetune import apply_finetune, finetune_active

        if finetune_active(spec):  # the trainable line: what [finetune] leaves trainable of these parameters
            counted = {id(p) for p in model.parameters()}
            apply_finetune(model, spec)
            out.trainable = sum(p.numel() for p in model.parameters() if id(p) in counted and p.requires_grad)
    out.fine_tuning = True
    return out


def with_task_classes(spec) -> None:
    """Fill in a classification spec's classes from its data when it does not declare them (in place):
    the head's size depends on them."""
    cs = getattr(spec, "classification", None)
    if getattr(spec, "task", "lm") == "classification" and cs is not None and cs.classes is None:
        from .tasks.classification import read_examples, resolve_classes

        cs.classes = resolve_classes(cs, [label for _, label in read_examples(cs)], cs.path or cs.hf_dataset)
