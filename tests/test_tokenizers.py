"""Tokenizers: GPT-2's BPE built offline must be tiktoken's gpt2 encoding, id for id."""

import hashlib
import os
import json
import shutil

import pytest
import tiktoken
from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS

from minigpt_core import ExperimentSpec, SpecError, parse_spec
from minigpt_core.model.tokenizers import Tokenizer, TokenizerError, build_tokenizer, tokenizer_from_state
from minigpt_tokenizers.bpe import GPT2_FILES, gpt2_encoding, load_tiktoken_encoding, packaged_gpt2_dir

# Multilingual, emoji (with ZWJ sequences and skin tones), combining marks, odd whitespace, code.
TEXT = (
    "Hello, world! It's GPT-2's tokenizer; we'll see, they're fine.\n\n"
    "Grüße aus Köln — naïve café, Ångström, ﬁ ligature, e\u0301 (combining acute)\r\n"
    "日本語のテキスト、中文文本，한국어 텍스트. Русский текст; ελληνικά; עברית; العربية; हिन्दी; ไทย\n"
    "emoji: 👩‍👩‍👧‍👦 👍🏽 🇫🇷 🤖🚀✨ \U0001f9d1\u200d\U0001f4bb\n"
    "\t\ttabs\t and    many     spaces   \n\n\n   \u00a0non-breaking\u2003em-space\u3000ideographic\n"
    "def f(x):\n    return x ** 2  # 12345678901234567890 3.14159\n"
    "<|endoftext|>second document after the end-of-text marker\u0000\x7f\ufeff   "
)


def _fill_tiktoken_cache(cache_dir):
    """Put the packaged files where tiktoken's own gpt2 constructor looks for its downloads."""
    for name, (url, _) in GPT2_FILES.items():
        shutil.copy(packaged_gpt2_dir() / name, cache_dir / hashlib.sha1(url.encode()).hexdigest())


