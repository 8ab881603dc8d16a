"""The lm_eval tasks that ship with minigpt (pydoc_mc, pydoc_cloze): their data, how it is built, and
that none of it is in the python-docs corpus (so in no python-docs run's training split)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter

import pytest

from minigpt_core.downstream import build_tasks
from minigpt_core.downstream.tasks import SHIPPED, TASKS_DIR

pytest.importorskip("lm_eval")


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus() -> str:
    return build_tasks.python_docs_text()


@pytest.fixture(scope="module")
def build_record() -> dict:
    return json.loads((TASKS_DIR / build_tasks.BUILD_FILE).read_text(encoding="utf-8"))


def test_no_example_is_in_the_python_docs_corpus(corpus):
    """Disjoint from every python-docs training split: not in python-docs at all, whole or sentence by sentence."""
    collapsed = " ".join(corpus.split())
    chars = set(corpus)
    mc, cloze = _rows("pydoc_mc"), _rows("pydoc_cloze")
    assert len(mc) > 1000 and len(cloze) > 150
    for row in mc:
        gold = row["choices"][row["gold"]]
        sentence = row["context"] + gold
        assert sentence not in collapsed, row["id"]
        assert set(sentence) <= chars  # a char model trained on python-docs can read it
    for row in cloze:
        text = row["text"] + "."
        assert text not in collapsed and row["text"] not in collapsed, row["id"]
        for s in build_tasks.sentences(text):
            assert len(s) < 20 or s not in collapsed, (row["id"], s)
        assert set(text) <= chars


def test_the_data_files_are_what_the_build_record_says(build_record):
    for task, record in build_record["tasks"].items():
        blob = (TASKS_DIR / record["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == record["sha256"]
        rows = _rows(task)
        assert len(rows) == record["examples"]
        assert Counter(r["split"] for r in rows) == {"test": record["test"], "validation": record["validation"]}
        assert len({r["id"] for r in rows}) == len(rows)


def test_multiple_choice_distractors_are_other_endings_of_the_same_length():
    rows = _rows("pydoc_mc")
    sentences = Counter()
    for row in rows:
        choices, gold = row["choices"], row["gold"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= gold < 4
        assert len({len(c) for c in choices}) == 1  # no choice wins by being shorter
        sentences[row["context"] + choices[gold]] += 1
        assert row["context"][-2:].isalpha() and not choices[gold][0].isspace()  # cut inside a word
    assert max(sentences.values()) == 1  # each sentence once
    # every distractor is the real ending of another example
    real = {row["choices"][row["gold"]] for row in rows}
    assert all(c in real for row in rows for i, c in enumerate(row["choices"]) if i != row["gold"])
    positions = Counter(row["gold"] for row in rows)
    assert min(positions.values()) > len(rows) / 4 * 0.8  # the answer's position is spread evenly


def test_cloze_targets_are_guessable_from_the_passage():
    for row in _rows("pydoc_cloze"):
        words = row["text"].split(" ")
        last = words[-1]
        assert last.isalpha() and len(last) >= 3 and len(words) >= 8
        assert last.lower()[:5] in {w.strip(".,;:!?()'\"").lower()[:5] for w in words[:-1]}


def test_lm_eval_indexes_the_shipped_directory_as_the_names_minigpt_knows():
    from lm_eval.tasks import TaskManager

    from minigpt_core.downstream.lm_eval_tasks import loader  # noqa: F401  the file lm_eval imports by path

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(SHIPPED) <= set(manager.all_tasks)
    assert set(manager.all_groups) >= {"pydoc"} and {"pydoc_mc", "pydoc_cloze"} <= set(manager.all_subtasks)
    data = loader.pydoc_mc()
    assert set(data) == {"test", "validation"} and len(data["test"]) + len(data["validation"]) == len(_rows("pydoc_mc"))


@pytest.mark.slow
def test_the_task_data_builds_identically_twice_and_as_shipped(tmp_path, build_record):
    first = build_tasks.build(tmp_path / "a")
    second = build_tasks.build(tmp_path / "b")
    for name in [*build_tasks.TASK_DATA.values(), build_tasks.BUILD_FILE]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first == second
    if sys.version.split()[0] != build_record["python"]:
        pytest.skip(f"the shipped files were built with Python {build_record['python']}; this is {sys.version}")
    for name in [*build_tasks.TASK_DATA.values(), build_tasks.BUILD_FILE]:
        assert (tmp_path / "a" / name).read_bytes() == (TASKS_DIR / name).read_bytes(), name
