"""``bpe``: a byte-level BPE learnt from the training text with Hugging Face ``tokenizers``.

GPT-2's 50,257 ids make the embedding and output head most of a small model; a vocabulary of a
few thousand merges learnt from the run's own text keeps them small while a token still covers
several characters. Byte-level means every string encodes (no unknown token) and decodes back
to itself.

Ids: 0 is ``<|endoftext|>``, 1-256 the single bytes, then one id per merge in the order learnt.
Training is deterministic: the same text and params give the same ``tokenizer.json`` (the merges
are chosen by count, ties broken by the pair, whatever the thread count). The whole
``tokenizer.json`` is the tokenizer's state, so it is saved in every checkpoint's meta.json
(hashed with the checkpoint, like the char tokenizer's vocabulary) with its own sha256, and
``sample``/``eval`` rebuild it from there with no file and no network.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

from minigpt_core.plugin import TokenizerContext, TokenizerError

__all__ = ["ENDOFTEXT", "TrainedBPE", "trained_bpe", "train_bpe_json"]

ENDOFTEXT = "<|endoftext|>"
_CHUNK_CHARS = 1 << 16  # training text per item handed to the trainer: lets it count in parallel


def _lines_in_chunks(text: str) -> Iterator[str]:
    # Cut only after a newline, at fixed places in the text, so the counts (and the merges) are the
    # same on every run; the byte-level pre-tokenizer splits there anyway, bar runs of whitespace.
    start = 0
    while start < len(text):
        cut = text.find("\n", start + _CHUNK_CHARS)
        end = len(text) if cut < 0 else cut + 1
        yield text[start:end]
        start = end


def train_bpe_json(text: str, vocab_size: int, min_frequency: int) -> str:
    """The ``tokenizer.json`` of a byte-level BPE with at most ``vocab_size`` ids learnt from ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[ENDOFTEXT],
        # All 256 bytes, even those the text lacks: any later text still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_lines_in_chunks(text), trainer=trainer, length=None)
    return tok.to_str()


class TrainedBPE:
    """A Hugging Face byte-level BPE ``Tokenizer`` behind the minigpt Tokenizer protocol."""

    name = "bpe"

    def __init__(self, tokenizer_json: str, params: dict[str, Any]):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(f"The saved bpe tokenizer's tokenizer.json cannot be loaded: {exc}") from None
        spec = json.loads(tokenizer_json)
        kinds = ((spec.get("model") or {}).get("type"), (spec.get("pre_tokenizer") or {}).get("type"),
                 (spec.get("decoder") or {}).get("type"), spec.get("normalizer"))
        if kinds != ("BPE", "ByteLevel", "ByteLevel", None):
            raise TokenizerError(
                f"The saved bpe tokenizer is not a byte-level BPE (model, pre-tokenizer, decoder, "
                f"normalizer: {kinds}); only byte-level BPEs decode every text back to itself."
            )
        self.tokenizer_json = tokenizer_json
        self.params = params
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = self.tokenizer.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "tokenizer_json": self.tokenizer_json,
                "sha256": hashlib.sha256(self.tokenizer_json.encode("utf-8")).hexdigest()}

    def hf_files(self, context_length: int) -> dict[str, bytes]:
        """The tokenizer.json itself: AutoTokenizer loads it as a PreTrainedTokenizerFast."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
                  "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "clean_up_tokenization_spaces": False}
        return {"tokenizer.json": self.tokenizer_json.encode("utf-8"),
                "tokenizer_config.json": json.dumps(config, indent=2).encode("utf-8")}

    def __repr__(self) -> str:
        return f"TrainedBPE(n_vocab={self.n_vocab})"


def trained_bpe(ctx: TokenizerContext, params: Any) -> TrainedBPE:
    p = params.model_dump()
    if ctx.state is not None:
        text, sha = ctx.state.get("tokenizer_json"), ctx.state.get("sha256")
        if not isinstance(text, str) or not isinstance(sha, str):
            raise TokenizerError("A saved bpe tokenizer state needs its tokenizer.json as a string under "
                                 "'tokenizer_json' and that string's sha256 under 'sha256'.")
        actual = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if actual != sha:
            raise TokenizerError(
                f"The saved bpe tokenizer is corrupt: its tokenizer.json has sha256 {actual[:16]}..., the "
                f"state recorded {sha[:16]}.... Token ids would not mean what the model learnt; restore "
                f"the checkpoint's meta.json from a good copy."
            )
        return TrainedBPE(text, p)
    if not ctx.training_text:
        raise TokenizerError(
            "The bpe tokenizer learns its merges from the training text, and none was given. Pass "
            "training_text= to build_tokenizer, or rebuild it from a saved state with tokenizer_from_state."
        )
    return TrainedBPE(train_bpe_json(ctx.training_text, p["vocab_size"], p["min_frequency"]), p)