@pytest.fixture
def reference_gpt2(tmp_path, monkeypatch):
    """tiktoken's gpt2 Encoding, from tiktoken's own constructor reading the same files."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _fill_tiktoken_cache(tmp_path)
    return tiktoken.Encoding(**ENCODING_CONSTRUCTORS["gpt2"]())


@pytest.fixture
def no_tiktoken_cache(tmp_path, monkeypatch):
    """An empty tiktoken cache and no way out: any download attempt fails at once."""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    gpt2_encoding.cache_clear()
    load_tiktoken_encoding.cache_clear()
    yield cache
    gpt2_encoding.cache_clear()
    load_tiktoken_encoding.cache_clear()


def _spec(registry, vocab_size=50257, **tokenizer):
    return parse_spec({"model": {"vocab_size": vocab_size, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
                                 "context_length": 16}, **({"tokenizer": tokenizer} if tokenizer else {})},
                      registry=registry)


def test_gpt2_is_tiktokens_gpt2_encoding(registry, reference_gpt2, no_tiktoken_cache):
    tok = build_tokenizer(_spec(registry))  # empty cache: built from the packaged files
    assert isinstance(tok, Tokenizer)
    assert tok.encoding is not reference_gpt2
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encoding._mergeable_ranks == reference_gpt2._mergeable_ranks
    assert tok.encoding._pat_str == reference_gpt2._pat_str
    ids = tok.encode(TEXT)
    assert ids == reference_gpt2.encode(TEXT, allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == 1
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids) == reference_gpt2.decode(ids)
    # Every line on its own too (leading whitespace and newline handling differ per position).
    for line in TEXT.splitlines(keepends=True):
        assert tok.encode(line) == reference_gpt2.encode(line, allowed_special="all"), line
    # Other special-looking strings are plain text, not refused.
    assert tok.decode(tok.encode("<|fim_prefix|>")) == "<|fim_prefix|>"


def test_tiktokens_own_cache_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    gpt2_encoding.cache_clear()
    try:
        _fill_tiktoken_cache(tmp_path)
        assert gpt2_encoding() is tiktoken.get_encoding("gpt2")
        # A corrupt cache file is not used (tiktoken would try to download again): packaged files are.
        gpt2_encoding.cache_clear()
        url = GPT2_FILES["encoder.json"][0]
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"{}")
        enc = gpt2_encoding()
        assert enc is not tiktoken.get_encoding("gpt2")
        assert enc.encode("hello world") == [31373, 995]
    finally:
        gpt2_encoding.cache_clear()


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_corrupted_vocabulary_file_is_refused(registry, tmp_path, name):
    for f in GPT2_FILES:
        shutil.copy(packaged_gpt2_dir() / f, tmp_path / f)
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (tmp_path / name).write_bytes(bytes(data))
    spec = _spec(registry, name="gpt2", params={"vocab_dir": str(tmp_path)})
    with pytest.raises(TokenizerError) as err:
        build_tokenizer(spec)
    msg = str(err.value)
    assert name in msg and "sha256" in msg and GPT2_FILES[name][1] in msg and "reinstall" in msg.lower()
    # The unmodified files in another directory still work.
    good = tmp_path / "good"
    good.mkdir()
    for f in GPT2_FILES:
        shutil.copy(packaged_gpt2_dir() / f, good / f)
    tok = build_tokenizer(_spec(registry, name="gpt2", params={"vocab_dir": str(good)}))
    assert tok.encode("hello world") == [31373, 995]
    (good / "vocab.bpe").unlink()
    gpt2_encoding.cache_clear()
    with pytest.raises(TokenizerError, match="Cannot read GPT-2's vocab.bpe"):
        build_tokenizer(_spec(registry, name="gpt2", params={"vocab_dir": str(good)}))


def test_tiktoken_encoding_by_name(registry, reference_gpt2, no_tiktoken_cache):
    # r50k_base holds GPT-2's ranks in tiktoken's own file format: write it into the cache.
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    import base64
    lines = (base64.b64encode(t) + b" " + str(r).encode() + b"\n"
             for t, r in sorted(reference_gpt2._mergeable_ranks.items(), key=lambda kv: kv[1]))
    (no_tiktoken_cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"".join(lines))
    tok = build_tokenizer(_spec(registry, name="tiktoken", params={"encoding": "r50k_base"}))
    assert (tok.n_vocab, tok.eot_id) == (50257, 50256)
    assert tok.encode(TEXT) == reference_gpt2.encode(TEXT, allowed_special="all")
    assert tokenizer_from_state(json.loads(json.dumps(tok.state())), registry).encode("a b") == tok.encode("a b")


def test_tiktoken_encoding_offline_fails_fast_and_clearly(registry, no_tiktoken_cache):
    with pytest.raises(SpecError) as err:
        _spec(registry, vocab_size=200_000, name="tiktoken", params={"encoding": "cl100k_base"})
    msg = str(err.value)
    assert "tokenizer" in msg and "cl100k_base" in msg and "offline" in msg and "TIKTOKEN_CACHE_DIR" in msg
    with pytest.raises(SpecError, match="no encoding named 'cl200k'"):
        _spec(registry, name="tiktoken", params={"encoding": "cl200k"})


def test_vocab_size_is_checked_against_the_tokenizer(registry):
    with pytest.raises(SpecError) as err:
        _spec(registry, vocab_size=50000)
    assert "tokenizer" in str(err.value) and "50257" in str(err.value)


def test_char_tokenizer_learns_saves_and_restores(registry):
    text = "to be or not to be\nthat is the question: ünïcode 🙂"
    spec = _spec(registry, vocab_size=64, name="char")
    tok = build_tokenizer(spec, training_text=text)
    assert tok.n_vocab == len(set(text)) and tok.eot_id is None
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) == tok.n_vocab - 1
    state = json.loads(json.dumps(tok.state()))  # JSON-serialisable
    again = tokenizer_from_state(state, registry)
    assert again.n_vocab == tok.n_vocab and again.encode(text) == ids
    with pytest.raises(TokenizerError, match="no id for 1 character"):
        tok.encode("question?")
    with pytest.raises(TokenizerError, match="training text"):
        build_tokenizer(spec)
    small = _spec(registry, vocab_size=8, name="char")
    with pytest.raises(TokenizerError, match=f"at least {tok.n_vocab}"):
        build_tokenizer(small, training_text=text)


def test_state_round_trip_and_bad_states(registry):
    tok = build_tokenizer(_spec(registry))
    state = json.loads(json.dumps(tok.state()))
    assert state["name"] == "gpt2"
    assert tokenizer_from_state(state, registry).encode(TEXT) == tok.encode(TEXT)
    with pytest.raises(TokenizerError):
        tokenizer_from_state({"params": {}}, registry)
    with pytest.raises(TokenizerError, match="invalid params"):
        tokenizer_from_state({"name": "gpt2", "params": {"vocab": 1}}, registry)
    with pytest.raises(TokenizerError, match="'chars'"):
        tokenizer_from_state({"name": "char"}, registry)
    assert isinstance(ExperimentSpec().tokenizer.name, str)


# -- bpe: a byte-level BPE learnt from the training text ----------------------------------------
def _stdlib_documents() -> list[str]:
    from minigpt_data.python_stdlib import PythonStdlib

    return list(PythonStdlib().documents())


def test_bpe_round_trips_every_character_of_the_stdlib_corpus(registry):
    docs = _stdlib_documents()
    text = "\n\n".join(docs)
    tok = build_tokenizer(_spec(registry, vocab_size=4096, name="bpe", params={"vocab_size": 4096}),
                          training_text=text)
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("bpe", 4096, 0)
    # Every distinct character of the corpus, in each line it occurs in (all but plain ASCII text),
    # and a tenth of the documents whole: encoding all 10 M characters would take 15 s here.
    lines = [line for line in text.splitlines(keepends=True)
             if any(not (c.isascii() and c.isprintable()) and c not in "\n\t" for c in line)]
    sample = lines + docs[::10]
    assert set("".join(sample)) == set(text)
    assert any(ord(c) > 127 for c in text)  # the corpus has non-ASCII characters to round-trip
    encoded = [e.ids for e in tok.tokenizer.encode_batch(sample, add_special_tokens=False)]
    assert encoded[-3:] == [tok.encode(d) for d in sample[-3:]]  # the batch encodes as encode() does
    for piece, ids in zip(sample, encoded):
        assert tok.decode(ids) == piece
        assert max(ids, default=0) < tok.n_vocab
    n_chars = sum(map(len, docs[::10]))
    assert 2.5 < n_chars / sum(map(len, encoded[len(lines):])) < 5  # merges learnt: ~3.6 characters a token
    # Text the corpus never had round-trips too (byte-level: no unknown token).
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode(TEXT).count(tok.eot_id) == 1  # <|endoftext|> in a text is the end-of-text id
    every_byte = bytes(range(256)).decode("latin-1") + "\U0010ffff\ud7ff"
    assert tok.decode(tok.encode(every_byte)) == every_byte


def test_bpe_training_is_deterministic_across_processes(tmp_path):
    # Another process, other hash seeds and thread counts: the same text must give the same tokenizer.json.
    from minigpt_tokenizers.trained_bpe import train_bpe_json

    text = "\n\n".join(_stdlib_documents())[:1_000_000]
    here = hashlib.sha256(train_bpe_json(text, 1024, 2).encode()).hexdigest()
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8", newline="")
    code = ("import hashlib, sys; from minigpt_tokenizers.trained_bpe import train_bpe_json; "
            "text = open(sys.argv[1], encoding='utf-8', newline='').read(); "
            "print(hashlib.sha256(train_bpe_json(text, 1024, 2).encode()).hexdigest())")
    import subprocess
    import sys

    # One thread there (here as many as the trainer likes), another hash seed.
    env = {**os.environ, "PYTHONHASHSEED": "1", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus.txt")], capture_output=True,
                         text=True, check=True, env=env).stdout.strip()
    assert out == here
    # A different text or vocabulary gives a different tokenizer (the hash above is not a constant).
    assert hashlib.sha256(train_bpe_json(text, 1000, 2).encode()).hexdigest() != here


def test_bpe_state_rebuilds_the_tokenizer_and_refuses_a_corrupt_one(registry):
    spec = _spec(registry, vocab_size=300, name="bpe", params={"vocab_size": 300})
    text = "def f(x):\n    return x ** 2\n" * 20 + "naïve café 🙂 日本語\n" * 5
    tok = build_tokenizer(spec, training_text=text)
    assert 257 < tok.n_vocab <= 300
    state = json.loads(json.dumps(tok.state()))  # JSON-serialisable: it goes into meta.json
    assert json.loads(state["tokenizer_json"])["model"]["type"] == "BPE"
    again = tokenizer_from_state(state, registry)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.n_vocab == tok.n_vocab
    assert tokenizer_from_state(state, registry).state() == state
    with pytest.raises(TokenizerError, match="training text"):
        build_tokenizer(spec)
    bad = {**state, "tokenizer_json": state["tokenizer_json"].replace('"f"', '"g"', 1)}
    with pytest.raises(TokenizerError, match="corrupt"):
        tokenizer_from_state(bad, registry)
    with pytest.raises(TokenizerError, match="tokenizer_json"):
        tokenizer_from_state({"name": "bpe", "params": {}}, registry)
    with pytest.raises(SpecError, match="at least 4096"):  # the model must have an embedding for each id
        _spec(registry, vocab_size=1000, name="bpe")
    with pytest.raises(SpecError, match="vocab_size"):  # fewer ids than the 256 bytes and <|endoftext|>
        _spec(registry, vocab_size=1000, name="bpe", params={"vocab_size": 200})


# Runs the minigpt CLI with the network cut: every connection or name lookup is recorded (in the
# file $NETWORK_LOG) and refused, whatever library tries it; the hub is told it is offline too.
_OFFLINE_CLI = """
import os, sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        with open(os.environ["NETWORK_LOG"], "a") as f:
            f.write(f"{event} {args!r:.200}\\n")
        raise OSError(f"network access attempted: {event}")
