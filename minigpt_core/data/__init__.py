"""Data: sources (the ``dataset`` registry kind), token shards, the train/validation split, batches.

The data layer. May import model, spec and base.
"""

from __future__ import annotations

from .corpus import Split, TokenCorpus, split_corpus, split_parts, split_segments, window_starts
from .pipeline import TrainingData, build_source, document_split, load_tokens, load_training_data, sample_length
from .sampler import BatchSampler
from .shards import SHARD_META, ShardSet, document_tokens, is_shard_dir, open_shards, token_dtype, write_shards
from .sources import DataContext, DataError, TextSource, TokenSource, default_cache_dir

__all__ = [
    "DataContext",
    "DataError",
    "TextSource",
    "TokenSource",
    "default_cache_dir",
    "SHARD_META",
    "ShardSet",
    "token_dtype",
    "document_tokens",
    "write_shards",
    "open_shards",
    "is_shard_dir",
    "TokenCorpus",
    "Split",
    "split_segments",
    "window_starts",
    "split_corpus",
    "split_parts",
    "BatchSampler",
    "TrainingData",
    "build_source",
    "document_split",
    "load_tokens",
    "load_training_data",
    "sample_length",
]
