"""Build the data of the shipped lm_eval tasks ``pydoc_mc`` and ``pydoc_cloze`` (``lm_eval_tasks/``).

Both are made from the standard library's docstrings that the python-docs corpus leaves out, so no
example was ever trained on by a python-docs run, whatever its tokenizer or split:

1. Every docstring of the standard library's ``.py`` files (parsed with ``ast``, never imported;
   files in sorted order, definitions in source order; the test suites, IDLE, lib2to3, turtledemo,
   tkinter, ensurepip and encodings left out, which some distributions do not install) is cut
   into paragraphs, whitespace collapsed. A paragraph is kept if it is prose: 60 to 400
   characters, starts with a capital letter, ends with a full stop, has no markup or code
   characters, and uses only characters that python-docs has (so a ``char`` model trained on it
   can read it).
2. **Disjointness**: a paragraph is kept only if neither it nor any of its sentences (of 20
   characters or more) occurs in the python-docs text (all of it, whitespace collapsed the same
   way). python-docs keeps only the public, longer docstrings; what is left is private helpers'
   and short methods' documentation, in the same style. Repeated paragraphs are kept once.
3. ``pydoc_cloze`` (LAMBADA's form): a paragraph of 8 words or more whose last word (letters only,
   3 or more) already occurs earlier in it, or a word with the same first five letters does
   ("signal" ... "signals"), as LAMBADA keeps passages whose last word the passage makes guessable.
   The text is the paragraph without its full stop; the task scores the last word after the rest.
4. ``pydoc_mc`` (HellaSwag's form): a sentence of 8 to 30 words (each sentence once), cut inside
   a word: after the first half of its words and the first two letters of the next word of four
   letters or more ("... the two nodes have the sa" | "me type."). The answer is the real rest of
   the sentence; the three distractors are the rests of other sentences with exactly as many
   characters (so a model that knows nothing, a uniform distribution over characters, is at
   chance: no choice wins by being shorter): the three distinct ones whose sha256 of (this id,
   their id) is lowest. A sentence without three such endings is left out. The answer's position
   is this id's sha256 modulo 4. Cut at a word boundary instead, the 0.8M-parameter quickstart
   model scored 0.28 on 500 examples (chance 0.25), cut inside a word 0.47: what a small
   character model learns first is how words go on.
5. An example is in the ``validation`` split (few-shot examples) when its text's sha256 is 0
   modulo 10, else in ``test``.

Everything is decided by sorting and hashing, so two builds on the same Python give the same bytes
(tests/test_evaluate_tasks.py builds twice). The shipped files were built with CPython 3.11.7:

    python -m minigpt_core.downstream.build_tasks [OUT_DIR]     (default: the shipped directory)
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["BUILD_VERSION", "TASK_DATA", "Paragraph", "python_docs_text", "stdlib_paragraphs", "novel_paragraphs",
           "cloze_examples", "mc_examples", "build", "main"]

BUILD_VERSION = 1
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
TASK_DATA = {"pydoc_mc": "pydoc_mc.jsonl", "pydoc_cloze": "pydoc_cloze.jsonl"}
BUILD_FILE = "BUILD.json"
# Left out: tests, and packages some distributions ship separately (IDLE, tkinter, ...), so a rebuild
# reads the same files wherever Python is installed in full.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip", "encodings",
              "site-packages", "dist-packages", "__pycache__"}
_MARKUP = set("<>|{}[]`*\\=#@$~^")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MIN_SENTENCE = 20
_N_CHOICES = 4


@dataclass(frozen=True)
class Paragraph:
    source: str  # the file it comes from, relative to the standard library
    text: str


def python_docs_text() -> str:
    """The python-docs corpus as a python-docs run reads it (its documents joined), through the registry."""
    from ..data.pipeline import build_source
    from ..spec import parse_spec

    spec = parse_spec({"tokenizer": {"name": "gpt2"}, "data": {"source": {"name": "python-docs"}}})
    return "\n\n".join(build_source(spec).documents())


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _files(stdlib: Path) -> list[Path]:
    def keep(path: Path) -> bool:
        parts = path.relative_to(stdlib).parts
        return not any(p in _SKIP_DIRS or p.startswith("config-") for p in parts[:-1])

    return sorted((p for p in stdlib.rglob("*.py") if keep(p)), key=lambda p: p.relative_to(stdlib).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Every docstring of the module, its classes and functions, in source order."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield doc
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend(reversed(children))


def _prose(text: str, chars: set[str]) -> bool:
    return (60 <= len(text) <= 400 and text[0].isupper() and text.endswith(".") and not (set(text) & _MARKUP)
            and ">>>" not in text and "::" not in text and set(text) <= chars)


def stdlib_paragraphs(stdlib: Path, chars: set[str]) -> Iterator[Paragraph]:
    """Prose paragraphs of every docstring of the standard library, in file and source order."""
    for path in _files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        source = path.relative_to(stdlib).as_posix()
        for doc in _docstrings(tree):
            for para in doc.split("\n\n"):
                text = _collapse(para)
                if text and _prose(text, chars):
                    yield Paragraph(source, text)


def sentences(text: str) -> list[str]:
    return _SENTENCE.split(text)


def novel_paragraphs(paragraphs: Iterator[Paragraph], corpus: str) -> list[Paragraph]:
    """The paragraphs that neither occur in ``corpus`` (whitespace collapsed) nor share a sentence of
    20 characters or more with it; each text once."""
    seen: set[str] = set()
    out = []
    for p in paragraphs:
        if p.text in seen:
            continue
        seen.add(p.text)
        if p.text in corpus or any(len(s) >= _MIN_SENTENCE and s in corpus for s in sentences(p.text)):
            continue
        out.append(p)
    return out


def _sha(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _split(text: str) -> str:
    return "validation" if _sha(text) % 10 == 0 else "test"


def _stem(w: str) -> str:
    return w.strip(".,;:!?()'\"").lower()[:5]


def cloze_examples(paragraphs: list[Paragraph]) -> list[dict]:
    out = []
    for p in paragraphs:
        text = p.text[:-1]  # without the full stop
        words = text.split(" ")
        last = words[-1]
        if len(words) < 8 or not (last.isalpha() and len(last) >= 3):
            continue
        if _stem(last) not in {_stem(w) for w in words[:-1]}:
            continue
        out.append({"id": f"cloze-{len(out):04d}", "source": p.source, "text": text, "split": _split(text)})
    return out


def mc_examples(paragraphs: list[Paragraph]) -> list[dict]:
    items: list[tuple[str, str, str, str]] = []  # (id, source, context, ending)
    seen: set[str] = set()
    for p in paragraphs:
        for s in sentences(p.text):
            words = s.split(" ")
            if not (8 <= len(words) <= 30 and s.endswith(".")) or s in seen:
                continue
            seen.add(s)
            # the cut: after the first half of the words and the first two letters of the next long word
            at = next((i for i in range((len(words) + 1) // 2, len(words) - 1)
                       if len(words[i]) >= 4 and words[i][:2].isalpha()), None)
            if at is None:
                continue
            context = " ".join(words[:at]) + " " + words[at][:2]
            items.append((f"mc-{len(items):04d}", p.source, context, s[len(context):]))
    by_length: dict[int, list[tuple[str, str]]] = {}
    for key, _, _, ending in items:
        by_length.setdefault(len(ending), []).append((key, ending))
    out = []
    for key, source, context, ending in items:
        # Same length in characters: a model that knows nothing (a uniform distribution over characters)
        # gives every choice the same probability, so no choice wins by being shorter.
        ranked = sorted((_sha(f"{key}|{k}"), e) for k, e in by_length[len(ending)] if k != key and e != ending)
        distractors: list[str] = []
        for _, e in ranked:
            if e not in distractors:
                distractors.append(e)
            if len(distractors) == _N_CHOICES - 1:
                break
        if len(distractors) < _N_CHOICES - 1:
            continue
        gold = _sha(key) % _N_CHOICES
        choices = distractors[:gold] + [ending] + distractors[gold:]
        out.append({"id": key, "source": source, "context": context, "choices": choices, "gold": gold,
                    "split": _split(context + ending)})
    return out


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def build(out_dir: str | Path, *, stdlib: str | Path | None = None, corpus: str | None = None) -> dict:
    """Write ``pydoc_mc.jsonl``, ``pydoc_cloze.jsonl`` and ``BUILD.json`` into ``out_dir``; returns the record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(stdlib) if stdlib else Path(sysconfig.get_paths()["stdlib"])
    text = python_docs_text() if corpus is None else corpus
    collapsed = _collapse(text)
    paragraphs = novel_paragraphs(stdlib_paragraphs(stdlib, set(text)), collapsed)
    data = {"pydoc_mc": mc_examples(paragraphs), "pydoc_cloze": cloze_examples(paragraphs)}
    record: dict = {"build_version": BUILD_VERSION, "python": sys.version.split()[0], "paragraphs": len(paragraphs),
                    "tasks": {}}
    for task, rows in data.items():
        blob = _jsonl(rows)
        (out / TASK_DATA[task]).write_bytes(blob)
        record["tasks"][task] = {"file": TASK_DATA[task], "examples": len(rows),
                                 "test": sum(r["split"] == "test" for r in rows),
                                 "validation": sum(r["split"] == "validation" for r in rows),
                                 "sha256": hashlib.sha256(blob).hexdigest()}
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else TASKS_DIR
    record = build(out)
    for task, r in record["tasks"].items():
        print(f"{out / r['file']}: {r['examples']} examples ({r['test']} test, {r['validation']} validation)")
    print(f"from {record['paragraphs']} docstring paragraphs that python-docs leaves out (Python {record['python']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
