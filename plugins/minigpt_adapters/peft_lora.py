"""Hugging Face PEFT's LoRA, injected into a minigpt GPT (PEFT wraps any nn.Module by module name).

``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a ``peft`` LoRA layer (the
original under ``base_layer``, the update under ``lora_A`` / ``lora_B``) with the standard
scaling ``lora_alpha / r``; merging and unloading use PEFT's own ``merge`` / ``unmerge`` /
``get_base_layer``.
"""

from __future__ import annotations

from torch import nn

from minigpt_core.plugin import mark_trainable

from .lora import lora_targets

ADAPTER_NAME = "default"

# What importing peft logs on a CPU machine, through other libraries' loggers: torchao (which peft
# imports) "Failed to load .../_C_mxfp8...so" for each GPU-only extension, and torch two _pytree
# lines on torchao's enums. Known noise, printed on every peft.lora run: only these loggers, only
# during the import, drop below errors.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def _import_peft():
    import logging

    logs = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return peft


class PeftLora:
    def __init__(self, params, dora: bool = False):
        self.params = params
        self.dora = dora  # DoRA: also a learned magnitude per output feature

    def _targets(self, model: nn.Module) -> list[str]:
        return lora_targets(model, self.params.targets)

    def parameter_count(self, model: nn.Module) -> int:
        r = self.params.rank
        return sum(r * (m.in_features + m.out_features) + (m.out_features if self.dora else 0)
                   for m in map(model.get_submodule, self._targets(model)))

    def apply(self, model: nn.Module) -> list[str]:
        peft = _import_peft()
        LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

        names = self._targets(model)
        p = self.params
        config = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=names,
                            bias="none", use_dora=self.dora)
        # PEFT freezes everything but the adapter; [finetune] trainable decides that afterwards.
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        for layer in self._layers(model):
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                mark_trainable(getattr(layer, part))
        return names

    @staticmethod
    def _layers(model: nn.Module):
        _import_peft()
        from peft.tuners.lora import LoraLayer

        return [m for m in model.modules() if isinstance(m, LoraLayer)]

    def merge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            if not layer.merged:
                layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for layer in self._layers(model):
            if layer.merged:
                layer.unmerge()

    def unload(self, model: nn.Module) -> None:
        self.merge(model)
        layers = {id(m) for m in self._layers(model)}
        for name, module in list(model.named_modules()):
            if id(module) in layers:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
