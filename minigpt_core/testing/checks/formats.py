"""Checks of the components that are not modules: tokenizers, datasets, other libraries' weight formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ...base.errors import PretrainedError
from ...data import DataContext, TextSource, TokenSource
from ...model.tokenizers import TokenizerContext, tokenizer_from_state
from ..subject import CheckSkipped, Subject
from .registry import _expect_close, conformance_check


# -- tokenizers and datasets -----------------------------------------------------------------
SAMPLE_TEXT = "Every effort moves you, 42 times.\nThe quick brown fox jumps over the lazy dog!"


@conformance_check("tokenizer_roundtrip", "decode(encode(text)) == text, ids in range, state() rebuilds it",
                   {"tokenizer"})
def check_tokenizer_roundtrip(s: Subject) -> None:
    tok = s.entry.factory(TokenizerContext(training_text=SAMPLE_TEXT), s.validated_params())
    ids = tok.encode(SAMPLE_TEXT)
    if not ids or not all(isinstance(i, int) and 0 <= i < tok.n_vocab for i in ids):
        raise s.fail(f"encode gave ids outside 0..n_vocab-1 ({tok.n_vocab}) or none at all")
    if tok.decode(ids) != SAMPLE_TEXT:
        raise s.fail(f"decode(encode(text)) gave {tok.decode(ids)!r}, not the text")
    if tok.eot_id is not None and not 0 <= tok.eot_id < tok.n_vocab:
        raise s.fail(f"eot_id {tok.eot_id} is outside 0..{tok.n_vocab - 1}")
    rebuilt = tokenizer_from_state(tok.state(), s.registry)
    if rebuilt.encode(SAMPLE_TEXT) != ids or rebuilt.n_vocab != tok.n_vocab:
        raise s.fail("the tokenizer rebuilt from its state() encodes differently")


@conformance_check("dataset_source", "builds a text or token source whose documents and fingerprint are stable",
                   {"dataset"})
def check_dataset_source(s: Subject) -> None:
    params = s.validated_params()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = DataContext(cache_dir=Path(tmp))
        source = s.entry.factory(ctx, params)
        if isinstance(source, TokenSource):
            return
        if not isinstance(source, TextSource):
            raise s.fail(f"factory returned {type(source).__name__}, not a TextSource or TokenSource")
        again = s.entry.factory(ctx, params)
        if not source.fingerprint() or source.fingerprint() != again.fingerprint():
            raise s.fail("fingerprint() is empty or changes between two builds of the same source")
        first = [d for d, _ in zip(source.documents(), range(3))]
        if not first or not all(isinstance(d, str) for d in first):
            raise s.fail("documents() yields no documents, or something other than str")
        if first != [d for d, _ in zip(again.documents(), range(3))]:
            raise s.fail("documents() yields a different order on a second read")



@conformance_check("weights_roundtrip", "a model's weights written in the format and read back give the same "
                   "logits; its config reads back as the same shape", {"weights"})
def check_weights_roundtrip(s: Subject) -> None:
    fmt = s.entry.factory(None, s.validated_params())
    model_spec = s.model_spec()
    try:
        fmt.check(s.components(model_spec), export=True)
    except PretrainedError as exc:
        raise CheckSkipped(f"{s.label} cannot write the tiny model of the checks' default components: {exc}")
    model, fresh = s.tiny_gpt(seed=0).eval(), s.tiny_gpt(seed=1).eval()
    fmt.load_state(fresh, fmt.state(model), f"{s.label}'s own output")
    idx = torch.randint(0, model_spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _expect_close(s, fresh(idx.to(s.device)), model(idx.to(s.device)), "logits after state() -> load_state()")
    section = fmt.model_section(fmt.config(model))
    shape = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "tie_weights")
    got = {k: section.get(k) for k in shape}
    want = {k: getattr(model_spec, k) for k in shape}
    if got != want:
        raise s.fail(f"model_section(config(model)) describes {got}, but the model is {want}")
