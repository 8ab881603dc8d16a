"""Behaviour specific to the torch.* and modern.* components (the generic checks are in test_conformance)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt_book import FeedForward, LayerNorm, MultiHeadAttention
from minigpt_core import SpecError, build_model, load_registry, parse_spec
from minigpt_core.model.gpt import LayerKVCache
from minigpt_core.testing import check_component
from minigpt_modern import (
    DyT,
    GatedFeedForward,
    MoEFeedForward,
    ParallelBlock,
    PostNormBlock,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_slopes,
    glu_hidden_dim,
)
from minigpt_torch import FlexAttention, FusedQKVAttention, SDPAttention, TorchMultiheadAttention, attention_bias
from training_utils import cli

ROOT = Path(__file__).resolve().parents[1]
C, H, T = 32, 4, 10


def _x(b=2, t=T, seed=0):
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(seed))


def _copy_linear(dst, src):
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


def _assert_all_pass(results):
    bad = [r for r in results if r.status not in ("pass", "skip")]
    assert not bad, [f"{r.check}: {r.status} {r.message}" for r in bad]
    assert sum(r.status == "pass" for r in results) >= 10


def _spec(model, registry):
    return parse_spec({"preset": "tiny", "model": model}, registry=registry)


# -- the registry holds everything the issue lists -----------------------------------------------
EXPECTED = {
    "attention": {"torch.sdpa", "torch.fused_qkv", "torch.mha", "modern.gqa", "modern.mqa", "modern.rope",
                  "modern.alibi", "modern.sliding_window"},
    "norm": {"torch.layernorm", "modern.rmsnorm", "modern.dyt"},
    "activation": {"torch.gelu", "torch.silu", "torch.relu", "modern.relu2"},
    "feedforward": {"modern.swiglu", "modern.geglu", "modern.moe"},
    "positional": {"modern.sinusoidal", "modern.none"},
    "block": {"modern.post_norm", "modern.parallel"},
}


def test_zoo_components_are_registered(registry):
    for kind, names in EXPECTED.items():
        assert names <= set(registry.names(kind)), kind
    # FlexAttention is either registered or declared unavailable with a reason.
    flex = [u for u in registry.unavailable if u.name == "torch.flex"]
    assert ("attention", "torch.flex") in registry or (flex and "FlexAttention" in flex[0].reason)


def test_components_command_shows_params_and_capabilities(capsys, isolated_plugins):
    status, out, err = cli(capsys, "components", "attention", "modern.*")  # in-process: test_cli runs the script
    assert status == 0, err
    assert "modern.rope" in out and "base=10000.0, fraction=1.0" in out
    assert "modern.gqa" in out and "n_kv_heads=2" in out
    assert "capabilities: attn_weights, causal, kv_cache, multihead" in out


def test_every_first_party_causal_attention_has_a_kv_cache(registry):
    first_party = [e for e in registry.entries("attention") if e.plugin in ("book", "torch", "modern")]
    assert len(first_party) >= 11
    for e in first_party:
        if e.has("causal"):
            assert e.has("kv_cache"), e.name


# -- attention ----------------------------------------------------------------------------------
def test_sdpa_builds_the_books_weights_and_logits(registry):
    """Same creation order as MultiHeadAttention: one seed gives the same GPT, so the same logits."""
    idx = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("book.multihead", "torch.sdpa"):
        model = build_model(_spec({"attention": {"name": name}, "n_layers": 2}, registry)).eval()
        with torch.no_grad():
            logits[name] = model(idx)
    torch.testing.assert_close(logits["torch.sdpa"], logits["book.multihead"], atol=1e-5, rtol=1e-5)


def test_fused_qkv_and_mha_layouts_round_trip_through_the_canonical_state():
    torch.manual_seed(0)
    book = MultiHeadAttention(C, C, 16, 0.0, H, qkv_bias=True).eval()
    canonical = {k: v for k, v in book.state_dict().items() if k != "mask"}
    for module in (FusedQKVAttention(C, H, qkv_bias=True), TorchMultiheadAttention(C, H, qkv_bias=True)):
        module.eval().load_canonical_state(canonical)
        assert {k: v.shape for k, v in module.canonical_state().items()} == {k: v.shape for k, v in canonical.items()}
        for k, v in module.canonical_state().items():
            assert torch.equal(v, canonical[k]), k
        torch.testing.assert_close(module(_x()), book(_x()), atol=1e-6, rtol=1e-5)


def test_mha_without_qkv_bias_has_only_the_output_bias():
    m = TorchMultiheadAttention(C, H, qkv_bias=False)
    assert m.mha.in_proj_bias is None and m.mha.out_proj.bias is not None
    assert set(m.canonical_state()) == {"W_query.weight", "W_key.weight", "W_value.weight",
                                        "out_proj.weight", "out_proj.bias"}


def test_gqa_with_as_many_kv_heads_as_heads_is_multihead_attention():
    torch.manual_seed(0)
    book = MultiHeadAttention(C, C, 16, 0.0, H).eval()
    gqa = SDPAttention(C, H, n_kv_heads=H).eval()
    gqa.load_state_dict({k: v for k, v in book.state_dict().items() if k != "mask"})
    torch.testing.assert_close(gqa(_x()), book(_x()), atol=1e-6, rtol=1e-5)


def test_gqa_query_heads_share_their_groups_key_value_head():
    """n_kv_heads=2 of 4: query heads 0,1 use K/V head 0 and heads 2,3 use K/V head 1."""
    torch.manual_seed(0)
    gqa = SDPAttention(C, H, n_kv_heads=2).eval()
    full = SDPAttention(C, H).eval()
    d = C // H
    with torch.no_grad():
        _copy_linear(full.W_query, gqa.W_query)
        _copy_linear(full.out_proj, gqa.out_proj)
        for proj in ("W_key", "W_value"):
            heads = getattr(gqa, proj).weight.view(2, d, C)
            getattr(full, proj).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(C, C))
    torch.testing.assert_close(gqa(_x()), full(_x()), atol=1e-6, rtol=1e-5)


def test_gqa_and_mqa_cache_only_their_key_value_heads():
    for n_kv in (2, 1):
        m = SDPAttention(C, H, n_kv_heads=n_kv).eval()
        cache = LayerKVCache(16)
        m(_x(t=5), kv_cache=cache)
        assert cache.k.shape == (2, n_kv, 16, C // H) and cache.length == 5


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=8, max_positions=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(m, n):
        return (rope(q, offset=m) * rope(k, offset=n)).sum().item()

    assert score(7, 3) == pytest.approx(score(30, 26), abs=1e-5)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-6)  # position 0 is no rotation
    assert abs(score(7, 3) - score(7, 5)) > 1e-3  # but the distance matters
    # A rotation keeps each pair's length.
    torch.testing.assert_close(rope(q, 11).norm(), q.norm())


def test_rope_fraction_rotates_only_the_leading_features():
    rope = RotaryEmbedding(head_dim=8, max_positions=16, fraction=0.5)
    x = torch.randn(1, 2, 5, 8)
    y = rope(x, offset=3)
    assert rope.rot_dim == 4
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_rope_base_sets_the_frequencies():
    x = torch.ones(1, 1, 1, 4)
    slow = RotaryEmbedding(4, 16, base=1e6)(x, offset=1)
    fast = RotaryEmbedding(4, 16, base=10.0)(x, offset=1)
    # Pair 0 always turns by 1 radian per position; pair 1 by base^(-1/2).
    expect_pair1 = lambda base: (math.cos(base ** -0.5) - math.sin(base ** -0.5))  # noqa: E731
    assert slow[0, 0, 0, 1].item() == pytest.approx(expect_pair1(1e6), abs=1e-6)
    assert fast[0, 0, 0, 1].item() == pytest.approx(expect_pair1(10.0), abs=1e-6)
    assert slow[0, 0, 0, 0].item() == pytest.approx(math.cos(1) - math.sin(1), abs=1e-6)


def _paper_alibi_slopes(n):
    # ALiBi's reference recipe, written out independently of the implementation.
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_alibi_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 12, 16, 25])
def test_alibi_slopes(n):
    assert alibi_slopes(n).tolist() == pytest.approx(_paper_alibi_slopes(n), rel=1e-6)


def test_alibi_slopes_known_values():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -i for i in range(1, 9)])
    assert alibi_slopes(4).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])


def test_alibi_weights_decay_with_distance_by_the_head_slope():
    m = SDPAttention(C, H, alibi_slopes=alibi_slopes(H)).eval()
    with torch.no_grad():
        m.W_query.weight.zero_()  # all scores 0: only the ALiBi bias is left
    _, w = m(_x(t=6), return_weights=True)
    for h, slope in enumerate(alibi_slopes(H).tolist()):
        for i in range(6):
            expect = torch.softmax(-slope * torch.arange(i, -1, -1, dtype=torch.float32), dim=0)
            torch.testing.assert_close(w[0, h, i, : i + 1], expect, atol=1e-6, rtol=1e-5)
            assert torch.all(w[0, h, i, i + 1:] == 0)


def test_attention_bias_window_mask():
    bias = attention_bias(4, 6, past=2, window=3)
    visible = (bias == 0).int().tolist()
    # Query i is at position 2 + i and sees positions 2 + i - 2 .. 2 + i.
    assert visible == [[1, 1, 1, 0, 0, 0],
                       [0, 1, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 1, 1, 1]]
    assert torch.all(bias[bias != 0] == -torch.inf)


def test_sliding_window_attention_weights_stay_in_the_window():
    m = SDPAttention(C, H, window=3).eval()
    _, w = m(_x(t=8), return_weights=True)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    outside = (j > i) | (i - j >= 3)
    assert torch.all(w[..., outside] == 0) and torch.all(w[..., ~outside] > 0)


@pytest.mark.parametrize("name, params", [
    ("modern.sliding_window", {"window": 3}),  # smaller than the checks' sequences: the window matters
    ("modern.sliding_window", {"window": 2, "qk_norm": True}),  # window 1: queries get no gradient (one key)
    ("modern.rope", {"fraction": 0.5, "base": 500.0, "n_kv_heads": 2}),
    ("modern.alibi", {"n_kv_heads": 1, "qk_norm": True}),
    ("modern.gqa", {"n_kv_heads": 4}),
])
def test_attention_options_pass_every_check(registry, name, params):
    _assert_all_pass(check_component(registry.get("attention", name), registry=registry, params=params))


def test_qk_norm_normalises_queries_and_keys(registry):
    m = registry.get("attention", "modern.gqa").build(_ctx(registry), {"qk_norm": True})
    assert isinstance(m.q_norm, RMSNorm) and isinstance(m.k_norm, RMSNorm)
    assert m.q_norm.weight.shape == (C // H,)


def _ctx(registry, **model):
    from minigpt_core.model.gpt import BuildContext
    from minigpt_core.testing import Subject

    entry = registry.get("attention", "book.multihead")
    spec = Subject(entry, registry).model_spec(**model)
    return BuildContext(spec, Subject(entry, registry).components(spec), 0)


def test_flex_attention_forward_matches_sdpa_on_cpu():
    """FlexAttention cannot train on CPU (no backward there) but its forward runs: same math as SDPA."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    for window in (None, 3):
        torch.manual_seed(0)
        ref = SDPAttention(C, H, window=window).eval()
        flex = FlexAttention(C, H, window=window, compile=False).eval()
        flex.load_state_dict(ref.state_dict())
        x = _x(t=12)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            torch.testing.assert_close(flex(x), ref(x), atol=1e-5, rtol=1e-5)
            cache, pieces = LayerKVCache(16), []
            for start, end in ((0, 5), (5, 6), (6, 9), (9, 12)):
                pieces.append(flex(x[:, start:end], kv_cache=cache))
            torch.testing.assert_close(torch.cat(pieces, dim=1), ref(x), atol=1e-5, rtol=1e-5)


