"""Token shards: flat little-endian uint16 (or uint32) token files plus a ``meta.json``.

    OUT/tokens_00000.bin   raw token ids, as nanoGPT and llm.c store them (no header)
    OUT/tokens_00001.bin   ...
    OUT/meta.json          dtype, tokens per shard, the tokenizer's state, the source

Shards are opened with ``np.memmap``, so a corpus much larger than memory trains at full speed.
Documents are tokenized in parallel worker processes, in order, and each is followed by the
end-of-text token (or a blank line for tokenizers without one). The whole directory is written
under a temporary name and renamed into place, so an interrupted ``prepare`` leaves nothing
that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..base.reading import SPEC_LIMIT, read_text_bounded
from ..model.tokenizers import tokenizer_from_state
from .sources import DataError

__all__ = [
    "SHARD_META",
    "FORMAT_VERSION",
    "ShardSet",
    "token_dtype",
    "document_tokens",
    "write_shards",
    "open_shards",
    "is_shard_dir",
]

SHARD_META = "meta.json"
FORMAT_VERSION = 1
_CHUNK_CHARS = 1 << 20  # text per tokenization task: big enough to amortise the inter-process copy


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<u4")


@dataclass
class ShardSet:
    """Opened shards: one read-only memory map per file."""

    directory: Path
    parts: list[np.ndarray]
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def tokenizer_state(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    def tokens(self) -> np.ndarray:
        """All tokens in one in-memory array (for small corpora and tests)."""
        return np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else np.zeros(0, np.uint16)


# -- tokenization (runs in worker processes) --------------------------------------------------
_worker_tokenizer = None


def _init_worker(tokenizer_state: dict[str, Any]) -> None:
    global _worker_tokenizer

    _worker_tokenizer = tokenizer_from_state(tokenizer_state)


def document_tokens(tokenizer, docs: Sequence[str]) -> np.ndarray:
    """Token ids of ``docs``, each followed by the end-of-text token (or a blank line)."""
    sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n\n")
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc)
        ids += sep
    return np.asarray(ids, dtype=token_dtype(tokenizer.n_vocab))


def _encode_chunk(docs: list[str]) -> np.ndarray:
    return document_tokens(_worker_tokenizer, docs)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in documents:
        if not isinstance(doc, str):
            raise DataError(f"A text data source yielded a {type(doc).__name__}, not a str document.")
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(documents: Iterable[str], tokenizer, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, documents) per chunk, in document order; at most 2 x workers chunks in flight."""
    if workers <= 1:
        for chunk in _chunks(documents):
            yield document_tokens(tokenizer, chunk), len(chunk)
        return
    # fork is cheap and needs no re-import; elsewhere spawn rebuilds the tokenizer from its state.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker, initargs=(tokenizer.state(),)) as pool:
        pending: deque[tuple[Future, int]] = deque()
        for chunk in _chunks(documents):
            pending.append((pool.submit(_encode_chunk, chunk), len(chunk)))
            if len(pending) >= 2 * workers:
                fut, n = pending.popleft()
                yield fut.result(), n
        while pending:
            fut, n = pending.popleft()
            yield fut.result(), n


# -- writing -------------------------------------------------------------------------------
def _shard_name(i: int) -> str:
    return f"tokens_{i:05d}.bin"


def write_shards(documents: Iterable[str], tokenizer, out_dir: str | Path, *, shard_tokens: int = 1 << 28,
                 workers: int = 0, progress: bool = True, source: str = "",
                 extra_meta: dict[str, Any] | None = None) -> ShardSet:
    """Tokenize ``documents`` into shards of at most ``shard_tokens`` tokens under ``out_dir``.

    ``workers`` processes tokenize in parallel (0: one per CPU). Refuses to overwrite a
    directory that already holds shards.
    """
    out_dir = Path(out_dir)
    if is_shard_dir(out_dir):
        raise DataError(f"{out_dir} already holds token shards; remove it or choose another output directory.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not empty; choose a new or empty output directory.")
    workers = workers or os.cpu_count() or 1
    dtype = token_dtype(tokenizer.n_vocab)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        counts: list[int] = []
        n_docs = 0
        current = None
        bar = _progress(progress, source)
        for tokens, n in _encoded_chunks(documents, tokenizer, workers):
            n_docs += n
            while len(tokens):
                if current is None or counts[-1] == shard_tokens:
                    if current is not None:
                        current.close()
                    current = open(tmp / _shard_name(len(counts)), "wb")
                    counts.append(0)
                take = tokens[: shard_tokens - counts[-1]]
                current.write(take.astype(dtype, copy=False).tobytes())
                counts[-1] += len(take)
                tokens = tokens[len(take):]
                bar.update(len(take))
        if current is not None:
            current.close()
        bar.close()
        if not counts:
            raise DataError(f"The data source {source or ''} yielded no text; there is nothing to train on.")
        meta = {
            "format": FORMAT_VERSION, "dtype": dtype.str, "shards": [_shard_name(i) for i in range(len(counts))],
            "tokens": counts, "documents": n_docs, "tokenizer": tokenizer.state(), "source": source,
            **(extra_meta or {}),
        }
        (tmp / SHARD_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_shards(out_dir)


def _progress(enabled: bool, source: str):
    from ..base.progress import progress_bar

    return progress_bar(desc=f"tokenizing {source}".strip(), unit=" tok", unit_scale=True, enabled=enabled,
                        leave=True, dynamic_ncols=False)


# -- reading -------------------------------------------------------------------------------
def is_shard_dir(path: str | Path) -> bool:
    return (Path(path) / SHARD_META).is_file()


def open_shards(directory: str | Path) -> ShardSet:
    """Memory-map the shards of ``directory``, checking each file against ``meta.json``."""
    directory = Path(directory)
    meta_path = directory / SHARD_META
    try:
        meta = json.loads(read_text_bounded(meta_path, "shard index", SPEC_LIMIT, DataError))
        dtype = np.dtype(meta["dtype"])
        names, counts, _ = meta["shards"], meta["tokens"], meta["tokenizer"]["name"]
    except FileNotFoundError:
        raise DataError(
            f"{directory} holds no token shards ({SHARD_META} is missing). Write them with "
            f"`minigpt prepare SOURCE {directory}`."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path} is unreadable or corrupt ({exc}); write the shards again with "
                        f"`minigpt prepare`.") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{directory} was written in shard format {meta.get('format')}, this minigpt reads "
                        f"format {FORMAT_VERSION}; write the shards again with `minigpt prepare`.")
    parts = []
    for name, count in zip(names, counts):
        path = directory / name
        size = path.stat().st_size if path.exists() else -1
        if size != count * dtype.itemsize:
            raise DataError(
                f"Shard {path} is {'missing' if size < 0 else f'{size} bytes'} but {SHARD_META} says it "
                f"holds {count} tokens ({count * dtype.itemsize} bytes): it is truncated or was replaced. "
                f"Write the shards again with `minigpt prepare`."
            )
        parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype))
    return ShardSet(directory, parts, meta)
