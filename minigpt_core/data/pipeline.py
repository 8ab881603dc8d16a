"""From a spec's ``data`` section to training and validation windows.

A text source is tokenized once with the run's tokenizer and cached as shards under
``data.cache_dir/tokens/<key>``, the key hashing the source's fingerprint and the tokenizer's
state; a token source (``shards``) is used as it is, after checking it was written with the
tokenizer the spec names.

With ``data.split = "documents"`` whole documents are assigned to validation before anything is
tokenized (:func:`document_split`); a tokenizer that learns from the text (char, bpe) learns from
the training documents only, and each side is cached as its own shards, the key naming the split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..base.errors import SpecError
from ..spec import ExperimentSpec
from ..model.tokenizers import Tokenizer, TokenizerError, build_tokenizer, tokenizer_from_state
from .corpus import Split, TokenCorpus, split_corpus, split_parts
from .shards import FORMAT_VERSION, ShardSet, is_shard_dir, open_shards, write_shards
from .sources import DataContext, DataError, TextSource, TokenSource, default_cache_dir

__all__ = ["TrainingData", "build_source", "document_split", "text_tokenizer", "load_tokens", "load_training_data",
           "sample_length"]


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    shards: ShardSet
    split: Split
    source: str  # what the data is, for the log
    val_shards: ShardSet | None = None  # split = "documents": the validation documents (shards: the training ones)


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


def text_tokenizer(spec: ExperimentSpec, source: TextSource, state: dict[str, Any] | None = None, *,
                   documents: Iterable[str] | None = None) -> Tokenizer:
    """The spec's tokenizer (or the saved one), learning its vocabulary from ``documents`` (default all
    of the source's) if it must."""
    if state is not None:
        return tokenizer_from_state(state, spec.registry)
    try:
        return build_tokenizer(spec)
    except TokenizerError:
        # Tokenizers that learn a vocabulary (char) refuse to build without the training text;
        # documents are joined as the shards join them. Any other error recurs below.
        docs = source.documents() if documents is None else documents
        return build_tokenizer(spec, training_text="\n\n".join(docs))


def _cache_key(fingerprint: str, tokenizer: Tokenizer, split: dict[str, Any] | None = None) -> str:
    key: dict[str, Any] = {"source": fingerprint, "tokenizer": tokenizer.state(), "format": FORMAT_VERSION}
    if split is not None:  # absent for split = "blocks": the keys of existing caches stay as they were
        key["split"] = split
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _document_hash(doc: str, seed: int) -> int:
    data = seed.to_bytes(4, "little") + doc.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def document_split(documents: Iterable[str], val_fraction: float, seed: int) -> list[bool]:
    """For each document in order, whether it is validation.

    Documents are ranked by a hash of (seed, text) and the lowest round(val_fraction x N) are
    validation (at least one, and at least one left for training). Hashing the text, not the
    position, puts identical documents on the same side: a copy of a validation document is never
    trained on. Documents that tie with the last one chosen go to validation too.
    """
    hashes = [_document_hash(doc, seed) for doc in documents]
    n = len(hashes)
    if n < 2:
        raise DataError(
            f"data.split = \"documents\" holds out whole documents, but the source has {n} document(s); "
            f"it needs at least 2. Use a source with more documents, or set data.split = \"blocks\"."
        )
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    threshold = sorted(hashes)[n_val - 1]
    is_val = [h <= threshold for h in hashes]
    if all(is_val):
        raise DataError(
            f"All {n} documents of the source are identical, so data.split = \"documents\" cannot leave any "
            f"for training; set data.split = \"blocks\"."
        )
    return is_val


def _side(source: TextSource, is_val: list[bool], val: bool) -> Iterator[str]:
    """The source's documents of one side of the split, in order."""
    n = 0
    for i, doc in enumerate(source.documents()):
        n = i + 1
        if i < len(is_val) and is_val[i] == val:
            yield doc
    if n != len(is_val):
        raise DataError(
            f"The data source {source.describe()} yielded {len(is_val)} documents, then {n}: its documents "
            f"must be the same on every pass for data.split = \"documents\"."
        )


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
        _write_cache(source.documents(), tokenizer, path, spec, source, progress,
                     {"fingerprint": source.fingerprint()})
    if barrier:
        barrier()
    return tokenizer, open_shards(path), source.describe()


