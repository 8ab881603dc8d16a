"""A token corpus cut into training and validation samples.

The corpus is one or more token arrays (memory-mapped shards). Each array is cut into blocks of
``split_block`` tokens, and a fixed, evenly spaced ``val_fraction`` of the blocks is validation:
block j is validation when floor((j + 1) f) > floor(j f). The split depends only on the token
count, so it is the same on every machine and every run. Runs of adjacent blocks form segments,
and samples are the book's sliding windows over each segment: ``max_length + 1`` tokens (inputs
and the targets shifted by one) starting every ``stride`` tokens; a window never crosses a
segment, so validation tokens are never trained on.

With ``data.split = "documents"`` the split is made before tokenizing instead (see
``pipeline.document_split``): the training and validation documents are tokenized into separate
arrays, and :func:`split_parts` takes the windows of each side from its own arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .sources import DataError

__all__ = ["TokenCorpus", "Split", "split_segments", "window_starts", "split_corpus", "split_parts"]


class TokenCorpus:
    """Token arrays addressed by one global offset (the concatenation of the parts)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # part i covers offsets[i]:offsets[i+1]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64 tokens; every window lies inside one part."""
        out = np.empty((len(starts), length), dtype=np.int64)
        part_idx = np.searchsorted(self.offsets, starts, side="right") - 1
        for row, (start, p) in enumerate(zip(starts.tolist(), part_idx.tolist())):
            local = start - int(self.offsets[p])
            out[row] = self.parts[p][local:local + length]
        return out


def split_segments(n_tokens: int, split_block: int, val_fraction: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, val) lists of [start, end) token ranges of one array."""
    n_blocks = math.ceil(n_tokens / split_block)
    train: list[tuple[int, int]] = []
    val: list[tuple[int, int]] = []
    for j in range(n_blocks):
        # +1e-9: (j + 1) * 0.1 must count as 1.0 at j = 9 despite rounding.
        is_val = math.floor((j + 1) * val_fraction + 1e-9) > math.floor(j * val_fraction + 1e-9)
        target = val if is_val else train
        start, end = j * split_block, min((j + 1) * split_block, n_tokens)
        if target and target[-1][1] == start:
            target[-1] = (target[-1][0], end)  # merge adjacent blocks of the same side
        else:
            target.append((start, end))
    return train, val


def window_starts(segments: list[tuple[int, int]], length: int, stride: int, base: int = 0) -> np.ndarray:
    """Starts of all windows of ``length`` tokens, every ``stride`` tokens, inside each segment."""
    starts = [np.arange(s, e - length + 1, stride, dtype=np.int64) for s, e in segments if e - s >= length]
    return base + (np.concatenate(starts) if starts else np.zeros(0, np.int64))


@dataclass
class Split:
    corpus: TokenCorpus
    train: np.ndarray  # global window starts
    val: np.ndarray
    length: int  # tokens per window: max_length + 1 (inputs plus the shifted targets)

    def describe(self) -> str:
        return (f"{self.corpus.n_tokens:,} tokens: {len(self.train):,} training and {len(self.val):,} "
                f"validation windows of {self.length - 1} tokens")


def split_corpus(corpus: TokenCorpus, max_length: int, stride: int, split_block: int,
                 val_fraction: float) -> Split:
    if split_block < max_length + 1:
        raise DataError(
            f"data.split_block ({split_block}) must be larger than the sample length ({max_length}), or "
            f"no validation block could hold a sample; raise data.split_block to at least {max_length + 1}."
        )
    length = max_length + 1
    train, val = [], []
    for i, part in enumerate(corpus.parts):
        tr, va = split_segments(len(part), split_block, val_fraction)
        base = int(corpus.offsets[i])
        train.append(window_starts(tr, length, stride, base))
        val.append(window_starts(va, length, stride, base))
    split = Split(corpus, np.concatenate(train), np.concatenate(val), length)
    if len(split.val) == 0 or len(split.train) == 0:
        which = "validation" if len(split.val) == 0 else "training"
        raise DataError(
            f"The corpus ({corpus.n_tokens:,} tokens) is too small to give any {which} samples of "
            f"{max_length} tokens with data.split_block={split_block} and data.val_fraction={val_fraction}. "
            f"Use more text, or lower data.split_block (at least {length}), data.max_length or "
            f"model.context_length."
        )
    return split


def split_parts(train_parts: Sequence[np.ndarray], val_parts: Sequence[np.ndarray], max_length: int,
                stride: int) -> Split:
    """Training windows from ``train_parts`` and validation windows from ``val_parts`` (one corpus)."""
    corpus = TokenCorpus(list(train_parts) + list(val_parts))
    length = max_length + 1
    segments = [(int(corpus.offsets[i]), int(corpus.offsets[i + 1])) for i in range(len(corpus.parts))]
    split = Split(corpus, window_starts(segments[:len(train_parts)], length, stride),
                  window_starts(segments[len(train_parts):], length, stride), length)
    if len(split.val) == 0 or len(split.train) == 0:
        which, parts = ("validation", val_parts) if len(split.val) == 0 else ("training", train_parts)
        raise DataError(
            f"The {which} documents ({sum(len(p) for p in parts):,} tokens) are too few for one {which} sample of {max_length} tokens (data.split = \"documents\"). "
            f"Use more text, raise data.val_fraction or change data.split_seed, lower data.max_length or "
            f"model.context_length, or set data.split = \"blocks\"."
        )
    return split
