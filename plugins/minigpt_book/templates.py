"""Prompt templates for instruction tuning (chapter 7): the book's Alpaca format, and the Phi-3
chat format of its exercise 7.1."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AlpacaTemplate", "Phi3Template", "AlpacaParams", "ALPACA_PREAMBLE"]

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


class AlpacaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preamble: str = Field(ALPACA_PREAMBLE, description="the sentence before '### Instruction:' (the book's)")


class AlpacaTemplate:
    """The book's ``format_input``: preamble, ``### Instruction:``, ``### Input:`` when there is one;
    the training text adds ``### Response:`` and the output."""

    def __init__(self, preamble: str = ALPACA_PREAMBLE):
        self.preamble = preamble

    def prompt(self, instruction: str, input: str) -> str:
        text = f"{self.preamble}\n\n### Instruction:\n{instruction}"
        return text + (f"\n\n### Input:\n{input}" if input else "")

    def text(self, prompt: str, output: str) -> str:
        return f"{prompt}\n\n### Response:\n{output}"


class Phi3Template:
    """The Phi-3 chat layout of the book's exercise 7.1: ``<|user|>``, the instruction (and input),
    ``<|assistant|>``, the output."""

    def prompt(self, instruction: str, input: str) -> str:
        return f"<|user|>\n{instruction}" + (f"\n{input}" if input else "")

    def text(self, prompt: str, output: str) -> str:
        return f"{prompt}\n<|assistant|>\n{output}"
