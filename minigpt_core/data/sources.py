"""What a ``dataset`` registry entry provides: a source of documents or of ready-made tokens.

A dataset factory is called as ``factory(ctx, params)`` with a :class:`DataContext` and returns
either a :class:`TextSource` (documents, tokenized by the run's tokenizer and cached as shards)
or a :class:`TokenSource` (shards that are already tokenized, e.g. by ``minigpt prepare``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..base.errors import MinigptError

__all__ = ["DataError", "DataContext", "TextSource", "TokenSource", "default_cache_dir"]

CACHE_ENV_VAR = "MINIGPT_CACHE"


class DataError(MinigptError):
    """A data source cannot be read, or its tokens do not fit the run."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "minigpt")


@dataclass(frozen=True)
class DataContext:
    """What a dataset factory sees (instead of the model's BuildContext)."""

    cache_dir: Path  # sources may keep derived files (extracted text) here


class TextSource(ABC):
    """Documents of text; the run tokenizes them, joining documents with the end-of-text token."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the content (changes when it does): the key of the token cache."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """Documents in a fixed order (the order is part of the deterministic split)."""

    def describe(self) -> str:
        return type(self).__name__


class TokenSource(ABC):
    """Pre-tokenized shards, with the state of the tokenizer that wrote them."""

    @abstractmethod
    def open(self) -> Any:  # a data.shards.ShardSet (data.shards builds on this module)
        """The memory-mapped shards."""

    def describe(self) -> str:
        return type(self).__name__
