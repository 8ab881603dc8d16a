"""Experiment specs: presets, TOML files, overrides, validation errors with paths, round trips."""

import json

import pytest

from minigpt_core import (
    PRESETS,
    ExperimentSpec,
    SpecError,
    build_model,
    dump_spec,
    load_spec,
    parse_spec,
    spec_from_preset,
)
from minigpt_core.base import toml as _toml
from minigpt_core.spec import apply_overrides, resolve_components

TINY = {"vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2}


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_presets_have_the_gpt2_shapes():
    m = spec_from_preset("gpt2-124m").model
    assert (m.vocab_size, m.context_length, m.emb_dim, m.n_heads, m.n_layers) == (50257, 1024, 768, 12, 12)
    assert m.drop_rate == 0.1 and m.qkv_bias is False
    shapes = {k: (v["emb_dim"], v["n_heads"], v["n_layers"]) for k, v in PRESETS.items()}
    assert shapes["gpt2-medium"] == (1024, 16, 24)
    assert shapes["gpt2-large"] == (1280, 20, 36)
    assert shapes["gpt2-xl"] == (1600, 25, 48)
    assert "tiny" in PRESETS


def test_file_starts_from_a_preset_and_overrides_fields(tmp_path):
    path = write(tmp_path, '''
name = "ablation"
preset = "gpt2-124m"
[model]
n_layers = 2
[model.norm.params]
eps = 1e-6
''')
    spec = load_spec(path)
    assert spec.name == "ablation" and spec.model.n_layers == 2 and spec.model.emb_dim == 768
    assert spec.model.norm.name == "torch.layernorm" and spec.model.norm.params == {"eps": 1e-6}


def test_command_line_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, 'preset = "tiny"\n')
    spec = load_spec(path, overrides=["model.n_layers=3", "model.attention.name=book.causal", "seed=7"])
    assert (spec.model.n_layers, spec.model.attention.name, spec.seed) == (3, "book.causal", 7)
    with pytest.raises(SpecError, match="model.n_layers"):
        load_spec(path, overrides=["model.n_layers=zero"])
    with pytest.raises(SpecError, match="section.field=value"):
        apply_overrides({}, ["model.n_layers"])


def test_toml_round_trip_is_exact(tmp_path):
    spec = spec_from_preset("tiny", model={"n_layers": 3, "norm": {"name": "book.layernorm", "params": {"eps": 1e-6}},
                                           "init": {"name": "gpt2.normal", "params": {"std": 0.01}}})
    text = dump_spec(spec)
    again = parse_spec(_toml.loads(text))
    assert again == spec
    assert dump_spec(again) == text
    path = write(tmp_path, text)
    assert dump_spec(load_spec(path)) == path.read_text()


def test_unknown_component_error(tmp_path, registry):
    path = write(tmp_path, 'preset = "tiny"\n[model.attention]\nname = "book.multihed"\n')
    with pytest.raises(SpecError) as err:
        load_spec(path, registry=registry)
    (where, reason), = err.value.problems
    assert where == "model.attention.name"
    assert "attention" in reason and "book.multihed" in reason and "Did you mean 'book.multihead'" in reason
    assert all(n in reason for n in registry.names("attention"))
    assert "minigpt plugins" in reason


def test_bad_params_report_the_path_and_the_reason(registry):
    with pytest.raises(SpecError) as err:
        spec_from_preset("tiny", registry=registry, model={
            "norm": {"params": {"eps": -1}}, "feedforward": {"params": {"expansoin": 4}}})
    problems = dict(err.value.problems)
    assert "greater than 0" in problems["model.norm.params.eps"]
    # a component's params are not in `minigpt schema`: the message lists them
    assert problems["model.feedforward.params.expansoin"] == (
        "unknown param (did you mean 'model.feedforward.params.expansion'? the feedforward 'book.feedforward' "
        "takes: expansion)")


def test_cross_field_checks():
    with pytest.raises(SpecError, match=r"emb_dim \(100\) must be divisible by n_heads \(12\)"):
        spec_from_preset("gpt2-124m", model={"emb_dim": 100})
    with pytest.raises(SpecError, match="max_positions.*smaller than context_length"):
        spec_from_preset("tiny", model={"positional": {"params": {"max_positions": 64}}})
    with pytest.raises(SpecError, match="model.drop_rate"):
        spec_from_preset("tiny", model={"drop_rate": 1.5})
    with pytest.raises(SpecError, match="unknown preset"):
        parse_spec({"preset": "gpt5"})
    with pytest.raises(SpecError, match="model.n_layrs: unknown field"):
        parse_spec({"model": {"n_layrs": 2}})


def test_teaching_attentions_are_refused_for_language_models(registry):
    for name in ("book.self_attention_v1", "book.self_attention_v2"):
        with pytest.raises(SpecError, match="not causal|non-causal") as err:
            spec_from_preset("tiny", registry=registry, model={"attention": {"name": name}})
        assert err.value.problems[0][0] == "model.attention.name"


def test_validation_happens_before_building(registry):
    built = []
    book_norm = registry.get("norm", "book.layernorm")
    registry.add("norm", "probe.norm", lambda ctx, p: built.append(ctx) or book_norm.build(ctx),
                 description="records that it was built")
    spec = ExperimentSpec.model_validate({"model": {**TINY, "norm": {"name": "probe.norm"},
                                                    "activation": {"name": "nope.act"}},
                                          "tokenizer": {"name": "char"}})
    with pytest.raises(SpecError, match="model.activation.name"):
        build_model(spec.resolve(registry))
    assert built == []
    build_model(spec.model_copy(update={"model": spec.model.model_copy(
        update={"activation": spec.model.activation.model_copy(update={"name": "book.gelu"})})}).resolve(registry))
    assert len(built) == 2 * TINY["n_layers"] + 1  # two per block and the final norm


def test_missing_and_malformed_files_are_user_errors(tmp_path):
    with pytest.raises(SpecError, match="no such experiment file"):
        load_spec(tmp_path / "missing.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "model = [unclosed"))


def test_json_schema_names_every_section_and_slot():
    schema = ExperimentSpec.model_json_schema()
    model = schema["$defs"]["ModelSpec"]["properties"]
    for field in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
                  "tie_weights", "attention", "norm", "activation", "feedforward", "positional", "block", "init"):
        assert field in model
    json.dumps(schema)


def test_resolved_components_carry_validated_params(registry):
    spec = spec_from_preset("tiny", registry=registry, model={"feedforward": {"params": {"expansion": 2}}})
    resolved = resolve_components(spec, registry)
    assert resolved["feedforward"].params.expansion == 2
    assert resolved["attention"].entry.name == "book.multihead"