def _write_cache(documents: Iterable[str], tokenizer: Tokenizer, path: Path, spec: ExperimentSpec,
                 source: TextSource, progress: bool, extra_meta: dict[str, Any]) -> None:
    try:
        write_shards(documents, tokenizer, path, workers=spec.data.workers, progress=progress,
                     source=source.describe(), extra_meta=extra_meta)
    except (DataError, OSError):
        if not is_shard_dir(path):  # another run wrote the same cache entry meanwhile: use it
            raise


def _load_document_split(spec: ExperimentSpec, *, tokenizer_state: dict[str, Any] | None, progress: bool,
                         writer: bool, barrier: Callable[[], None] | None
                         ) -> tuple[Tokenizer, ShardSet, ShardSet, str]:
    """(tokenizer, training shards, validation shards, description) for split = "documents"."""
    source = build_source(spec)
    if isinstance(source, TokenSource):
        raise DataError(
            f"data.split = \"documents\" holds out whole documents before tokenizing, but the source "
            f"{source.describe()} is already tokenized (it has no documents to choose from). Set "
            f"data.split = \"blocks\", or name the text source itself."
        )
    d = spec.data
    is_val = document_split(source.documents(), d.val_fraction, d.split_seed)
    tokenizer = text_tokenizer(spec, source, tokenizer_state, documents=_side(source, is_val, False))
    fingerprint = source.fingerprint()
    shards = []
    for side, val in (("train", False), ("val", True)):
        split = {"mode": "documents", "seed": d.split_seed, "val_fraction": d.val_fraction, "side": side}
        path = cache_dir(spec) / "tokens" / _cache_key(fingerprint, tokenizer, split)
        if writer and not is_shard_dir(path):
            try:
                _write_cache(_side(source, is_val, val), tokenizer, path, spec, source, progress,
                             {"fingerprint": fingerprint, "split": split})
            except TokenizerError as exc:
                # char: a character that only the validation documents hold has no id.
                raise DataError(
                    f"The {'validation' if val else 'training'} documents of {source.describe()} cannot be tokenized with the "
                    f"{tokenizer.name} tokenizer learnt from the training documents (data.split = "
                    f"\"documents\"): {exc} Use a byte-level tokenizer (bpe, gpt2), or data.split = \"blocks\"."
                ) from None
        shards.append(path)
    if barrier:
        barrier()
    train, val = open_shards(shards[0]), open_shards(shards[1])
    n_val = sum(is_val)
    share = val.n_tokens / max(1, train.n_tokens + val.n_tokens)
    desc = (f"{source.describe()} (validation: {n_val:,} of {len(is_val):,} whole documents, {share:.1%} of "
            f"the tokens)")
    return tokenizer, train, val, desc


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
    val_shards = None
    if spec.data.split == "documents":
        tokenizer, shards, val_shards, desc = _load_document_split(
            spec, tokenizer_state=tokenizer_state, progress=progress, writer=writer, barrier=barrier)
    else:
        tokenizer, shards, desc = load_tokens(spec, tokenizer_state=tokenizer_state, progress=progress,
                                              writer=writer, barrier=barrier)
    if tokenizer.n_vocab > spec.model.vocab_size:
        raise SpecError([("model.vocab_size", f"{spec.model.vocab_size} is smaller than the {tokenizer.name} "
                          f"tokenizer's {tokenizer.n_vocab} token ids; set it to at least {tokenizer.n_vocab}")])
    _check_token_ids(shards, spec.model.vocab_size)
    stride = spec.data.stride or max_length
    if val_shards is not None:
        return TrainingData(tokenizer, shards, split_parts(shards.parts, val_shards.parts, max_length, stride),
                            desc, val_shards)
    split = split_corpus(TokenCorpus(shards.parts), max_length, stride, spec.data.split_block,
                         spec.data.val_fraction)
    return TrainingData(tokenizer, shards, split, desc)
