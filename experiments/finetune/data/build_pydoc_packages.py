"""Build pydoc_packages.tsv: which standard-library package a docstring comes from.

A real labelled set that needs no download: the docstrings of four standard-library packages
(asyncio, email, tkinter, xml), extracted exactly as the python-docs corpus extracts them (parsed
with ``ast``, never imported). One example per line, ``label<TAB>text`` under a header, whitespace
collapsed to single spaces, texts cut at 400 characters, duplicates dropped; the order is the
files' sorted order, so the output depends only on the Python version (the committed file was
built with CPython 3.11).

    python experiments/finetune/data/build_pydoc_packages.py [OUT.tsv]
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins"))
from minigpt_data.python_docs import _public_docstrings, _stdlib_files  # noqa: E402  the corpus's own rules

PACKAGES = ("asyncio", "email", "tkinter", "xml")
MAX_CHARS = 400


def examples(stdlib: Path) -> list[tuple[str, str]]:
    out, seen = [], set()
    for path in _stdlib_files(stdlib):
        package = path.relative_to(stdlib).parts[0]
        if package not in PACKAGES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for doc in _public_docstrings(tree):
            text = " ".join(doc.split())[:MAX_CHARS]
            if text not in seen:
                seen.add(text)
                out.append((package, text))
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).with_name("pydoc_packages.tsv")
    rows = examples(Path(sysconfig.get_paths()["stdlib"]))
    out.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    counts = {p: sum(label == p for label, _ in rows) for p in PACKAGES}
    print(f"{out}: {len(rows)} examples {counts}; majority class {max(counts, key=counts.get)} "
          f"({max(counts.values()) / len(rows):.1%})")


if __name__ == "__main__":
    main(sys.argv[1:])
