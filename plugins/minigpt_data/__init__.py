"""minigpt plugin: the first-party data sources of the ``dataset`` registry kind.

``python-docs`` (built in, no download), ``text`` (local files and globs), ``shards``
(pre-tokenized uint16/uint32 shards written by ``minigpt prepare``) and ``hf`` (Hugging Face
``datasets``, streaming; needs the ``hf`` extra).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minigpt_core import hookimpl

from .python_docs import PythonDocs

__all__ = ["PythonDocs", "minigpt_register"]


class PythonDocsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: bool = Field(True, description="include the language reference topics of pydoc_data")
    docstrings: bool = Field(True, description="include the standard library's public docstrings")


@hookimpl
def minigpt_register(registry):
    registry.add(
        "dataset", "python-docs", lambda ctx, p: PythonDocs(p.topics, p.docstrings), params=PythonDocsParams,
        description="English prose shipped with Python: the language reference topics (pydoc_data) and the "
                    "standard library's docstrings, about 1.5 MB; no download, fixed for a Python version",
    )
