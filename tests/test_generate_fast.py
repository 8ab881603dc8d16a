"""generate()'s fast path (preallocated output, call-sized KV cache, last-position logits, inference
mode, optional compiled decode step) gives exactly the tokens of a naive loop that recomputes the
whole text for every token."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from minigpt_core import build_model, parse_spec
from minigpt_core.model.generate import generate
from training_utils import PATIENCE_S, torch_threads

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 61
ATTENTIONS = ["book.multihead", "book.multihead_wrapper", "torch.sdpa", "torch.fused_qkv", "torch.mha",
              "modern.rope", "modern.gqa"]


def _model(registry, attention, context_length=16, n_layers=2):
    spec = parse_spec({"seed": 5, "tokenizer": {"name": "char"}, "model": {
        "vocab_size": VOCAB, "context_length": context_length, "emb_dim": 32, "n_heads": 4, "n_layers": n_layers,
        "drop_rate": 0.1, "qkv_bias": True, "attention": {"name": attention},
        # A wide init gives peaked, varied predictions: no near-ties for rounding to flip.
        "init": {"name": "gpt2.normal", "params": {"std": 0.3}}}}, registry=registry)
    return build_model(spec)


def naive(model, prompt, n, eos_id=None):
    """The definition: every token from the full (windowed) text, no cache; eos pads finished rows."""
    ctx = model.spec.context_length
    model.eval()
    idx, finished = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx[:, -ctx:])[:, -1].argmax(-1, keepdim=True)
            if eos_id is not None:
                nxt = torch.where(finished[:, None], torch.full_like(nxt, eos_id), nxt)
                finished |= nxt[:, 0] == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and finished.all():
                break
    return idx


def _prompt(batch, length=5, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_equals_the_naive_loop_past_the_context_length(registry, attention, batch):
    model = _model(registry, attention)
    model.train()
    prompt = _prompt(batch)
    with pytest.warns(UserWarning, match="sliding window"):
        out = generate(model, prompt, 25)  # 30 tokens > context 16: the cache gives way to recomputation
    assert model.training  # the mode is restored
    want = naive(model, prompt, 25)
    assert torch.equal(out, want)
    assert len(set(out[0, 5:].tolist())) > 3  # a varied continuation, not one repeated token
    # Within the context the cache is used all along; recomputation agrees.
    assert torch.equal(generate(model, prompt, 9), want[:, :14])
    assert torch.equal(generate(model, prompt, 9, use_cache=False), want[:, :14])


@pytest.mark.parametrize("attention", ["book.multihead", "torch.sdpa"])
def test_eos_stops_mid_way_as_the_naive_loop_does(registry, attention):
    model = _model(registry, attention, context_length=64)
    prompt = _prompt(3, seed=1)
    greedy = naive(model, prompt, 12)
    eos = int(greedy[0, 5 + 3])  # row 0 emits it as its fourth new token
    out = generate(model, prompt, 12, eos_id=eos)
    want = naive(model, prompt, 12, eos_id=eos)
    assert torch.equal(out, want)
    assert (out[0, 8:] == eos).all()  # row 0 is padded with eos once it has finished
    one = generate(model, prompt[:1], 12, eos_id=eos)
    assert torch.equal(one, greedy[:1, :9])  # alone, row 0 stops right after its eos
    seen = []
    generate(model, prompt[:1], 12, eos_id=eos, on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.cat(seen, dim=1), one[:, 5:])  # on_token saw each step's ids, (B, 1) each


def test_output_is_an_ordinary_long_tensor(registry):
    model = _model(registry, "torch.sdpa")
    prompt = _prompt(2).int()
    out = generate(model, prompt, 4)
    assert out.dtype == torch.long and out.is_contiguous() and not out.is_inference()
    out[0, 0] = 1  # callers may modify it in place outside inference mode
    assert generate(model, prompt, 0) is prompt


def test_last_only_gives_the_last_positions_logits(registry):
    model = _model(registry, "torch.sdpa").eval()
    idx = _prompt(2, length=7)
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        assert last.shape == (2, 1, VOCAB)
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
        cache = model.new_kv_cache()
        model(idx[:, :4], kv_cache=cache, last_only=True)
        torch.testing.assert_close(model(idx[:, 4:], kv_cache=cache, last_only=True), full[:, -1:],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])  # 2: the decode step's linears run as threaded GEMVs
def test_compiled_decode_step_gives_the_same_tokens_and_compiles_once(registry, threads):
    from minigpt_core.model import generate as generate_module

    with torch_threads(threads):
        model = _compiled_decode_checks(registry)
    threaded = [m for m in model.modules() if generate_module._THREADED_FORWARD in m.__dict__]
    assert bool(threaded) == (threads > 1)


def _compiled_decode_checks(registry):
    from torch._dynamo.utils import counters

    model = _model(registry, "torch.sdpa", context_length=32, n_layers=1)
    prompt = _prompt(2)
    want = naive(model, prompt, 16)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notices
        assert torch.equal(generate(model, prompt, 16, compile=True), want)
        # Another prompt length and sampling: the same graph, no recompilation per step or call.
        kw = dict(temperature=0.9, top_k=10)
        assert torch.equal(generate(model, want[:, :7], 8, compile=True, generator=torch.Generator().manual_seed(3), **kw),
                           generate(model, want[:, :7], 8, generator=torch.Generator().manual_seed(3), **kw))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    return model


@pytest.mark.slow
def test_benchmark_quick_mode_runs():
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--quick", "--precisions", "fp32"],
                          capture_output=True, text=True, timeout=PATIENCE_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 1 | fp32 | ours |" in done.stdout and "identical" in done.stdout
