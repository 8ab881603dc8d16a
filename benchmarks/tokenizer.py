"""Is minigpt's offline gpt2 tokenizer as fast as tiktoken.get_encoding("gpt2")?

Both are tiktoken's Rust BPE with the same ranks; this checks that nothing in the wrapper
costs time. tiktoken's reference encoding reads the same files from a temporary tiktoken
cache (no network). Text: this repository's Python sources and README (English and code)
plus a multilingual/emoji paragraph, repeated to --mb megabytes. Encode calls alternate.

    python benchmarks/tokenizer.py [--mb 4] [--repeats 7] [--write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, time_alternating  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MULTILINGUAL = ("Grüße aus Köln — naïve café. 日本語のテキスト、中文文本，한국어. Русский текст; العربية; हिन्दी. "
                "emoji 👩‍👩‍👧‍👦 👍🏽 🇫🇷 🤖🚀\n\t\tindented    spaces   \n")


def corpus(mb: float) -> str:
    files = sorted(ROOT.glob("minigpt_core/**/*.py")) + sorted(ROOT.glob("plugins/**/*.py")) + [ROOT / "README.md"]
    base = "\n<|endoftext|>".join(f.read_text(encoding="utf-8") for f in files) + MULTILINGUAL * 50
    return (base * (int(mb * 2**20 / len(base.encode())) + 1))[: int(mb * 2**20)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=4.0, help="megabytes of text per encode call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import tiktoken
    from minigpt_tokenizers.bpe import GPT2_FILES, gpt2_encoding_from_files, packaged_gpt2_dir

    from minigpt_core import ExperimentSpec
    from minigpt_core.model.tokenizers import build_tokenizer

    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    try:
        for name, (url, _) in GPT2_FILES.items():
            shutil.copy(packaged_gpt2_dir() / name, Path(cache) / hashlib.sha1(url.encode()).hexdigest())
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        reference = tiktoken.get_encoding("gpt2")
        load_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        gpt2_encoding_from_files(packaged_gpt2_dir())  # the path taken when tiktoken has no cache
        load_ours = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache)
    tok = build_tokenizer(ExperimentSpec())  # in this process: built from the packaged files
    text = corpus(args.mb)
    ids = tok.encode(text)
    assert ids == reference.encode(text, allowed_special={"<|endoftext|>"}), "ids differ"
    t = time_alternating({
        "tiktoken": lambda: reference.encode(text, allowed_special={"<|endoftext|>"}),
        "minigpt": lambda: tok.encode(text),
    }, args.repeats)
    mb = len(text.encode()) / 2**20
    body = (f"{mb:.1f} MB of text ({len(ids):,} tokens, identical ids), one encode call, single thread, "
            f"median of {args.repeats}.\n\n| tokenizer | s/call | MB/s |\n|---|---|---|\n"
            f"| tiktoken.get_encoding('gpt2').encode | {t['tiktoken']:.3f} | {mb / t['tiktoken']:.1f} |\n"
            f"| minigpt gpt2 tokenizer .encode | {t['minigpt']:.3f} | {mb / t['minigpt']:.1f} |\n\n"
            f"minigpt / tiktoken time ratio: **{t['minigpt'] / t['tiktoken']:.3f}**. Building the encoding: "
            f"{load_ours:.2f} s from the packaged files (hash check + ranks) vs {load_ref:.2f} s for "
            f"tiktoken from its cache.")
    print(machine())
    print(body)
    if args.write:
        append_results("Tokenizer: minigpt gpt2 (offline) vs tiktoken gpt2", body)


if __name__ == "__main__":
    main()
