"""``python-docs``: English prose that ships with Python itself, so training needs no download.

Documents, in a fixed order: every topic of ``pydoc_data.topics`` (the language reference that
``help()`` shows), then, per standard-library module, its public docstrings (module, classes,
functions and longer method docstrings). The modules are parsed with ``ast``, never imported,
so nothing runs and the text depends only on the Python version.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from minigpt_core.plugin import TextSource

__all__ = ["PythonDocs"]

# Bump when the extraction rules change: it is part of the fingerprint, so caches are rebuilt.
EXTRACTION_VERSION = 1
# Tests, tools and vendored or generated code carry little prose.
_SKIP_DIRS = {"idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "encodings", "__pycache__"}
_MIN_DOC = 40  # characters; shorter docstrings are mostly "Return x."
_MIN_METHOD_DOC = 200  # methods are many; only their longer explanations are kept


def _stdlib_files(root: Path) -> list[Path]:
    def keep(path: Path) -> bool:
        parts = path.relative_to(root).parts
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            return False
        # Private modules (_pydecimal) and tests hold implementation notes rather than docs.
        return not any(p.startswith(("test", "_")) and p != "__init__.py" for p in parts)

    return sorted((p for p in root.rglob("*.py") if keep(p)), key=lambda p: p.relative_to(root).as_posix())


def _public_docstrings(tree: ast.Module) -> list[str]:
    out: list[str] = []

    def visit(node: ast.AST, in_class: bool) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and len(doc) >= (_MIN_METHOD_DOC if in_class else _MIN_DOC):
            out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not child.name.startswith("_"):
                visit(child, in_class=isinstance(node, ast.ClassDef))

    visit(tree, in_class=False)
    return out


class PythonDocs(TextSource):
    """The language reference topics plus the standard library's docstrings (about 1.5 MB of text)."""

    def __init__(self, topics: bool = True, docstrings: bool = True):
        self.topics = topics
        self.docstrings = docstrings
        self.stdlib = Path(sysconfig.get_paths()["stdlib"])

    def fingerprint(self) -> str:
        parts = [f"python-docs-v{EXTRACTION_VERSION}", sys.version, str(self.stdlib),
                 f"topics={self.topics}", f"docstrings={self.docstrings}"]
        return "|".join(parts)

    def describe(self) -> str:
        return f"python-docs (Python {sys.version.split()[0]} reference topics and stdlib docstrings)"

    def documents(self) -> Iterator[str]:
        if self.topics:
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield topics[key].strip()
        if self.docstrings:
            for path in _stdlib_files(self.stdlib):
                try:
                    tree = ast.parse(path.read_bytes(), filename=str(path))
                except (SyntaxError, ValueError):  # e.g. a file for another Python version
                    continue
                docs = _public_docstrings(tree)
                if docs:
                    yield "\n\n".join(docs)
