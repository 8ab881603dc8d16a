"""A full disk as a user error: which path, how much space it needed, how much is free."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import MinigptError

__all__ = ["NO_SPACE", "DiskFullError", "disk_full_error", "reporting_full_disk"]

# ENOSPC: the filesystem is full; EDQUOT: the user's quota is; EFBIG: a file size limit (ulimit -f).
NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None)


class DiskFullError(MinigptError):
    """A checkpoint or log could not be written for lack of space."""


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def disk_full_error(path: str | Path, needed: int | None, exc: OSError) -> DiskFullError:
    """The one-paragraph error for ``exc`` (an OSError whose errno is in NO_SPACE) writing ``path``."""
    path = Path(path)
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    what = "the file size limit (ulimit -f) was reached" if exc.errno == errno.EFBIG else \
        "the disk (or your quota) is full"
    need = f"; it needs about {_size(needed)}" if needed else ""
    return DiskFullError(
        f"Cannot write {path}: {what} ({free} on {where}{need}). Nothing written before is lost: earlier "
        f"checkpoints are intact. Free some space (a lower train.keep_last keeps fewer checkpoints) and "
        f"continue with `minigpt train --resume RUN_DIR` (the run directory under train.out_dir)."
    )


@contextmanager
def reporting_full_disk(path: str | Path, needed: int | None = None):
    """Turn a full-disk OSError inside the block into the DiskFullError for ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise disk_full_error(exc.filename2 or exc.filename or path, needed, exc) from None  # 2: a copy's target
