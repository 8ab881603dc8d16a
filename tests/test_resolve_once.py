"""A spec is resolved once: its components and registry travel with it to everything built from it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import minigpt_book
from minigpt_core import build_model, load_registry, parse_spec
from minigpt_core.checkpoints.checkpoint import save_model
from minigpt_core.assembly import load_model
from minigpt_core.base.errors import SpecError
from minigpt_core.spec import ComponentSlot, ModelSpec
from minigpt_core.train.trainer import train

from training_utils import tiny_spec_data

SMALL = dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1)


def test_a_bare_model_section_builds_without_tokenizer_or_dataset_plugins():
    # Only the book's components: no tokenizer, no dataset, no gpt2 init plugin in this registry.
    only_book = load_registry(entry_points=False, extra_plugins=[("book", minigpt_book)], local_plugins=())
    assert not only_book.entries("tokenizer") and not only_book.entries("dataset")
    model = build_model(ModelSpec(**SMALL).resolve(only_book))
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)
    # With the default registry too: a 64-token vocabulary is no problem without a tokenizer.
    assert build_model(ModelSpec(**SMALL)).tok_emb.num_embeddings == 64


def test_parsing_resolves_once_and_the_spec_carries_its_registry(tmp_path):
    own = load_registry()
    book_norm = own.get("norm", "book.layernorm")
    built = []
    own.add("norm", "probe.norm", lambda ctx, p: built.append(1) or book_norm.build(ctx),
            description="only in this test's registry")
    spec = parse_spec(tiny_spec_data(tmp_path, model={"norm": {"name": "probe.norm"}}), registry=own)
    assert spec.registry is own and spec.model.registry is own
    assert spec.components is spec.components  # cached, not looked up again
    assert spec.components["norm"].entry.name == "probe.norm"
    assert set(spec.components) >= {"attention", "norm", "tokenizer", "data.source"}
    assert set(spec.model.components) == {"attention", "norm", "activation", "feedforward", "positional",
                                          "block", "init"}

    # The default registry has no probe.norm, yet training, saving and the model need no registry argument.
    result = train(spec, progress=False, write=lambda line: None)
    assert built and result.checkpoint is not None
    save_model(build_model(spec), spec, tmp_path / "saved")
    with pytest.raises(Exception, match="probe.norm"):
        load_model(tmp_path / "saved")  # the process default does not know it: a clear error, not a guess
    model, loaded = load_model(tmp_path / "saved", own)
    assert loaded.registry is own and loaded.model.norm.name == "probe.norm"


def test_a_changed_spec_resolves_again_against_the_same_registry(registry):
    spec = parse_spec({"model": SMALL, "tokenizer": {"name": "char"}}, registry=registry)
    assert spec.components["attention"].entry.name == "book.multihead"
    spec.model.attention = ComponentSlot(name="torch.sdpa")
    assert spec.components["attention"].entry.name == "torch.sdpa"
    assert spec.registry is registry
    spec.model.attention = ComponentSlot(name="nope.attention")
    with pytest.raises(SpecError, match="model.attention.name"):
        build_model(spec)


def test_copies_share_the_resolution_and_pickles_leave_it_behind(registry):
    spec = parse_spec({"model": SMALL, "tokenizer": {"name": "char"}}, registry=registry)
    copied = copy.deepcopy(spec)
    assert copied.registry is registry  # the registry (factories, plugin modules) is never copied
    assert copied.components["attention"].entry is spec.components["attention"].entry
    restored = pickle.loads(pickle.dumps(spec))  # what a worker process or torchrun rank receives
    assert restored == spec
    assert restored.components["attention"].entry.name == "book.multihead"  # resolved again there
