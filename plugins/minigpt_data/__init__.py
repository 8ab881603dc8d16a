"""minigpt plugin: the first-party data sources of the ``dataset`` registry kind.

``python-docs`` and ``python-stdlib`` (built in, no download), ``text`` (local files and globs), ``shards``
(pre-tokenized uint16/uint32 shards written by ``minigpt prepare``) and ``hf`` (Hugging Face
``datasets``, streaming; needs the ``hf`` extra).
"""

from __future__ import annotations

import importlib.util

from pydantic import BaseModel, ConfigDict, Field, field_validator

from minigpt_core.plugin import hookimpl

from .files import Shards, TextFiles
from .python_docs import PythonDocs
from .python_stdlib import PythonStdlib

__all__ = ["PythonDocs", "PythonStdlib", "TextFiles", "Shards", "minigpt_register"]


class PythonDocsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: bool = Field(True, description="include the language reference topics of pydoc_data")
    docstrings: bool = Field(True, description="include the standard library's public docstrings")


class PythonStdlibParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: bool = Field(True, description="begin with the language reference topics of pydoc_data (prose)")


class TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, description="files or glob patterns ('data/**/*.txt'); each "
                             "file is a document")
    encoding: str = Field("utf-8", description="text encoding of the files")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r}; use a Python codec name such as 'utf-8', "
                             f"'latin-1' or 'cp1252'") from None
        return v


class ShardsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="directory written by `minigpt prepare`")


class HFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="dataset on the Hugging Face hub, e.g. 'roneneldan/TinyStories'")
    name: str | None = Field(None, description="dataset configuration")
    data_files: list[str] | None = Field(None, description="files of the dataset to read (e.g. with path = 'json')")
    split: str = Field("train", description="split to read")
    text_field: str = Field("text", description="column holding the text")
    revision: str | None = Field(None, description="pin a revision so the token cache stays exact")
    max_documents: int | None = Field(None, gt=0, description="read at most this many documents")
    streaming: bool = Field(True, description="stream instead of downloading the whole dataset first")


@hookimpl
def minigpt_register(registry):
    registry.add(
        "dataset", "python-docs", lambda ctx, p: PythonDocs(p.topics, p.docstrings), params=PythonDocsParams,
        description="English prose shipped with Python: the language reference topics (pydoc_data) and the "
                    "standard library's docstrings, about 1.5 MB; no download, fixed for a Python version",
    )
    registry.add(
        "dataset", "python-stdlib", lambda ctx, p: PythonStdlib(p.topics), params=PythonStdlibParams,
        description="the standard library's source code with its docstrings (tests, site-packages and "
                    "generated files left out) after the language reference topics, about 10.4 M "
                    "characters; no download, fixed for a Python build (its sha256 is in the log)",
    )
    registry.add(
        "dataset", "text", lambda ctx, p: TextFiles(p.paths, p.encoding), params=TextParams,
        description="local text files and glob patterns, one document per file",
    )
    registry.add(
        "dataset", "shards", lambda ctx, p: Shards(p.path), params=ShardsParams,
        description="pre-tokenized uint16/uint32 memory-mapped shards written by `minigpt prepare`",
    )
    if importlib.util.find_spec("datasets") is None:
        registry.unavailable("dataset", "hf", "it needs the Hugging Face datasets package: "
                                              "pip install 'minigpt[hf]'")
    else:
        from .hf import HFDataset

        registry.add(
            "dataset", "hf", lambda ctx, p: HFDataset(p.path, p.name, p.split, p.text_field, p.revision,
                                                      p.max_documents, p.streaming, p.data_files),
            params=HFParams,
            description="a Hugging Face datasets dataset, streamed and tokenized into the cache (needs "
                        "the hf extra and network access)",
        )
