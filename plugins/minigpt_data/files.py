"""``text`` (local files and globs) and ``shards`` (``minigpt prepare`` output) data sources."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from minigpt_core.plugin import DataError, ShardSet, TextSource, TokenSource, open_shards

__all__ = ["TextFiles", "Shards"]

# Larger files are read as consecutive pieces of whole lines, so memory stays bounded.
_MAX_DOCUMENT_BYTES = 16 << 20


def _expand(patterns: list[str]) -> list[Path]:
    files: dict[str, Path] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            raise DataError(
                f"The text data source found no file for {pattern!r} (relative paths are resolved "
                f"from {Path.cwd()}). Check data.source.params.paths."
            )
        for f in found:
            files.setdefault(str(f.resolve()), f)
    return list(files.values())


class TextFiles(TextSource):
    """Each file is a document (a file over 16 MiB: consecutive pieces of whole lines)."""

    def __init__(self, paths: list[str], encoding: str = "utf-8"):
        self.files = _expand(paths)
        self.encoding = encoding

    def fingerprint(self) -> str:
        # Path, size and modification time: cheap, and changes whenever a file is rewritten.
        stats = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.files]
        return "text|" + self.encoding + "|" + "|".join(stats)

    def describe(self) -> str:
        head = ", ".join(str(f) for f in self.files[:3])
        return f"text ({len(self.files)} file{'s' if len(self.files) != 1 else ''}: {head}" \
               f"{', ...' if len(self.files) > 3 else ''})"

    def documents(self) -> Iterator[str]:
        for path in self.files:
            try:
                if path.stat().st_size <= _MAX_DOCUMENT_BYTES:
                    yield path.read_text(encoding=self.encoding)
                    continue
                with open(path, encoding=self.encoding) as f:
                    piece, size = [], 0
                    for line in f:
                        piece.append(line)
                        size += len(line)
                        if size >= _MAX_DOCUMENT_BYTES:
                            yield "".join(piece)
                            piece, size = [], 0
                    if piece:
                        yield "".join(piece)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not {self.encoding} text ({exc}); set "
                                f"data.source.params.encoding or leave the file out.") from None
            except OSError as exc:
                raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from None


class Shards(TokenSource):
    def __init__(self, path: str):
        self.path = Path(path).expanduser()

    def open(self) -> ShardSet:
        return open_shards(self.path)

    def describe(self) -> str:
        return f"shards ({self.path})"
