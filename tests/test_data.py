"""Data pipeline: python-docs corpus, shards and `minigpt prepare`, the split, the sampler."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from minigpt_core import load_registry, parse_spec
from minigpt_core.data import (
    BatchSampler,
    DataError,
    TokenCorpus,
    document_split,
    document_tokens,
    load_training_data,
    open_shards,
    split_corpus,
    split_segments,
    write_shards,
)
from minigpt_core.model.tokenizers import tokenizer_from_state
from training_utils import cli, corpus_text, tiny_spec_data


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer_from_state({"name": "gpt2", "params": {}})


# -- python-docs -----------------------------------------------------------------------------
def test_python_docs_is_deterministic_prose_from_the_standard_library(registry):
    from minigpt_core.data import DataContext

    entry = registry.get("dataset", "python-docs")
    a = entry.build(DataContext(cache_dir=None))
    b = entry.build(DataContext(cache_dir=None))
    # Parsing the stdlib twice makes many collections; each would rescan this worker's whole heap (torch,
    # every test module) without it frozen: 2-3x the time of the parsing itself.
    gc.freeze()
    try:
        docs = list(a.documents())
        assert docs == list(b.documents())
    finally:
        gc.unfreeze()
    assert a.fingerprint() == b.fingerprint()
    size = sum(len(d) for d in docs)
    assert 1_000_000 < size < 2_500_000  # about 1.5 MB with Python 3.11
    from pydoc_data.topics import topics

    assert docs[0] == topics[sorted(topics)[0]].strip()  # the language reference comes first
    import json

    assert any(json.__doc__.strip()[:200] in d for d in docs)  # then the stdlib docstrings
    only_topics = entry.build(DataContext(cache_dir=None), {"docstrings": False})
    assert len(list(only_topics.documents())) == len(topics)


# -- python-stdlib ---------------------------------------------------------------------------
_BUILD_STDLIB = """
import hashlib, sys
from minigpt_data.python_stdlib import PythonStdlib
h = hashlib.sha256()
for doc in PythonStdlib().documents():
    h.update(doc.encode("utf-8") + b"\\0")