def test_component_checks_reject_bad_head_counts(registry):
    with pytest.raises(SpecError) as err:
        _spec({"attention": {"name": "modern.gqa", "params": {"n_kv_heads": 3}}}, registry)
    assert "model.attention" in str(err.value) and "divisible by n_kv_heads (3)" in str(err.value)
    with pytest.raises(SpecError) as err:  # head_dim 32 * 0.03 = 0 rotary dims
        _spec({"attention": {"name": "modern.rope", "params": {"fraction": 0.03}}}, registry)
    assert "model.attention" in str(err.value) and "even" in str(err.value)
    with pytest.raises(SpecError) as err:  # emb 130 / 2 heads = 65: odd head_dim
        _spec({"emb_dim": 130, "n_heads": 2, "attention": {"name": "modern.rope"}}, registry)
    assert "65" in str(err.value)
    with pytest.raises(SpecError) as err:
        _spec({"feedforward": {"name": "modern.moe", "params": {"n_experts": 2, "top_k": 3}}}, registry)
    assert "model.feedforward" in str(err.value) and "top_k (3)" in str(err.value)


def test_validate_reports_the_component_check_with_its_path(capsys):
    status, _, err = cli(capsys, "validate", ROOT / "experiments" / "tiny.toml", "--set",
                         "model.attention.name=modern.gqa", "--set", "model.attention.params.n_kv_heads=3")
    assert status == 2 and "Traceback" not in err
    assert "model.attention: modern.gqa: n_heads (4) must be divisible by n_kv_heads (3)" in err


