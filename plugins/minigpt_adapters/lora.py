"""The book's LoRA (appendix E): ``alpha * (x @ A @ B)`` added to a linear layer's output.

Unlike the LoRA paper and PEFT there is no alpha / rank scaling, and A is a (in, rank) tensor
drawn with ``kaiming_uniform_(a=sqrt(5))`` (its fan-in is the rank). PEFT's ``lora_alpha =
alpha * rank`` reproduces the scaling but not that initialisation, so this one is our own.

The update lives in a child module ``lora`` of the wrapped ``nn.Linear``, added by a forward
hook: the base layer keeps its place and its state-dict keys (``...W_query.weight``), and the
adapter's are ``...W_query.lora.A`` / ``.B``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt_core.plugin import mark_trainable, match_modules


class LoRALayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as the book (and nn.Linear) does
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.dropout(x) @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update as an nn.Linear weight (out, in)."""
        return (self.alpha * (self.A @ self.B)).T


def _add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    lora = module.lora
    return output if lora.merged else output + lora(args[0]).to(output.dtype)


def lora_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The nn.Linear modules ``patterns`` name; a head tied to the embedding is refused (merging would
    change the embedding too)."""
    names = match_modules(model, patterns, where="targets")
    head = getattr(model, "out_head", None)
    if "out_head" in names and head is not None and head.weight is model.tok_emb.weight:
        raise ValueError("the output head is tied to the token embedding (model.tie_weights), so adapting it "
                         "would change the embedding too when merged; leave \"out_head\" out of targets")
    return names


class BookLora:
    def __init__(self, params):
        self.params = params

    def _targets(self, model: nn.Module) -> list[str]:
        return lora_targets(model, self.params.targets)

    def parameter_count(self, model: nn.Module) -> int:
        r = self.params.rank
        return sum(r * (m.in_features + m.out_features) for m in map(model.get_submodule, self._targets(model)))

    def apply(self, model: nn.Module) -> list[str]:
        names = self._targets(model)
        p = self.params
        for name in names:
            linear = model.get_submodule(name)
            w = linear.weight
            lora = LoRALayer(linear.in_features, linear.out_features, p.rank, p.alpha, p.dropout)
            linear.lora = mark_trainable(lora.to(device=w.device, dtype=w.dtype))
            linear.register_forward_hook(_add_lora)
        return names

    @staticmethod
    def _layers(model: nn.Module):
        return [m for m in model.modules() if isinstance(getattr(m, "lora", None), LoRALayer)]

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        for m in self._layers(model):
            if not m.lora.merged:
                m.weight += m.lora.delta_weight().to(m.weight.dtype)
                m.lora.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        for m in self._layers(model):
            if m.lora.merged:
                m.weight -= m.lora.delta_weight().to(m.weight.dtype)
                m.lora.merged = False

    def unload(self, model: nn.Module) -> None:
        self.merge(model)
        for m in self._layers(model):
            for key, hook in list(m._forward_hooks.items()):
                if hook is _add_lora:
                    del m._forward_hooks[key]
            del m.lora
