"""The sizes of the python-stdlib and python-docs sources in characters, GPT-2 tokens and tokens of
a 4,096-id BPE learnt from each source (docs/training.md's table).

    python benchmarks/corpus_sizes.py        # about a minute on 2 cores
"""

from minigpt_core import load_registry
from minigpt_core.data import DataContext
from minigpt_core.model.tokenizers import build_tokenizer

registry = load_registry()
for name in ("python-stdlib", "python-docs"):
    docs = list(registry.get("dataset", name).build(DataContext(cache_dir=None)).documents())
    gpt2, bpe = build_tokenizer("gpt2"), build_tokenizer("bpe", training_text="\n\n".join(docs))
    print(name, len(docs), sum(map(len, docs)) + 2 * (len(docs) - 1),  # characters, joined by blank lines
          sum(len(gpt2.encode(d)) for d in docs), sum(len(bpe.encode(d)) for d in docs))