print(h.hexdigest())
"""


def test_python_stdlib_builds_to_the_same_bytes_twice(registry, tmp_path):
    import hashlib
    import os
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    from minigpt_core.data import DataContext
    from minigpt_data.python_stdlib import stdlib_files

    entry = registry.get("dataset", "python-stdlib")
    a = entry.build(DataContext(cache_dir=None))
    docs = list(a.documents())
    here = hashlib.sha256(b"".join(d.encode("utf-8") + b"\0" for d in docs)).hexdigest()
    # A second build in another process (another hash seed, so no set or dict order could hide).
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", _BUILD_STDLIB], capture_output=True, text=True, check=True,
                           env=env).stdout.strip()
    assert here == there
    b = entry.build(DataContext(cache_dir=None))
    assert a.fingerprint() == b.fingerprint() and here in a.fingerprint() and sys.version in a.fingerprint()
    assert sys.version.split()[0] in a.describe() and here[:12] in a.describe()
    size = sum(len(d) for d in docs)
    assert 8_000_000 < size < 14_000_000  # 10.4 M characters with Python 3.11.7
    assert all("\r" not in d and not d.startswith("\ufeff") for d in docs)
    from pydoc_data.topics import topics

    assert docs[0] == topics[sorted(topics)[0]].strip()  # the language reference first, then the code
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f.relative_to(root).as_posix() for f in stdlib_files(root)]
    assert files == sorted(files) and "json/__init__.py" in files and "asyncio/base_events.py" in files
    skipped = ("test/", "tests/", "idle_test/", "site-packages/", "encodings/", "pydoc_data/", "lib-dynload/")
    assert not [f for f in files if any(s in f"/{f}" for s in ("/" + x for x in skipped))]
    assert not [f for f in files if "_sysconfigdata" in f or f.startswith("config-")]
    json_source = (root / "json" / "__init__.py").read_text(encoding="utf-8")
    assert json_source in docs  # a file's text whole, docstrings and comments included
    code_only = list(entry.build(DataContext(cache_dir=None), {"topics": False}).documents())
    assert code_only == docs[len(topics):]


# -- shards ----------------------------------------------------------------------------------
def test_shards_round_trip_across_files_and_worker_processes(tmp_path, gpt2):
    docs = [corpus_text(30_000)[i:i + 3_000] for i in range(0, 30_000, 3_000)]
    expected = np.concatenate([document_tokens(gpt2, [d]) for d in docs])
    shards = write_shards(docs, gpt2, tmp_path / "out", shard_tokens=1_000, workers=2, progress=False)
    assert len(shards.parts) == -(-len(expected) // 1_000) > 2
    assert shards.parts[0].dtype == np.uint16 and isinstance(shards.parts[0], np.memmap)
    np.testing.assert_array_equal(open_shards(tmp_path / "out").tokens(), expected)
    assert shards.meta["documents"] == len(docs)
    with pytest.raises(DataError, match="already holds token shards"):
        write_shards(docs, gpt2, tmp_path / "out", progress=False)


def test_truncated_shard_is_refused_with_a_clear_error(tmp_path, gpt2):
    write_shards([corpus_text(5_000)], gpt2, tmp_path / "s", shard_tokens=500, progress=False)
    victim = tmp_path / "s" / "tokens_00001.bin"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated"):
        open_shards(tmp_path / "s")


def test_prepare_cli_writes_shards_equal_to_tiktoken_gpt2(tmp_path, capsys):
    from minigpt_tokenizers.bpe import gpt2_encoding

    text_a, text_b = corpus_text(20_000), "Second file: naïve café, emoji 🙂 and tabs\tand  spaces.\n"
    (tmp_path / "a.txt").write_text(text_a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(text_b, encoding="utf-8")
    # the command in this process (its worker processes are still processes)
    status, out, err = cli(capsys, "prepare", tmp_path / "*.txt", tmp_path / "shards", "--workers", "2",
                           "--shard-tokens", "1500")
    assert status == 0, err
    assert "tokens of 2 documents" in out
    enc = gpt2_encoding()  # a tiktoken.Encoding
    eot = enc.eot_token
    expected = enc.encode_ordinary(text_a) + [eot] + enc.encode_ordinary(text_b) + [eot]
    shards = open_shards(tmp_path / "shards")
    assert len(shards.parts) > 1
    assert shards.tokens().tolist() == expected
    assert shards.meta["tokenizer"] == {"name": "gpt2", "params": {}}


def test_prepare_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    status, _, err = cli(capsys, "prepare", tmp_path / "missing-*.txt", tmp_path / "out")
    assert status == 2
    assert "found no file" in err and "Traceback" not in err


# -- split and windows -------------------------------------------------------------------------
def test_split_is_deterministic_exact_and_disjoint():
    train, val = split_segments(100_000, 1_000, 0.1)
    val_tokens = sum(e - s for s, e in val)
    assert val_tokens == 10_000
    assert split_segments(100_000, 1_000, 0.1) == (train, val)
    covered = sorted(train + val)
    assert covered[0][0] == 0 and covered[-1][1] == 100_000
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # a partition, no overlap
    assert [s // 1_000 for s, _ in val] == list(range(9, 100, 10))  # evenly spaced blocks


def test_windows_never_cross_into_validation_tokens():
    tokens = np.arange(20_000, dtype=np.uint16) % 5_000
    corpus = TokenCorpus([tokens[:12_345], tokens[12_345:]])
    split = split_corpus(corpus, max_length=31, stride=16, split_block=256, val_fraction=0.2)
    starts_train = set()
    for s in split.train:
        starts_train.update(range(s, s + split.length))
    starts_val = set()
    for s in split.val:
        starts_val.update(range(s, s + split.length))
    assert not starts_train & starts_val
    assert abs(len(starts_val) / (len(starts_train) + len(starts_val)) - 0.2) < 0.03
    # a window is the book's (input, target) pair: length max_length + 1, read from one part
    w = corpus.windows(split.train[:3], split.length)
    assert w.shape == (3, 32)
    np.testing.assert_array_equal(w[0], np.concatenate([tokens[:12_345], tokens[12_345:]])[split.train[0]:][:32])
    with pytest.raises(DataError, match="split_block"):
        split_corpus(corpus, max_length=300, stride=300, split_block=256, val_fraction=0.2)


# -- sampler ---------------------------------------------------------------------------------
def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = BatchSampler(50, 8, seed=3)
    stream = np.concatenate([s.next_batch() for _ in range(25)])  # 200 windows = 4 epochs
    for e in range(4):
        assert sorted(stream[e * 50:(e + 1) * 50]) == list(range(50))
    assert not np.array_equal(stream[:50], stream[50:100])  # reshuffled every epoch
    again = BatchSampler(50, 8, seed=3)
    for _ in range(7):
        again.next_batch()
    resumed = BatchSampler(50, 8, seed=3)
    resumed.load_state_dict(again.state_dict())
    np.testing.assert_array_equal(np.concatenate([resumed.next_batch() for _ in range(18)]), stream[56:])
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(50, 8, seed=4).load_state_dict(again.state_dict())


def test_ranks_split_each_global_batch_between_them():
    one = BatchSampler(37, 12, seed=1)
    ranks = [BatchSampler(37, 12, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):
        np.testing.assert_array_equal(one.next_batch(), np.concatenate([r.next_batch() for r in ranks]))


# -- the pipeline from a spec -------------------------------------------------------------------
def test_text_source_is_tokenized_once_into_the_cache(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path))
    data = load_training_data(spec, progress=False)
    assert data.tokenizer.name == "char"
    text = corpus_text()
    assert data.shards.tokens().tolist() == data.tokenizer.encode(text) + data.tokenizer.encode("\n\n")
    cached = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(cached) == 1
    mtime = (cached[0] / "meta.json").stat().st_mtime_ns
    again = load_training_data(spec, progress=False)
    assert (cached[0] / "meta.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.split.train, data.split.train)


def test_shards_source_must_match_the_spec_tokenizer(tmp_path, gpt2):
    write_shards([corpus_text(20_000)], gpt2, tmp_path / "s", progress=False)
    raw = tiny_spec_data(tmp_path, data={"source": {"name": "shards", "params": {"path": str(tmp_path / "s")}}})
    with pytest.raises(DataError, match="written with the gpt2 tokenizer"):
        load_training_data(parse_spec(raw), progress=False)
    raw["tokenizer"] = {"name": "gpt2"}
    raw["model"]["vocab_size"] = 50257
    data = load_training_data(parse_spec(raw), progress=False)
    assert data.tokenizer.name == "gpt2" and len(data.split.val) > 0


def test_data_section_is_validated_like_model_slots(tmp_path):
    from minigpt_core import SpecError

    raw = tiny_spec_data(tmp_path, data={"source": {"name": "pyhton-docs"}})
    with pytest.raises(SpecError, match="data.source.name.*python-docs"):
        parse_spec(raw)
    raw = tiny_spec_data(tmp_path, data={"source": {"name": "text", "params": {"path": "x"}}})
    with pytest.raises(SpecError, match="data.source.params"):
        parse_spec(raw)
    assert "hf" in {u.name for u in load_registry().unavailable} or ("dataset", "hf") in load_registry()


def test_hf_source_streams_a_local_dataset(tmp_path):
    pytest.importorskip("datasets", reason="the hf extra (pip install -e '.[hf]') is not installed")
    import json

    rows = [{"text": f"Document number {i}: " + corpus_text(300)[i * 10:] } for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    raw = tiny_spec_data(tmp_path, data={"source": {"name": "hf", "params": {
        "path": "json", "data_files": [str(tmp_path / "docs.jsonl")], "max_documents": 5}}, "split_block": 64},
        model={"context_length": 16})
    data = load_training_data(parse_spec(raw), progress=False)
    tok = data.tokenizer
    expected = "".join(r["text"] + "\n\n" for r in rows[:5])
    assert tok.decode(data.shards.tokens().tolist()) == expected


def test_window_starts_are_stride_apart_within_each_segment(tmp_path):
    from minigpt_core.data.corpus import split_segments as segments_of

    length = 33  # data.max_length 32 (the tiny model's context) + the shifted target
    for stride in (5, 32, 33, 50):  # overlapping, the default (max_length), one window, gaps between windows
        spec = parse_spec(tiny_spec_data(tmp_path, data={"stride": stride}))
        data = load_training_data(spec, progress=False)
        split = data.split
        assert split.length == length
        for side, starts in ((0, split.train), (1, split.val)):
            expected = []
            for i, part in enumerate(split.corpus.parts):
                base = int(split.corpus.offsets[i])
                for s, e in segments_of(len(part), spec.data.split_block, spec.data.val_fraction)[side]:
                    got = starts[(starts >= base + s) & (starts < base + e)] - base
                    if e - s < length:
                        assert len(got) == 0
                        continue
                    assert got[0] == s and got[-1] + length <= e < got[-1] + stride + length, (stride, s, e)
                    assert set(np.diff(got).tolist()) <= {stride}, (stride, s, e)
                    expected.extend(base + got)
            assert len(expected) == len(starts) and len(starts) > 10


# -- split = "documents": whole documents held out before tokenizing --------------------------------
def write_documents(directory, docs: list[str]) -> list[str]:
    """One file per document (the text source's documents, in file-name order); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = directory / f"doc_{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(str(path))
    return paths


def plain_documents(n: int = 20, chars: int = 4_000) -> list[str]:
    text = corpus_text(n * chars)
    return [text[i * chars:(i + 1) * chars] for i in range(n)]


def with_marker_in_validation(docs: list[str], marker: str, fraction: float = 0.1, seed: int = 0):
    """docs with ``marker`` appended to the first document that then falls in validation, and its index."""
    for k in range(len(docs)):
        changed = docs[:k] + [docs[k] + marker] + docs[k + 1:]
        if document_split(changed, fraction, seed)[k]:
            return changed, k
    raise AssertionError("no document could carry the marker into validation")


def docsplit_spec(tmp_path, docs, **data):
    paths = write_documents(tmp_path / "docs", docs)
    return tiny_spec_data(tmp_path, data={"source": {"name": "text", "params": {"paths": paths}},
                                          "split": "documents", **data})


def test_document_split_is_deterministic_disjoint_and_keeps_copies_together():
    docs = [f"document {i}: " + "x" * (i % 7) for i in range(200)]
    is_val = document_split(docs, 0.1, 0)
    assert is_val == document_split(list(docs), 0.1, 0)  # deterministic
    assert len(is_val) == 200 and sum(is_val) == 20  # every document on exactly one side, the exact fraction
    assert document_split(docs, 0.1, 1) != is_val  # another seed, another validation set
    assert document_split(docs, 0.1, 0) == [document_split(docs[::-1], 0.1, 0)[199 - i] for i in range(200)]
    # by content, not position: a copy of a validation document is validation too (never trained on)
    val_doc = docs[is_val.index(True)]
    copied = document_split(docs + [val_doc], 0.1, 0)
    assert copied[-1] and copied[is_val.index(True)]
    assert sum(document_split(["a", "b"], 0.1, 0)) == 1  # at least one of each
    with pytest.raises(DataError, match="at least 2"):
        document_split(["only one"], 0.1, 0)
    with pytest.raises(DataError, match="identical"):
        document_split(["same"] * 5, 0.1, 0)


def test_documents_split_tokenizes_each_side_from_its_own_documents(tmp_path):
    docs = plain_documents()
    spec = parse_spec(docsplit_spec(tmp_path, docs))
    data = load_training_data(spec, progress=False)
    is_val = document_split(docs, 0.1, 0)
    tok = data.tokenizer
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    # the char vocabulary is exactly the training documents' characters (blank-line joiner included)
    assert tok.chars == "".join(sorted(set("\n\n".join(train_docs))))
    assert data.shards.tokens().tolist() == document_tokens(tok, train_docs).tolist()
    assert data.val_shards.tokens().tolist() == document_tokens(tok, val_docs).tolist()
    n_train = data.shards.n_tokens
    split = data.split
    assert split.corpus.n_tokens == n_train + data.val_shards.n_tokens
    assert len(split.train) and len(split.val)
    assert (split.train + split.length <= n_train).all() and (split.val >= n_train).all()
    assert "validation: 2 of 20 whole documents" in data.source
    # the cache key names the split: the blocks split of the same source is another cache entry
    blocks = load_training_data(spec.model_copy(update={"data": spec.data.model_copy(update={"split": "blocks"})}),
                                progress=False)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3
    assert blocks.val_shards is None and blocks.tokenizer.chars == "".join(sorted(set("\n\n".join(docs))))
    # read back from the cache: the same windows; another split_seed holds out other documents
    again = load_training_data(spec, progress=False)
    np.testing.assert_array_equal(again.split.val, split.val)
    other = load_training_data(spec.model_copy(update={"data": spec.data.model_copy(update={"split_seed": 5})}),
                               progress=False)
    assert other.val_shards.tokens().tolist() != data.val_shards.tokens().tolist()


def test_blocks_split_cache_key_is_unchanged(tmp_path):
    # Existing caches (and results) stay valid: the default key hashes what it always hashed.
    import hashlib
    import json

    from minigpt_core.data.pipeline import FORMAT_VERSION, _cache_key

    tok = tokenizer_from_state({"name": "char", "params": {}, "chars": "abc"})
    blob = json.dumps({"source": "fp", "tokenizer": tok.state(), "format": FORMAT_VERSION}, sort_keys=True)
    assert _cache_key("fp", tok) == hashlib.sha256(blob.encode()).hexdigest()[:24]
    assert _cache_key("fp", tok, {"mode": "documents"}) != _cache_key("fp", tok)


def test_char_tokenizer_never_learns_a_character_only_validation_holds(tmp_path):
    docs, k = with_marker_in_validation(plain_documents(), " \u2603 ")
    spec = parse_spec(docsplit_spec(tmp_path, docs))
    # the snowman is not in the vocabulary, so the validation documents cannot be encoded: refused clearly
    with pytest.raises(DataError, match="(?s)validation documents.*'\u2603'.*data.split = \"blocks\""):
        load_training_data(spec, progress=False)
    # the blocks split learns it from all the text, validation included (the leak this split removes)
    blocks = parse_spec(docsplit_spec(tmp_path, docs, split="blocks"))
    assert "\u2603" in load_training_data(blocks, progress=False).tokenizer.chars


def test_bpe_merges_come_from_the_training_documents_only(tmp_path):
    word = " zqxjvorpal"
    docs, k = with_marker_in_validation(plain_documents(), word * 200)

    def tokenizer(split):
        raw = docsplit_spec(tmp_path / split, docs, split=split)
        raw["tokenizer"] = {"name": "bpe", "params": {"vocab_size": 1024}}
        raw["model"]["vocab_size"] = 1024
        return load_training_data(parse_spec(raw), progress=False).tokenizer

    leaky, clean = tokenizer("blocks"), tokenizer("documents")
    assert len(leaky.encode(word)) <= 2  # learnt from the validation document: the word is a merge
    assert len(clean.encode(word)) >= 5  # never seen: spelt out in short pieces
    assert not any("zqxj" in t for t in clean.tokenizer.get_vocab())
    assert clean.decode(clean.encode(word)) == word  # byte-level: still encodes (no unknown token)


def test_documents_split_refuses_a_pretokenized_source(tmp_path, gpt2):
    write_shards([corpus_text(20_000)], gpt2, tmp_path / "s", progress=False)
    raw = tiny_spec_data(tmp_path, tokenizer={"name": "gpt2"}, model={"vocab_size": 50257},
                         data={"source": {"name": "shards", "params": {"path": str(tmp_path / "s")}},
                               "split": "documents"})
    with pytest.raises(DataError, match="already tokenized"):
        load_training_data(parse_spec(raw), progress=False)