sys.addaudithook(_no_network)
from minigpt import main
sys.argv[0] = "minigpt"
sys.exit(main())
"""


def test_bpe_is_saved_with_the_run_and_reloaded_offline_by_sample_and_eval(tmp_path, capsys):
    import subprocess
    import sys

    from minigpt_core.checkpoints.checkpoint import read_meta
    from training_utils import PATIENCE_S, ROOT, cli, runs_of, write_spec

    spec = write_spec(tmp_path, model={"vocab_size": 512}, tokenizer={"name": "bpe", "params": {"vocab_size": 512}})
    status, out, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 0, err
    assert "tokenizer bpe (512 ids)" in out
    run = runs_of(tmp_path / "runs")[-1]
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = read_meta(ckpt)["tokenizer"]  # read_meta checks meta.json against the checkpoint's hashes
    assert state["name"] == "bpe" and json.loads(state["tokenizer_json"])["model"]["type"] == "BPE"
    trained = tokenizer_from_state(state)

    log = tmp_path / "network.log"
    env = {**os.environ, "NETWORK_LOG": str(log), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}

    def offline(*args):
        done = subprocess.run([sys.executable, "-c", _OFFLINE_CLI, *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=PATIENCE_S)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # eval re-tokenizes the run's data: from scratch (no token cache), with the run's tokenizer.
    import shutil

    shutil.rmtree(tmp_path / "cache")
    import re

    n_val = re.search(r"training and ([\d,]+) validation windows of 32 tokens", out).group(1)
    evaluated = offline("eval", run, "--no-progress")
    assert f": {n_val} windows of 32 tokens: all of the split" in evaluated  # the same tokens as in training
    assert re.search(r"^loss \d+\.\d+ nats/token", evaluated, re.M)
    # sample needs nothing but the checkpoint: the corpus the tokenizer was learnt from is gone.
    (tmp_path / "corpus.txt").unlink()
    shutil.rmtree(tmp_path / "cache")
    text = offline("sample", ckpt, "--prompt", "The naïve ", "--max-new-tokens", "20", "--seed", "1",
                   "--no-progress")
    assert "The naïve " in text
    assert not log.exists(), log.read_text()
    assert trained.n_vocab == 512
