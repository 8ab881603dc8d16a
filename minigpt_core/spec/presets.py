"""Presets: the model sections an experiment file starts from (``preset = "tiny"``).

A file's ``[model]`` table overrides its preset field by field (``spec.files``).
"""

from __future__ import annotations

from typing import Any


_GPT2_BOOK = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}

# GPT-2's function on PyTorch's fused kernels (F.layer_norm, tanh GELU, scaled_dot_product_attention):
# the same parameters, created in the same order, so a seed gives the same weights as the book's classes.
FAST_COMPONENTS: dict[str, dict[str, Any]] = {
    "attention": {"name": "torch.sdpa"}, "norm": {"name": "torch.layernorm"}, "activation": {"name": "torch.gelu_tanh"},
}
# The book's own classes for the same slots (book-* presets, `minigpt import-hf --book`).
BOOK_COMPONENTS: dict[str, dict[str, Any]] = {
    "attention": {"name": "book.multihead"}, "norm": {"name": "book.layernorm"}, "activation": {"name": "book.gelu"},
}
_GPT2_SHAPES = {
    "gpt2-124m": {"emb_dim": 768, "n_heads": 12, "n_layers": 12},
    "gpt2-medium": {"emb_dim": 1024, "n_heads": 16, "n_layers": 24},
    "gpt2-large": {"emb_dim": 1280, "n_heads": 20, "n_layers": 36},
    "gpt2-xl": {"emb_dim": 1600, "n_heads": 25, "n_layers": 48},
}

# Model sections of the presets; a file's [model] table overrides them field by field.
# gpt2-*: the fastest exact recipe; book-gpt2-*: the book's classes (its parity and tutorials).
PRESETS: dict[str, dict[str, Any]] = {
    **{name: {**_GPT2_BOOK, **shape, **FAST_COMPONENTS} for name, shape in _GPT2_SHAPES.items()},
    **{f"book-{name}": {**_GPT2_BOOK, **shape} for name, shape in _GPT2_SHAPES.items()},
    # Trains in minutes on a laptop CPU; the vocabulary is GPT-2's so the gpt2 tokenizer works.
    # Tied weights need GPT-2's small-std init: PyTorch's N(0, 1) embedding as the output head
    # starts the loss near 80 nats instead of ln(vocab) ~ 10.8. The book's components: the
    # tutorials' and tests' model (experiments/quickstart.toml picks the fast ones).
    "tiny": {**_GPT2_BOOK, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
             "drop_rate": 0.0, "tie_weights": True, "init": {"name": "gpt2.normal"}},
}
