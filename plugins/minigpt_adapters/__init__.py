"""minigpt plugin: fine-tuning adapters (the ``adapter`` kind).

``book.lora`` is the book's LoRA (appendix E), written here for parity; ``peft.lora`` is Hugging
Face PEFT's LoRA injected into the GPT module (standard alpha / rank scaling). Both wrap the
``nn.Linear`` layers their ``targets`` patterns name and merge into the base weights.
"""

from __future__ import annotations

import importlib.util

from pydantic import Field

from minigpt_core.plugin import Params, hookimpl

__all__ = ["LoraParams", "minigpt_register"]


class LoraParams(Params):
    targets: list[str] = Field(
        default_factory=lambda: ["trf_blocks.*"], min_length=1,
        description="shell-style patterns over module names; every nn.Linear they match is adapted, e.g. "
                    "\"trf_blocks.*.att.*\" (attention projections), \"trf_blocks.*.ff.*\" (feed-forward), "
                    "\"out_head\" (an untied head)")
    rank: int = Field(16, gt=0, description="rank r of the update A @ B")
    alpha: float = Field(16.0, gt=0, description="scale of the update")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")


def _book_lora(ctx, params):
    from .lora import BookLora

    return BookLora(params)


def _peft_lora(ctx, params):
    from .peft_lora import PeftLora

    return PeftLora(params)


def _peft_dora(ctx, params):
    from .peft_lora import PeftLora

    return PeftLora(params, dora=True)


@hookimpl
def minigpt_register(registry):
    registry.add("adapter", "book.lora", _book_lora, params=LoraParams,
                 description="the book's LoRA (appendix E): W x + alpha * (x @ A @ B), A Kaiming-uniform, B zeros, "
                             "no alpha/rank scaling")
    if importlib.util.find_spec("peft") is None:  # not imported here: peft pulls in transformers (seconds)
        for name in ("peft.lora", "peft.dora"):
            registry.unavailable("adapter", name, "needs Hugging Face PEFT: pip install 'minigpt[peft]'")
    else:
        registry.add("adapter", "peft.lora", _peft_lora, params=LoraParams,
                     description="Hugging Face PEFT's LoRA injected into the model: W x + (alpha / rank) * B(A(x))")
        registry.add("adapter", "peft.dora", _peft_dora, params=LoraParams,
                     description="Hugging Face PEFT's DoRA: LoRA's direction update plus a learned magnitude per "
                                 "output feature")
