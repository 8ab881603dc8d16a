"""generate(): the book's sampling semantics, seeded determinism, eos, and KV cache == recomputation."""

import pytest
import torch

from minigpt_core import build_model, load_registry, parse_spec
from minigpt_core.model.generate import filter_logits, generate

CACHED_ATTENTIONS = [e.name for e in load_registry().entries("attention") if e.has("kv_cache")]
VOCAB = 97


def _model(registry, attention="book.multihead", context_length=32):
    spec = parse_spec({"seed": 3, "tokenizer": {"name": "char"}, "model": {
        "vocab_size": VOCAB, "context_length": context_length, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": True, "attention": {"name": attention},
        # A wide init gives peaked, varied predictions (a 0.02 init predicts almost uniformly).
        "init": {"name": "gpt2.normal", "params": {"std": 0.3}}}}, registry=registry)
    return build_model(spec)


@pytest.fixture
def model(registry):
    return _model(registry)


@pytest.fixture
def prompt():
    return torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))


def test_temperature_zero_is_argmax_of_the_full_recomputation(model, prompt):
    model.train()  # generate must switch dropout off, and restore the mode afterwards
    out = generate(model, prompt, 12, temperature=0.0)
    assert model.training
    model.eval()
    idx = prompt
    with torch.no_grad():
        for _ in range(12):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    assert len(set(out[0, 4:].tolist())) > 3  # not a degenerate repetition


def test_top_k_sets_everything_else_to_minus_inf():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    out = filter_logits(logits, top_k=3)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, False, True, False],
                                                       [True, True, False, False, False]]))
    assert (out[torch.isinf(out)] < 0).all()
    kept = ~torch.isinf(out)
    assert torch.equal(out[kept], logits[kept])  # survivors are untouched
    assert torch.equal(filter_logits(logits, top_k=None), logits)
    assert torch.equal(filter_logits(logits, top_k=50), logits)  # k > vocab keeps all


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None]
    keep = lambda p: (~torch.isinf(filter_logits(logits, top_p=p)))[0].tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.5) == [False, True, False, False]  # 0.5 already reached by the top token
    assert keep(0.7) == [False, True, False, True]
    assert keep(0.9) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    both = filter_logits(logits, top_k=1, top_p=0.9)
    assert (~torch.isinf(both))[0].tolist() == [False, True, False, False]


def test_sampling_respects_top_k_and_is_seeded(model, prompt):
    model.eval()
    with torch.no_grad():
        allowed = model(prompt)[:, -1].topk(2).indices  # (B, 2)
    draws = torch.stack([generate(model, prompt, 1, temperature=2.0, top_k=2,
                                  generator=torch.Generator().manual_seed(s))[:, -1] for s in range(40)], dim=1)
    for row in range(2):
        assert set(draws[row].tolist()) == set(allowed[row].tolist())  # only, and both, of the top 2
    a = generate(model, prompt, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = generate(model, prompt, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = generate(model, prompt, 15, temperature=1.0)
    torch.manual_seed(5)
    assert torch.equal(d, generate(model, prompt, 15, temperature=1.0))
    # top_k=1 sampling is greedy whatever the temperature.
    assert torch.equal(generate(model, prompt, 10, temperature=5.0, top_k=1, generator=torch.Generator()),
                       generate(model, prompt, 10))


def test_eos_stops_generation(model, prompt):
    greedy = generate(model, prompt, 12)
    eos = int(greedy[0, 6])  # row 0 emits it as its third new token
    out = generate(model, prompt, 12, eos_id=eos)
    row1_hit = (greedy[1, 4:] == eos).nonzero()
    if len(row1_hit) == 0 or int(row1_hit[0]) + 5 > 7:
        # Row 1 finishes later (or never): generation runs on until it does, row 0 pads with eos.
        assert torch.equal(out[1], greedy[1, :out.shape[1]])
        first0 = int((greedy[0, 4:] == eos).nonzero()[0]) + 4
        assert (out[0, first0:] == eos).all() and torch.equal(out[0, :first0 + 1], greedy[0, :first0 + 1])
    single = generate(model, prompt[:1], 12, eos_id=eos)
    first = int((greedy[0, 4:] == eos).nonzero()[0]) + 4
    assert torch.equal(single[0], greedy[0, :first + 1])  # stops right after the first eos


@pytest.mark.parametrize("attention", CACHED_ATTENTIONS)
def test_kv_cache_equals_recomputation(registry, prompt, attention):
    model = _model(registry, attention)
    assert model.supports_kv_cache
    cached = generate(model, prompt, 20, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 20, use_cache=False))
    kw = dict(temperature=0.8, top_k=20, top_p=0.95)
    s1 = generate(model, prompt, 20, use_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    s2 = generate(model, prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(s1, s2)


def test_generation_past_the_context_length(registry, prompt):
    model = _model(registry, context_length=8)
    out = generate(model, prompt, 20)  # 24 tokens > context 8: a sliding window, no cache
    assert out.shape == (2, 24)
    model.eval()
    idx = prompt
    with torch.no_grad():
        for _ in range(20):
            idx = torch.cat([idx, model(idx[:, -8:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(model):
    # One prompt repeated in many rows: one seeded draw per row samples the next-token distribution.
    n_vocab, rows = 6, 10_000
    prompt = torch.tensor([[60]])
    model.eval()
    with torch.no_grad():
        logits = model(prompt)[0, -1, :n_vocab].float()
    dists = {t: torch.softmax(logits / t, dim=-1) for t in (0.5, 1.0, 2.0)}
    # the three are far apart, so a missing or inverted temperature cannot pass the check below
    assert min((dists[a] - dists[b]).abs().max() for a, b in ((0.5, 1.0), (1.0, 2.0), (0.5, 2.0))) > 0.1
    for t, expected in dists.items():
        out = generate(model, prompt.expand(rows, -1), 1, temperature=t, n_vocab=n_vocab, use_cache=False,
                       generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(out[:, -1], minlength=n_vocab).float() / rows
        assert (freq - expected).abs().max() < 0.02, (t, freq.tolist(), expected.tolist())  # 4 sigma at most
