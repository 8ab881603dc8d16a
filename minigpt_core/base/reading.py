"""Reading a whole file that a user (or a run record) names, with a bound on what is read.

Every file minigpt reads whole into memory goes through :func:`read_bytes_bounded` (or
:func:`read_text_bounded`). A path that names a device, a FIFO or a directory, or a file larger
than the limit for its kind, is one user error naming the file and what it is; before this,
``base = "/dev/zero"`` in an ablation file read until the kernel killed the process. The read
itself stops at ``limit + 1`` bytes, so a file that grows between the check and the read is
still bounded.

Limits, by kind (each is far above any legitimate file of that kind, far below what would
exhaust memory):

* ``SPEC_LIMIT`` (16 MiB): experiment and ablation files, plugin files, checkpoint and run
  records (``spec.toml``, ``meta.json``, ``trainer.json``, ``manifest.json``), Hugging Face
  ``config.json``. These are kilobytes; an ablation manifest of thousands of cells is about a
  megabyte.
* ``TOKENIZER_LIMIT`` (256 MiB): vocabulary files. GPT-2's are 1.5 MB; the largest
  ``tokenizer.json`` files in use (250k-token vocabularies) are tens of MB.
* ``DATA_LIMIT`` (1 GiB): fine-tuning data read whole (classification CSV/TSV/JSONL,
  instruction JSON). The book's sets are under 1 MB and Alpaca is 22 MB; a file this large is
  parsed into Python objects several times its size. Pre-training corpora are not read this way
  (text sources stream large files; token shards are memory-mapped).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from .errors import MinigptError

__all__ = ["SPEC_LIMIT", "TOKENIZER_LIMIT", "DATA_LIMIT", "read_bytes_bounded", "read_text_bounded", "file_kind",
           "require_regular_file"]

SPEC_LIMIT = 16 << 20
TOKENIZER_LIMIT = 256 << 20
DATA_LIMIT = 1 << 30

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str | None:
    """What a non-regular file is ("a character device", ...), from its st_mode; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 1 << 20 else f"{n / (1 << 20):,.1f} MiB ({n:,} bytes)"


def _not_regular(path: Path, what: str, kind: str, error: Callable[[str], BaseException], hint: str) -> BaseException:
    advice = f" {hint}" if hint else ""
    return error(f"The {what} {path} is {kind}, not a regular file: it cannot be read as one.{advice}")


def require_regular_file(path: str | os.PathLike, what: str, error: Callable[[str], BaseException] = MinigptError,
                         hint: str = "") -> None:
    """Raise ``error(message)`` when ``path`` exists but is a device, FIFO, directory or socket (the message
    names it and what it is); FileNotFoundError when it does not exist. Opens nothing."""
    kind = file_kind(os.stat(path).st_mode)
    if kind:
        raise _not_regular(Path(path), what, kind, error, hint)


def read_bytes_bounded(path: str | os.PathLike, what: str, limit: int,
                       error: Callable[[str], BaseException] = MinigptError, hint: str = "") -> bytes:
    """The content of the regular file ``path`` (``what`` it is, e.g. "experiment file"), at most ``limit``
    bytes. A device, FIFO, directory or larger file raises ``error(message)``; the message names the
    path and what it is, and ends with ``hint`` (what to give instead) when there is one.
    FileNotFoundError, PermissionError and other OSErrors of the open itself propagate, for the caller's
    own message."""
    path = Path(path)
    advice = f" {hint}" if hint else ""
    # stat first: opening some devices has effects of its own, and a FIFO's open blocks for a writer.
    require_regular_file(path, what, error, hint)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        kind = file_kind(os.fstat(fd).st_mode)  # replaced since the stat
        if kind:
            raise _not_regular(path, what, kind, error, hint)
        data = f.read(limit + 1)
        size = max(len(data), os.fstat(fd).st_size)
    if len(data) > limit:
        raise error(f"The {what} {path} is {_size(size)}, over the limit of {_size(limit)}: it would be read into "
                    f"memory whole, and no {what} is that large. Check that the path names the file you meant.{advice}")
    return data


def read_text_bounded(path: str | os.PathLike, what: str, limit: int,
                      error: Callable[[str], BaseException] = MinigptError, hint: str = "",
                      encoding: str = "utf-8", errors: str = "strict", newline: str | None = None) -> str:
    """:func:`read_bytes_bounded`, decoded (UnicodeDecodeError propagates, for the caller's own message).
    ``newline=None`` translates \\r\\n and \\r to \\n as ``open()`` in text mode does; ``""`` keeps them."""
    text = read_bytes_bounded(path, what, limit, error, hint).decode(encoding, errors)
    if newline is None and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text
