"""Hugging Face GPT-2 <-> minigpt: import, export and logit parity for every GPT-2 compatible attention.

The reference is transformers' own GPT2LMHeadModel, randomly initialised and saved with
save_pretrained; nothing is downloaded.
"""

import json
import pickle
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from minigpt_core import CheckpointError, ExperimentSpec, build_model, load_registry, parse_spec  # noqa: E402
from minigpt_core.checkpoints.checkpoint import save_model  # noqa: E402
from minigpt_core.assembly import load_init_from, load_model  # noqa: E402
from minigpt_core.model.generate import generate  # noqa: E402
from minigpt_core.pretrained import (  # noqa: E402
    PretrainedError,
    export_hf,
    import_hf,
    resolve_hf_source,
)

# Every registered attention that claims GPT-2 compatibility is covered, including plugins' own.
GPT2_ATTENTIONS = [e.name for e in load_registry().entries("attention") if e.has("gpt2") and not e.not_for_lm]
TOL = 1e-4


def _small_config(**kw):
    # initializer_range 0.2 (not 0.02) gives peaked logits, so greedy decoding varies and near-ties
    # between the top two tokens (where 1e-6 noise could flip argmax) do not occur.
    base = dict(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                bos_token_id=None, eos_token_id=None)
    return GPT2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_small_config()).eval()
    directory = tmp_path_factory.mktemp("hf-small")
    model.save_pretrained(directory)
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    prompt = idx[:1, :5]
    with torch.no_grad():
        logits = model(idx).logits
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                do_sample=False)
    assert greedy.shape == (1, 35) and len(set(greedy[0, 5:].tolist())) > 10  # a non-degenerate reference
    return {"dir": directory, "model": model, "idx": idx, "logits": logits, "prompt": prompt, "greedy": greedy}


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_gpt2_attentions_are_found():
    assert "book.multihead" in GPT2_ATTENTIONS


@pytest.mark.parametrize("attention", GPT2_ATTENTIONS)
def test_import_matches_transformers_logits_and_greedy_generation(hf_small, registry, attention):
    model, spec = import_hf(hf_small["dir"], registry, attention={"name": attention})
    m = spec.model
    assert (m.attention.name, m.qkv_bias, m.tie_weights, m.emb_dim, m.n_layers, m.context_length) == \
        (attention, True, True, 64, 2, 64)
    assert m.norm.params == {"eps": 1e-5} and m.activation.name == "torch.gelu_tanh"
    model.eval()
    with torch.no_grad():
        assert _max_diff(model(hf_small["idx"]), hf_small["logits"]) <= TOL
    out = generate(model, hf_small["prompt"], 30, temperature=0.0)
    assert torch.equal(out, hf_small["greedy"])
    if model.supports_kv_cache:  # the default above used the cache; recomputing agrees
        assert torch.equal(generate(model, hf_small["prompt"], 30, use_cache=False), hf_small["greedy"])


@pytest.mark.parametrize("attention", GPT2_ATTENTIONS)
def test_export_loads_in_transformers_with_identical_logits(hf_small, registry, tmp_path, attention):
    model, spec = import_hf(hf_small["dir"], registry, attention={"name": attention})
    export_hf(model, spec, tmp_path / "out")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _max_diff(reloaded(hf_small["idx"]).logits, hf_small["logits"]) <= 1e-6
    # The gpt2 tokenizer's files come along, under the names transformers reads.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("hello world<|endoftext|>")["input_ids"] == [31373, 995, 50256]


@pytest.mark.parametrize("tie", [True, False])
def test_book_recipe_model_exports_exactly(registry, tmp_path, tie):
    """A model trained here (no q/k/v bias, maybe an untied head) is still GPT-2 to transformers."""
    spec = parse_spec({"seed": 7, "model": {
        "vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "qkv_bias": False, "tie_weights": tie, "init": {"name": "gpt2.normal", "params": {"std": 0.2}},
        "norm": {"params": {"eps": 1e-6}}, "feedforward": {"params": {"expansion": 2}}}}, registry=registry)
    model = build_model(spec).eval()
    export_hf(model, spec, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["n_inner"], config["layer_norm_epsilon"]) == (tie, 64, 1e-6)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert _max_diff(hf(idx).logits, model(idx)) <= TOL
    # And back: the re-import (now with zero q/k/v biases) computes the same function.
    again, again_spec = import_hf(tmp_path, registry)
    assert again_spec.model.tie_weights == tie and again_spec.model.feedforward.params == {"expansion": 2}
    with torch.no_grad():
        assert _max_diff(again.eval()(idx), model(idx)) <= TOL


def test_export_refuses_non_gpt2_components(registry, tmp_path):
    spec = parse_spec({"model": {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 2,
                                 "n_layers": 1, "attention": {"name": "book.causal"}}}, registry=registry)
    with pytest.raises(PretrainedError) as err:
        export_hf(build_model(spec), spec, tmp_path / "out")
    assert "model.attention" in str(err.value) and "book.causal" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_import_refuses_non_gpt2_attention(hf_small, registry):
    with pytest.raises(PretrainedError, match="model.attention: 'book.causal'"):
        import_hf(hf_small["dir"], registry, attention={"name": "book.causal"})


