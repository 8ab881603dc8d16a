"""From a spec's ``data`` section to training and validation windows.

A text source is tokenized once with the run's tokenizer and cached as shards under
``data.cache_dir/tokens/<key>``, the key hashing the source's fingerprint and the tokenizer's
state; a token source (``shards``) is used as it is, after checking it was written with the
tokenizer the spec names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..base.errors import SpecError
from ..spec import ExperimentSpec
from ..model.tokenizers import Tokenizer, TokenizerError, build_tokenizer, tokenizer_from_state
from .corpus import Split, TokenCorpus, split_corpus
from .shards import FORMAT_VERSION, ShardSet, is_shard_dir, open_shards, write_shards
from .sources import DataContext, DataError, TextSource, TokenSource, default_cache_dir

__all__ = ["TrainingData", "build_source", "text_tokenizer", "load_tokens", "load_training_data",
           "sample_length"]


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    shards: ShardSet
    split: Split
    source: str  # what the data is, for the log


def cache_dir(spec: ExperimentSpec) -> Path:
    return Path(spec.data.cache_dir).expanduser() if spec.data.cache_dir else default_cache_dir()


def build_source(spec: ExperimentSpec) -> TextSource | TokenSource:
    slot = spec.components["data.source"]
    source = slot.build(DataContext(cache_dir(spec)))
    if not isinstance(source, (TextSource, TokenSource)):
        raise DataError(
            f"The dataset '{slot.entry.name}' (from {slot.entry.source}) returned a "
            f"{type(source).__name__}; dataset factories must return a TextSource or a TokenSource."
        )
    return source


def text_tokenizer(spec: ExperimentSpec, source: TextSource, state: dict[str, Any] | None = None) -> Tokenizer:
    """The spec's tokenizer (or the saved one), learning its vocabulary from the source if it must."""
    if state is not None:
        return tokenizer_from_state(state, spec.registry)
    try:
        return build_tokenizer(spec)
    except TokenizerError:
        # Tokenizers that learn a vocabulary (char) refuse to build without the training text;
        # documents are joined as the shards join them. Any other error recurs below.
        return build_tokenizer(spec, training_text="\n\n".join(source.documents()))


def _cache_key(fingerprint: str, tokenizer: Tokenizer) -> str:
    blob = json.dumps({"source": fingerprint, "tokenizer": tokenizer.state(), "format": FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _check_token_source(spec: ExperimentSpec, shards: ShardSet) -> None:
    saved = shards.tokenizer_state
    wanted = spec.components["tokenizer"]
    wanted_params = wanted.params.model_dump(exclude_none=True)
    if saved.get("name") != wanted.entry.name or {k: v for k, v in (saved.get("params") or {}).items()
                                                 if v is not None} != wanted_params:
        raise DataError(
            f"The shards in {shards.directory} were written with the {saved.get('name')} tokenizer "
            f"(params {saved.get('params') or {}}), but the spec names {wanted.entry.name} (params "
            f"{wanted_params}). Token ids of different tokenizers mean different things: set "
            f"tokenizer.name = \"{saved.get('name')}\" or write new shards with that tokenizer."
        )


def load_tokens(spec: ExperimentSpec, *,
                tokenizer_state: dict[str, Any] | None = None, progress: bool = True, writer: bool = True,
                barrier: Callable[[], None] | None = None) -> tuple[Tokenizer, ShardSet, str]:
    """(tokenizer, shards, description) for the spec's data source, tokenizing into the cache if needed.

    In a multi-process run only the ``writer`` process tokenizes; the others wait at ``barrier``.
    """
    source = build_source(spec)
    if isinstance(source, TokenSource):
        shards = source.open()
        if tokenizer_state is None:
            _check_token_source(spec, shards)
        tokenizer = tokenizer_from_state(tokenizer_state or shards.tokenizer_state, spec.registry)
        if barrier:
            barrier()
        return tokenizer, shards, source.describe()
    tokenizer = text_tokenizer(spec, source, tokenizer_state)
    path = cache_dir(spec) / "tokens" / _cache_key(source.fingerprint(), tokenizer)
    if writer and not is_shard_dir(path):
        try:
            write_shards(source.documents(), tokenizer, path, workers=spec.data.workers, progress=progress,
                         source=source.describe(), extra_meta={"fingerprint": source.fingerprint()})
        except (DataError, OSError):
            if not is_shard_dir(path):  # another run wrote the same cache entry meanwhile: use it
                raise
    if barrier:
        barrier()
    return tokenizer, open_shards(path), source.describe()


def sample_length(spec: ExperimentSpec) -> int:
    """Tokens per training sample: data.max_length, at most the model's context."""
    max_length = spec.data.max_length or spec.model.context_length
    if max_length > spec.model.context_length:
        raise SpecError([("data.max_length", f"{max_length} exceeds model.context_length "
                          f"({spec.model.context_length}); the model cannot attend over longer samples")])
    return max_length


def _check_token_ids(shards: ShardSet, vocab_size: int) -> None:
    """Ids at or above the vocabulary would index past the embedding at the first forward pass."""
    if "fingerprint" in shards.meta:  # our own cache of a text source: written by the checked tokenizer
        return
    for part in shards.parts:
        if len(part) == 0 or np.iinfo(part.dtype).max < vocab_size:  # this dtype cannot hold a bad id
            continue
        top = int(part.max())
        if top >= vocab_size:
            raise DataError(
                f"The token shards in {shards.directory} hold id {top}, but model.vocab_size is {vocab_size}, "
                f"so ids run from 0 to {vocab_size - 1}. The shards were written with another tokenizer or "
                f"are corrupt: set model.vocab_size to at least {top + 1}, or write the shards again with "
                f"`minigpt prepare` and this spec's tokenizer."
            )


def load_training_data(spec: ExperimentSpec, *,
                       tokenizer_state: dict[str, Any] | None = None, progress: bool = True,
                       writer: bool = True, barrier: Callable[[], None] | None = None) -> TrainingData:
    max_length = sample_length(spec)
    tokenizer, shards, desc = load_tokens(spec, tokenizer_state=tokenizer_state, progress=progress,
                                          writer=writer, barrier=barrier)
    if tokenizer.n_vocab > spec.model.vocab_size:
        raise SpecError([("model.vocab_size", f"{spec.model.vocab_size} is smaller than the {tokenizer.name} "
                          f"tokenizer's {tokenizer.n_vocab} token ids; set it to at least {tokenizer.n_vocab}")])
    _check_token_ids(shards, spec.model.vocab_size)
    split = split_corpus(TokenCorpus(shards.parts), max_length, spec.data.stride or max_length,
                         spec.data.split_block, spec.data.val_fraction)
    return TrainingData(tokenizer, shards, split, desc)
