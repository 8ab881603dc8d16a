"""Registries: entries, wildcard listing, unknown-name messages, what registration refuses."""

import pytest
from pydantic import BaseModel, ConfigDict

from minigpt_core import ComponentRegistry, DuplicateComponentError, UnknownComponentError


class WindowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = 8


def test_book_entries_carry_origin_description_and_capabilities(registry):
    entry = registry.get("attention", "book.multihead")
    assert entry.plugin == "book" and entry.distribution == "minigpt" and entry.version
    assert {"causal", "kv_cache", "attn_weights"} <= entry.capabilities
    assert entry.description and "\n" not in entry.description
    assert entry.params.model_config["extra"] == "forbid"
    assert registry.get("norm", "book.layernorm").make_params({}).eps == 1e-5


def test_every_core_kind_has_a_book_component(registry):
    for kind in ("attention", "norm", "activation", "feedforward", "positional", "block", "init"):
        assert any(e.plugin == "book" for e in registry.entries(kind)), kind


def test_wildcard_listing(registry):
    names = [e.name for e in registry.entries("attention", "book.self_attention_v*")]
    assert names == ["book.self_attention_v1", "book.self_attention_v2"]
    assert {e.kind for e in registry.entries(None, "book.*")} >= {"attention", "norm", "block"}
    assert registry.entries("attention", "nothing.*") == []


def test_unknown_name_lists_close_matches_and_everything_available(registry):
    with pytest.raises(UnknownComponentError) as err:
        registry.get("attention", "book.multihed")
    msg = str(err.value)
    assert "'book.multihead'" in msg.split("Available")[0]  # the suggestion
    for name in registry.names("attention"):
        assert name in msg
    assert "minigpt plugins" in msg


def test_unknown_kind_is_a_user_error(registry):
    with pytest.raises(UnknownComponentError, match="Kinds are"):
        registry.entries("attn")


def test_duplicate_names_name_both_sources():
    reg = ComponentRegistry()
    reg.add("norm", "x.norm", lambda c, p: None, description="one", plugin="first", distribution="dist-a", version="1")
    with pytest.raises(DuplicateComponentError) as err:
        reg.add("norm", "x.norm", lambda c, p: None, description="two", plugin="second", distribution="dist-b", version="2")
    assert "first (dist-a 1)" in str(err.value) and "second (dist-b 2)" in str(err.value)


def test_registration_refuses_params_models_that_accept_unknown_keys():
    class Loose(BaseModel):
        window: int = 3

    reg = ComponentRegistry()
    with pytest.raises(ValueError, match="extra='forbid'"):
        reg.add("attention", "x.loose", lambda c, p: None, params=Loose, description="d")
    with pytest.raises(ValueError, match="description"):
        reg.add("attention", "x.nodesc", lambda c, p: None, description="  ")
    with pytest.raises(ValueError, match="lowercase"):
        reg.add("attention", "X.Bad", lambda c, p: None, description="d")
    entry = reg.add("attention", "x.window", lambda c, p: p.window, params=WindowParams, description="d")
    assert entry.build(None, {"window": 3}) == 3