def test_pytorch_model_bin_is_loaded_without_unpickling_objects(hf_small, registry, tmp_path):
    (tmp_path / "config.json").write_text((hf_small["dir"] / "config.json").read_text())
    torch.save(hf_small["model"].state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = import_hf(tmp_path, registry)
    with torch.no_grad():
        assert _max_diff(model.eval()(hf_small["idx"]), hf_small["logits"]) <= TOL

    class Payload:  # unpickling this would run code
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        import_hf(tmp_path, registry)


def test_import_refuses_other_architectures(hf_small, registry, tmp_path):
    config = json.loads((hf_small["dir"] / "config.json").read_text())
    for change, message in [({"activation_function": "relu"}, "activation_function 'relu'"),
                            ({"model_type": "llama"}, "model_type is 'llama'"),
                            ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        (tmp_path / "model.safetensors").write_bytes((hf_small["dir"] / "model.safetensors").read_bytes())
        with pytest.raises(PretrainedError, match=message):
            import_hf(tmp_path, registry)
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(hf_small["dir"].parent, registry)


def test_init_from_hf_in_an_experiment_file(hf_small, registry):
    attention = GPT2_ATTENTIONS[-1]
    spec = parse_spec({"name": "finetune", "init_from": f"hf:{hf_small['dir']}",
                       "model": {"attention": {"name": attention}, "drop_rate": 0.0, "n_layers": 6}},
                      registry=registry)
    with pytest.warns(UserWarning, match=r"model.n_layers=6 is ignored"):
        model, resolved = load_init_from(spec)
    assert resolved.name == "finetune" and resolved.init_from == spec.init_from
    assert resolved.model.attention.name == attention and resolved.model.drop_rate == 0.0
    assert resolved.model.n_layers == 2 and resolved.model.qkv_bias
    with torch.no_grad():
        assert _max_diff(model.eval()(hf_small["idx"]), hf_small["logits"]) <= TOL
    bad = parse_spec({"init_from": spec.init_from, "model": {"attention": {"name": "book.causal"}}}, registry=registry)
    with pytest.raises(PretrainedError, match="model.attention: 'book.causal'"):
        load_init_from(bad)


def test_init_from_a_minigpt_checkpoint_switches_attention(hf_small, registry, tmp_path):
    model, spec = import_hf(hf_small["dir"], registry)
    save_model(model, spec, tmp_path / "ckpt")
    for attention in GPT2_ATTENTIONS:
        file = parse_spec({"init_from": str(tmp_path / "ckpt"), "model": {"attention": {"name": attention}}},
                          registry=registry)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing in the file conflicts with the checkpoint
            started, resolved = load_init_from(file)
        assert resolved.model.attention.name == attention
        with torch.no_grad():
            assert _max_diff(started.eval()(hf_small["idx"]), hf_small["logits"]) <= TOL
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_init_from(ExperimentSpec(init_from=str(tmp_path / "missing")))
    # A training run's directory means its latest checkpoint.
    from minigpt_core.checkpoints.state import save_checkpoint
    save_checkpoint(tmp_path / "run" / "checkpoints", 3, model=model, spec=spec,
                    model_state=model.state_dict(), optimizer_state={"state": {}, "param_groups": []},
                    rng_states=[{"cpu": torch.get_rng_state()}], trainer={}, meta={})
    started, _ = load_init_from(ExperimentSpec(init_from=str(tmp_path / "run")))
    with torch.no_grad():
        assert _max_diff(started.eval()(hf_small["idx"]), hf_small["logits"]) <= TOL


def test_hub_id_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        resolve_hf_source("gpt2", cache_dir=tmp_path)
    # Not marked offline, but no route to the hub: a clear error too, not a hang.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(PretrainedError, match="looks offline"):
        resolve_hf_source("gpt2-medium", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="No Hugging Face checkpoint directory"):
        resolve_hf_source(str(tmp_path / "no" / "such" / "dir"))


def test_cli_import_summary_export(hf_small, tmp_path, capsys, monkeypatch):
    from minigpt_core.cli.app import main  # in-process: the same code path as the console script

    def cli(*args):
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, _, err = cli("import-hf", str(hf_small["dir"]), str(tmp_path / "ckpt"))
    assert rc == 0, err
    rc, summary, err = cli("summary", str(tmp_path / "ckpt"))
    assert rc == 0, err
    n = sum(p.numel() for p in hf_small["model"].parameters())  # transformers counts the tied head once
    assert f"{n:,}" in summary and "tied to tok_emb" in summary
    rc, _, err = cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert rc == 0, err
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(hf_small["idx"]).logits
    assert _max_diff(logits, hf_small["logits"]) <= 1e-6
    # An existing output directory is never overwritten.
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    rc, _, err = cli("import-hf", str(hf_small["dir"]), str(tmp_path / "ckpt"))
    assert rc == 2 and "already exists" in err
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    rc, _, err = cli("summary", str(tmp_path))
    assert rc == 2 and "not a minigpt checkpoint" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id no machine has cached
    rc, _, err = cli("import-hf", "minigpt-tests/no-such-model", str(tmp_path / "x"))
    assert rc == 2 and "HF_HUB_OFFLINE" in err and not (tmp_path / "x").exists()
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.spec.qkv_bias


@pytest.mark.slow
def test_gpt2_124m_shape(tmp_path, capsys):
    from training_utils import cli

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(bos_token_id=None, eos_token_id=None)).eval()  # the 124M shape
    hf.save_pretrained(tmp_path / "hf")
    # the commands in this process: two start-ups and two 124M loads saved (test_cli runs the script)
    status, _, err = cli(capsys, "import-hf", tmp_path / "hf", tmp_path / "ckpt")
    assert status == 0, err
    status, out, err = cli(capsys, "summary", tmp_path / "ckpt")
    assert status == 0, err
    assert "124,439,808" in out
    model, spec = load_model(tmp_path / "ckpt")
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        assert _max_diff(model.eval()(idx), expected) <= TOL
    export_hf(model, spec, tmp_path / "back")
    with torch.no_grad():
        assert _max_diff(GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()(idx).logits, expected) <= 1e-6
