"""Build pydoc_instructions.jsonl: instruction / input / output examples from the standard library's docstrings.

A real instruction set that needs no download, in the Alpaca format (``instruction``, ``input``,
``output``), from the docstrings the python-docs corpus reads (parsed with ``ast``, never
imported). For the public top-level functions and classes of every standard-library module whose
docstring opens with a short summary sentence:

- "What does `json.dumps` do?" (a function) or "What is `json.JSONDecoder`?" (a class), answered
  by that sentence;
- for a name only one module defines, "Which module defines this name?" with the name as the
  ``input``, answered "`dumps` is defined in the `json` module.".

Entries are short (summaries of at most 64 characters) so that a small character-level model
with a 128-token context reads a whole example. The order is the files' sorted order (the task
shuffles before splitting), every other qualifying name is kept, so the output depends only on
the Python version (the committed file was built with CPython 3.11).

    python experiments/finetune/data/build_pydoc_instructions.py [OUT.jsonl]
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins"))
from minigpt_data.python_docs import _stdlib_files  # noqa: E402  the corpus's own file rules

MAX_SUMMARY = 64
MIN_SUMMARY = 20
KEEP_EVERY = 2  # every other qualifying name: about 900 examples
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")


def summary(doc: str) -> str | None:
    """The docstring's first sentence, if it is a short plain one (no signature line, no markup)."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    m = _SENTENCE.match(first)
    if m is None:
        return None
    s = m.group(1)
    if not (MIN_SUMMARY <= len(s) <= MAX_SUMMARY) or not s[0].isupper() or any(c in s for c in "()[]{}<>|`*\\"):
        return None
    return s


def definitions(stdlib: Path) -> list[tuple[str, str, str, str]]:
    """(module, name, "function" or "class", summary), in file order."""
    out = []
    for path in _stdlib_files(stdlib):
        parts = path.relative_to(stdlib).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node, clean=True)
                s = summary(doc) if doc else None
                if s:
                    out.append((module, node.name, "class" if isinstance(node, ast.ClassDef) else "function", s))
    return out


def examples(stdlib: Path) -> list[dict[str, str]]:
    defs = definitions(stdlib)
    modules_of = Counter(name for _, name, _, _ in defs)
    out = []
    for i, (module, name, kind, s) in enumerate(defs):
        if i % KEEP_EVERY:
            continue
        question = f"What does `{module}.{name}` do?" if kind == "function" else f"What is `{module}.{name}`?"
        out.append({"instruction": question, "input": "", "output": s})
        if modules_of[name] == 1 and i % (2 * KEEP_EVERY) == 0:
            out.append({"instruction": "Which module defines this name?", "input": name,
                        "output": f"`{name}` is defined in the `{module}` module."})
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).with_name("pydoc_instructions.jsonl")
    rows = examples(Path(sysconfig.get_paths()["stdlib"]))
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with_input = sum(bool(r["input"]) for r in rows)
    print(f"{out}: {len(rows)} examples ({with_input} with an input), "
          f"{out.stat().st_size / 1000:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])
