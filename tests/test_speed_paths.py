"""The threaded matrix-vector products of generation compute the same function as the linear layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt_core import build_model, spec_from_preset
from minigpt_core.model.generate import GEMV_MAX_ROWS, generate, threaded_gemv
from training_utils import torch_threads

SHAPE = {"vocab_size": 301, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2}


@pytest.fixture
def two_threads():
    """The threaded paths only engage with more than one torch thread (CI may run tests on one)."""
    with torch_threads(2):
        yield


@pytest.mark.parametrize("out_features, rows, bias", [(301, 1, False), (256, 4, True), (1000, 2, True)])
def test_threaded_gemv_equals_the_linear_layer(two_threads, out_features, rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, out_features, bias=bias)
    x = torch.randn(rows, 1, 48)
    with torch.inference_mode():
        want = layer(x)
        with threaded_gemv(layer):
            assert "forward" in layer.__dict__  # the threaded path is on
            got = layer(x)
            more = torch.randn(GEMV_MAX_ROWS + 1, 48)  # more rows: the plain matmul
            torch.testing.assert_close(layer(more), F.linear(more, layer.weight, layer.bias))
    assert "forward" not in layer.__dict__  # restored
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_threaded_gemv_leaves_other_layers_alone_and_restores_after_an_error(two_threads):
    hooked, bf16, small = nn.Linear(32, 64), nn.Linear(32, 64).to(torch.bfloat16), nn.Linear(32, 8)
    hooked.register_forward_hook(lambda *a: None)
    plain = nn.Linear(32, 64)
    model = nn.ModuleList([hooked, bf16, small, plain])
    with pytest.raises(RuntimeError, match="boom"):
        with threaded_gemv(model):
            assert ["forward" in m.__dict__ for m in model] == [False, False, False, True]
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model)


def test_threaded_gemv_does_nothing_on_one_thread():
    layer = nn.Linear(32, 64)
    with torch_threads(1), threaded_gemv(layer):
        assert "forward" not in layer.__dict__


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_gives_the_same_tokens_with_the_threaded_products(two_threads, batch, monkeypatch):
    torch.manual_seed(0)
    model = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, "init": {"name": "gpt2.normal",
                                                                               "params": {"std": 0.2}}},
                                         tokenizer={"name": "char"}), seed=0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (batch, 5), generator=torch.Generator().manual_seed(1))
    used = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: used.append(1) or original(*a))
    threaded = generate(model, prompt, 20)
    assert used  # generate() took the threaded path
    monkeypatch.setattr("minigpt_core.model.generate.threaded_gemv", lambda model: contextlib.nullcontext())
    plain = generate(model, prompt, 20)
    assert torch.equal(threaded, plain)
    assert not any("forward" in m.__dict__ for m in model.modules())
