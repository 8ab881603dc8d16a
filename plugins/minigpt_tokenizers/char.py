"""Character-level tokenizer for tiny ablations: one id per distinct character of the training text."""

from __future__ import annotations

import json
from typing import Any, Sequence

from minigpt_core.plugin import TokenizerContext, TokenizerError

__all__ = ["CharTokenizer", "char_tokenizer"]


class CharTokenizer:
    """Ids are positions in the sorted character vocabulary; there is no end-of-text token."""

    name = "char"
    eot_id = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise TokenizerError("A char tokenizer vocabulary must not repeat characters.")
        self.chars = chars
        self.n_vocab = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._ids.keys())
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise TokenizerError(
                f"The char tokenizer's vocabulary ({self.n_vocab} characters, learnt from the training "
                f"text) has no id for {len(unknown)} character(s) in this text: {shown}. Build the "
                f"vocabulary from text that contains them, or use a byte-level tokenizer such as gpt2."
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "params": {}, "chars": self.chars}

    def hf_files(self, context_length: int) -> dict[str, bytes]:
        """A Hugging Face ``tokenizer.json`` with these ids: every character its own token (an
        empty-pattern split), decoded by concatenation; AutoTokenizer loads it."""
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
            "post_processor": None, "decoder": {"type": "Fuse"},
            # No unknown token, like this tokenizer: a character outside the vocabulary is an error.
            "model": {"type": "WordLevel", "vocab": dict(self._ids), "unk_token": "<unk>"},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length}
        return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode("utf-8"),
                "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8")}

    def __repr__(self) -> str:
        return f"CharTokenizer(n_vocab={self.n_vocab})"


def char_tokenizer(ctx: TokenizerContext, params: Any) -> CharTokenizer:
    if ctx.state is not None:
        chars = ctx.state.get("chars")
        if not isinstance(chars, str):
            raise TokenizerError("A saved char tokenizer state needs its vocabulary as a string under 'chars'.")
        return CharTokenizer(chars)
    if not ctx.training_text:
        raise TokenizerError(
            "The char tokenizer learns its vocabulary from the training text, and none was given. "
            "Pass training_text= to build_tokenizer, or rebuild it from a saved state with "
            "tokenizer_from_state."
        )
    return CharTokenizer.from_text(ctx.training_text)
