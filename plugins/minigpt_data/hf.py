"""``hf``: a Hugging Face ``datasets`` dataset, streamed (needs the ``hf`` extra and the network)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from minigpt_core.plugin import DataError, TextSource

__all__ = ["HFDataset"]


class HFDataset(TextSource):
    def __init__(self, path: str, name: str | None, split: str, text_field: str, revision: str | None,
                 max_documents: int | None, streaming: bool = True, data_files: list[str] | None = None):
        self.path, self.name, self.split, self.text_field = path, name, split, text_field
        self.revision, self.max_documents, self.streaming = revision, max_documents, streaming
        self.data_files = data_files

    def fingerprint(self) -> str:
        # A pinned revision makes the cache exact; without one the hub's latest is assumed stable.
        # Local data files also count by size and modification time, like the text source's.
        local = [f"{f}:{Path(f).stat().st_size}:{Path(f).stat().st_mtime_ns}"
                 for f in self.data_files or [] if Path(f).is_file()]
        return (f"hf|{self.path}|{self.name}|{self.split}|{self.text_field}|{self.revision}|"
                f"{self.max_documents}|{self.data_files}|{local}")

    def describe(self) -> str:
        return f"hf ({self.path}{'/' + self.name if self.name else ''}, split {self.split})"

    def documents(self) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision,
                                       data_files=self.data_files, streaming=self.streaming)
        except Exception as exc:  # hub, network and config errors come in many types
            raise DataError(f"Cannot load the Hugging Face dataset {self.path!r} (config {self.name!r}, "
                            f"split {self.split!r}): {type(exc).__name__}: {exc}") from None
        for i, row in enumerate(ds):
            if self.max_documents is not None and i >= self.max_documents:
                return
            if self.text_field not in row:
                raise DataError(f"The Hugging Face dataset {self.path!r} has no field {self.text_field!r}; "
                                f"its fields are {sorted(row)}. Set data.source.params.text_field.")
            yield row[self.text_field]