# -- norms and activations ----------------------------------------------------------------------
def test_rmsnorm_formula():
    x = torch.randn(3, 5, C)
    norm = RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, C))
    expect = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * torch.linspace(0.5, 2, C)
    torch.testing.assert_close(norm(x), expect)


def test_dyt_formula():
    x = torch.randn(3, 5, C)
    dyt = DyT(C, alpha_init=0.7)
    assert dyt.alpha.item() == pytest.approx(0.7)
    with torch.no_grad():
        dyt.weight.uniform_(0.5, 1.5)
        dyt.bias.uniform_(-1, 1)
    torch.testing.assert_close(dyt(x), dyt.weight * torch.tanh(0.7 * x) + dyt.bias)


def test_torch_layernorm_equals_the_books(registry):
    ctx = _ctx(registry)
    ours, book = registry.get("norm", "torch.layernorm").build(ctx), LayerNorm(C)
    with torch.no_grad():
        book.scale.uniform_(0.5, 1.5)
        book.shift.uniform_(-1, 1)
        ours.weight.copy_(book.scale)
        ours.bias.copy_(book.shift)
    x = torch.randn(2, 5, C)
    torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


def test_activations(registry):
    ctx = _ctx(registry)
    x = torch.linspace(-4, 4, 101)
    act = {n: registry.get("activation", n).build(ctx) for n in
           ("torch.gelu", "torch.silu", "torch.relu", "modern.relu2", "book.gelu")}
    torch.testing.assert_close(act["torch.gelu"](x), x * 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(act["torch.silu"](x), x * torch.sigmoid(x))
    torch.testing.assert_close(act["torch.relu"](x), x.clamp(min=0))
    torch.testing.assert_close(act["modern.relu2"](x), x.clamp(min=0) ** 2)
    # The exact GELU is not the book's tanh approximation (close, but not equal).
    diff = (act["torch.gelu"](x) - act["book.gelu"](x)).abs().max().item()
    assert 1e-5 < diff < 1e-2


# -- feed-forwards ------------------------------------------------------------------------------
def _n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("emb", [32, 768])
@pytest.mark.parametrize("bias", [False, True])
def test_glu_default_hidden_keeps_the_4x_mlp_parameter_count(emb, bias):
    mlp = _n_params(FeedForward(emb, 4 * emb))
    glu = _n_params(GatedFeedForward(emb, glu_hidden_dim(emb, bias), torch.nn.SiLU(), bias))
    per_unit = 3 * emb + (2 if bias else 0)
    assert abs(glu - mlp) <= per_unit / 2  # as close as a whole hidden unit allows


def test_swiglu_and_geglu(registry):
    ctx = _ctx(registry)
    swiglu = registry.get("feedforward", "modern.swiglu").build(ctx)
    geglu = registry.get("feedforward", "modern.geglu").build(ctx, {"hidden_dim": 48, "bias": True})
    assert swiglu.gate.out_features == glu_hidden_dim(C) and swiglu.gate.bias is None
    assert geglu.gate.out_features == 48 and geglu.down.bias is not None
    x = torch.randn(2, 5, C)
    torch.testing.assert_close(swiglu(x), swiglu.down(F.silu(swiglu.gate(x)) * swiglu.up(x)))
    torch.testing.assert_close(geglu(x), geglu.down(F.gelu(geglu.gate(x)) * geglu.up(x)))


def _moe(top_k=2, n_experts=4, weight=0.01):
    torch.manual_seed(0)
    return MoEFeedForward(C, n_experts, top_k, lambda: FeedForward(C, 2 * C), aux_loss_weight=weight)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_output_is_the_gated_sum_of_each_tokens_top_k_experts(top_k):
    moe = _moe(top_k)
    x = torch.randn(2, 6, C)
    out = moe(x)
    for b in range(2):
        for t in range(6):
            probs = torch.softmax(moe.router(x[b, t]), dim=-1)
            gate, chosen = probs.topk(top_k)
            if top_k > 1:
                gate = gate / gate.sum()
            expect = sum(g * moe.experts[e](x[b, t]) for g, e in zip(gate, chosen.tolist()))
            torch.testing.assert_close(out[b, t], expect, atol=1e-5, rtol=1e-5)


def test_moe_load_balancing_loss():
    moe = _moe(top_k=2, weight=0.5)
    x = torch.randn(3, 7, C)
    moe(x)
    probs = torch.softmax(moe.router(x.reshape(-1, C)), dim=-1)
    chosen = probs.topk(2).indices
    share = torch.stack([(chosen == e).float().sum() for e in range(4)]) / chosen.numel()
    torch.testing.assert_close(moe.aux_loss, 0.5 * 4 * (share * probs.mean(0)).sum())
    # A router that cannot tell tokens apart: uniform probabilities give E * sum(f_e / E) = 1.
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(0.5)


def test_moe_aux_loss_reaches_the_model_and_its_gradient_reaches_the_router(registry):
    model = build_model(_spec({"n_layers": 2, "feedforward": {"name": "modern.moe", "params": {
        "aux_loss_weight": 0.1}}}, registry))
    assert model.aux_loss() is None  # nothing before a forward pass
    model(torch.randint(0, 100, (2, 8)))
    layers = [b.ff.aux_loss for b in model.trf_blocks]
    torch.testing.assert_close(model.aux_loss(), sum(layers))
    model.aux_loss().backward()
    assert all(b.ff.router.weight.grad.abs().sum() > 0 for b in model.trf_blocks)


# -- positions and blocks -----------------------------------------------------------------------
def test_sinusoidal_positions_formula():
    pe = SinusoidalPositionalEmbedding(50, 6)
    p = torch.arange(50, dtype=torch.float64)[:, None]
    w = 10000.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    torch.testing.assert_close(pe(torch.arange(50))[:, 0::2], torch.sin(p * w).float())
    torch.testing.assert_close(pe(torch.arange(50))[:, 1::2], torch.cos(p * w).float())
    assert len(pe.state_dict()) == 0


def test_no_positional_embedding(registry):
    model = build_model(_spec({"positional": {"name": "modern.none"}, "attention": {"name": "modern.rope"}},
                              registry))
    assert model.pos_emb is None and model.trf_blocks[0].att.rotary is not None


def test_post_norm_and_parallel_blocks(registry):
    ctx = _ctx(registry)
    x = torch.randn(2, 6, C)
    post = PostNormBlock(ctx).eval()
    h = post.norm1(x + post.att(x))
    torch.testing.assert_close(post(x), post.norm2(h + post.ff(h)))
    out = post(x)  # ends in a LayerNorm with unit scale and zero shift
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    par = ParallelBlock(ctx).eval()
    assert not hasattr(par, "norm2")
    h = par.norm1(x)
    torch.testing.assert_close(par(x), x + par.att(h) + par.ff(h))


def test_block_layouts_build_their_parts_from_the_slots(registry):
    model = build_model(_spec({"n_layers": 1, "block": {"name": "modern.parallel"},
                               "attention": {"name": "modern.gqa"}, "norm": {"name": "modern.rmsnorm"},
                               "feedforward": {"name": "modern.swiglu"}}, registry))
    block = model.trf_blocks[0]
    assert isinstance(block, ParallelBlock) and block.att.n_kv_heads == 2
    assert isinstance(block.norm1, RMSNorm) and isinstance(block.ff, GatedFeedForward)


# -- the quickstart experiment with each causal attention -----------------------------------------
CAUSAL_ATTENTIONS = [e.name for e in load_registry().entries("attention") if e.has("causal") and not e.not_for_lm]
TINY_BUDGET = ["train.max_steps=12", "train.batch_size=8", "train.warmup_steps=2", "train.eval_every=0",
               "train.eval_batches=1", "train.sample_tokens=0", "train.save_every=0", "train.log_every=1",
               "wandb.mode=disabled", "data.source.params.docstrings=false", "train.threads=1"]


@pytest.fixture(scope="module")
def quickstart_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quickstart-cache")  # python-docs is tokenized once for all runs


@pytest.mark.slow
@pytest.mark.parametrize("attention", CAUSAL_ATTENTIONS)
def test_quickstart_trains_with_each_causal_attention(attention, tmp_path, quickstart_cache):
    """experiments/quickstart.toml with another attention and a tiny budget (--set overrides)."""
    from minigpt_core import load_spec
    from minigpt_core.train import train

    quickstart = ROOT / "experiments" / "quickstart.toml"
    experiment = tmp_path / "quickstart.toml"
    experiment.write_text(quickstart.read_text(encoding="utf-8"))
    spec = load_spec(experiment, overrides=TINY_BUDGET + [f"model.attention.name={attention}",
                                                          f"train.out_dir={tmp_path / 'runs'}",
                                                          f"data.cache_dir={quickstart_cache}"])
    assert spec.model.attention.name == attention
    threads = torch.get_num_threads()
    try:
        result = train(spec, progress=False)
    finally:
        torch.set_num_threads(threads)  # the trainer applies train.threads process-wide
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(128) = 4.85 towards the character statistics


@pytest.mark.parametrize("options", [{"alibi_slopes": alibi_slopes(H)}, {"window": 3}, {"n_kv_heads": 2}, {}])
def test_masked_variants_run_on_the_fused_kernel(options):
    """A mask SDPA's fused kernel cannot take (e.g. a 3-D one) silently falls back to the math kernel,
    which materialises the (B, H, T, T) scores; restricting SDPA to the fused kernel makes that an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = SDPAttention(C, H, **options)
    x = _x(t=12).requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        m(x).sum().backward()
        with torch.no_grad():
            cache = LayerKVCache(16)
            m(x[:, :5], kv_cache=cache)
            m(x[:, 5:7], kv_cache=cache)  # several queries after a prefix: an explicit mask
    assert x.grad is not None
