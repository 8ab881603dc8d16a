"""The conformance suite: every registered component passes it, and it catches broken ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minigpt_core.base.loader as plugins
from minigpt_core import hookimpl, load_registry
from minigpt_core.cli.app import main
from minigpt_core.testing import (
    CHECKS,
    CheckFailed,
    applicable_checks,
    check_component,
    conformance_check,
    parametrize_component_checks,
    run_checks,
)
from minigpt_modern import RotaryEmbedding
from minigpt_torch import SDPAttention


# -- every registered component, first- and third-party ------------------------------------------
@parametrize_component_checks()
def test_component_conformance(entry, check):
    check(entry)


# -- deliberately broken components ------------------------------------------------------------
class PeekingAttention(nn.Module):
    """Causal attention with an off-by-one mask: position t also sees position t + 1."""

    def __init__(self, emb_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(emb_dim, 3 * emb_dim)
        self.out_proj = nn.Linear(emb_dim, emb_dim)

    def forward(self, x, kv_cache=None, return_weights=False):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        allowed = torch.ones(t, t, dtype=torch.bool).tril(diagonal=1)  # j <= t + 1: one too many
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class ForgetfulRotary(RotaryEmbedding):
    """RoPE that ignores the cache offset: every decoding step rotates as if at position 0."""

    def forward(self, x, offset=0):
        return super().forward(x, 0)


class ThirdParty:
    """A plugin object registering components the way an installed distribution would."""

    @hookimpl
    def minigpt_register(self, registry):
        registry.add("attention", "thirdparty.peeking", lambda ctx, p: PeekingAttention(ctx.emb_dim, ctx.n_heads),
                     description="attention that peeks at the next token", capabilities={"causal"})
        registry.add("attention", "thirdparty.sdpa_claims_non_causal",
                     lambda ctx, p: SDPAttention(ctx.emb_dim, ctx.n_heads),
                     description="a causal attention that declares causality as an expected failure",
                     capabilities={"causal"}, expected_failures={"causality": "believed to leak"})
        registry.add("attention", "thirdparty.bad_declaration",
                     lambda ctx, p: SDPAttention(ctx.emb_dim, ctx.n_heads),
                     description="names a check that does not exist", capabilities={"causal"},
                     expected_failures={"causaliti": "typo"})
        registry.add("norm", "thirdparty.rms", lambda ctx, p: nn.RMSNorm(ctx.emb_dim) if hasattr(nn, "RMSNorm")
                     else nn.LayerNorm(ctx.emb_dim), description="torch's own RMSNorm")


@pytest.fixture
def third_party():
    return load_registry(extra_plugins=[("thirdparty", ThirdParty())])


def test_causality_check_catches_an_attention_that_peeks_at_the_next_token(third_party):
    [result] = check_component(third_party.get("attention", "thirdparty.peeking"), registry=third_party,
                               checks=["causality"])
    assert result.status == "fail"
    assert "attention 'thirdparty.peeking'" in result.message
    assert "changing only the input at position 1 changed the output at earlier position 0" in result.message


def test_the_parametrized_check_raises_with_the_component_and_position(third_party):
    decorator = parametrize_component_checks(third_party, "thirdparty.peeking", checks=["causality"])
    [case] = decorator.args[1]
    entry, check = case.values
    assert case.id == "attention:thirdparty.peeking:causality"
    with pytest.raises(CheckFailed, match=r"'thirdparty.peeking'.*earlier position 0"):
        check(entry)


def test_kv_cache_check_catches_a_wrong_position_offset():
    class Plugin:
        @hookimpl
        def minigpt_register(self, registry):
            registry.add("attention", "thirdparty.forgetful",
                         lambda ctx, p: SDPAttention(ctx.emb_dim, ctx.n_heads,
                                                     rotary=ForgetfulRotary(ctx.head_dim, ctx.context_length)),
                         description="RoPE that forgets the offset", capabilities={"causal", "kv_cache"})

    reg = load_registry(extra_plugins=[("forgetful", Plugin())])
    results = {r.check: r for r in check_component(reg.get("attention", "thirdparty.forgetful"), registry=reg)}
    assert results["causality"].status == "pass"  # a full forward pass is fine ...
    assert results["kv_cache"].status == "fail"  # ... but decoding after a prompt is not
    assert "positions 3..3 (after 3 cached)" in results["kv_cache"].message
    assert results["generate_cached"].status == "fail"


def test_a_declared_failure_that_passes_is_reported(third_party):
    results = {r.check: r for r in check_component(
        third_party.get("attention", "thirdparty.sdpa_claims_non_causal"), registry=third_party)}
    assert results["causality"].status == "xpass" and not results["causality"].ok
    assert "remove it from expected_failures" in results["causality"].message
    assert results["declaration"].status == "pass"


def test_declaration_check_rejects_unknown_expected_failures(third_party):
    [result] = check_component(third_party.get("attention", "thirdparty.bad_declaration"), registry=third_party,
                               checks=["declaration"])
    assert result.status == "fail" and "causaliti" in result.message


def test_third_party_components_are_checked_like_first_party_ones(third_party):
    results = run_checks(third_party, "thirdparty.rms")
    assert {r.check for r in results} >= {"forward_fp32", "forward_bf16", "gradients", "state_dict",
                                          "causality", "batch_independence", "trains"}
    assert all(r.status == "pass" for r in results), [r for r in results if r.status != "pass"]


def test_teaching_attentions_show_their_declared_failures(registry):
    results = {r.check: r for r in check_component(registry.get("attention", "book.self_attention_v2"),
                                                   registry=registry)}
    assert results["causality"].status == "xfail" and "not causal by design" in results["causality"].message
    assert results["kv_cache"].status == "xfail"
    assert "trains" not in results  # not for language models: no model is built with it
    assert results["forward_fp32"].status == "pass"


def test_declared_expected_failures_become_strict_xfails(registry):
    decorator = parametrize_component_checks(registry, "book.self_attention_v1")
    marks = {case.id: [m for m in case.marks if m.name == "xfail"] for case in decorator.args[1]}
    [xfail] = marks["attention:book.self_attention_v1:causality"]
    assert xfail.kwargs["strict"] and "not causal" in xfail.kwargs["reason"]
    assert marks["attention:book.self_attention_v1:forward_fp32"] == []


def test_a_new_check_reaches_every_component_of_its_kinds(registry):
    seen = []

    @conformance_check("test_only_probe", "records what it is run on", {"norm"})
    def probe(subject):
        seen.append(subject.entry.name)

    try:
        norms = registry.entries("norm")
        assert all(any(c.name == "test_only_probe" for c in applicable_checks(e)) for e in norms)
        run_checks(registry, kinds=["norm"], checks=["test_only_probe"])
        assert sorted(seen) == sorted(e.name for e in norms)
    finally:
        del CHECKS["test_only_probe"]


def test_equivalence_group_covers_the_same_math_attentions(registry):
    group = ["book.multihead", "book.multihead_wrapper", "torch.sdpa", "torch.fused_qkv", "torch.mha"]
    for name in group:
        [result] = check_component(registry.get("attention", name), registry=registry, checks=["equivalence"])
        assert result.status == "pass", result.message


# -- the command -----------------------------------------------------------------------------
@pytest.fixture
def cli_registry(third_party, monkeypatch):
    """`minigpt check` reads the process-wide registry: point it at one with the third-party plugin."""
    monkeypatch.setattr(plugins, "_default", third_party)


def test_check_command_prints_a_table_and_fails_on_a_broken_component(cli_registry, capsys):
    assert main(["check", "thirdparty.*"]) == 1
    out = capsys.readouterr().out
    assert "thirdparty.peeking" in out and "FAILED: causality" in out
    assert "earlier position 0" in out
    assert main(["check", "torch.sdpa"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("attention") and "torch.sdpa" in line)
    n_pass, n_fail, n_xfail, n_skip, result = row.split()[2:]
    assert int(n_pass) >= 13 and (n_fail, n_xfail, n_skip, result) == ("0", "0", "0", "ok")


def test_check_command_shows_expected_failures_with_reasons(capsys):
    assert main(["check", "book.self_attention_*"]) == 0
    out = capsys.readouterr().out
    assert "ok (2 expected failures)" in out
    assert "book.self_attention_v1 / causality: not causal by design" in out


def test_check_command_user_errors(capsys):
    assert main(["check", "no.such.component"]) == 2
    assert "No registered component matches 'no.such.component'" in capsys.readouterr().err
    assert main(["check", "torch.sdpa", "--check", "causalty"]) == 2
    assert "Unknown conformance check(s) causalty" in capsys.readouterr().err
    assert main(["check", "--list"]) == 0
    assert "kv_cache" in capsys.readouterr().out


def test_check_command_takes_component_params(capsys):
    assert main(["check", "modern.sliding_window", "--param", "window=2", "--check", "kv_cache"]) == 0
    assert "1 components, 1 checks: 1 passed" in capsys.readouterr().out
    assert main(["check", "modern.*", "--param", "window=2"]) == 2  # modern.gqa takes no window
    assert "does not fit attention 'modern.alibi'" in capsys.readouterr().err
