"""Settings that are valid but silently not what was meant are named at `validate` and `train`."""

from __future__ import annotations

import json

import pytest

from training_utils import cli, runs_of, write_spec

ROPE = {"vocab_size": 128, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
        "tie_weights": True, "init": {"name": "gpt2.normal"}, "attention": {"name": "modern.rope"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-step run with a too-long warm-up and RoPE on top of learned positions: (status, out, err, tmp)."""
    import contextlib  # capsys is function scoped: capture by hand
    import io

    from minigpt_core.cli.app import main

    tmp = tmp_path_factory.mktemp("traps")
    spec = write_spec(tmp, model=ROPE, train={"max_steps": 2, "warmup_steps": 50, "eval_every": 0, "save_every": 0,
                                                          "peak_flops": 1e12})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["train", str(spec), "--no-progress"])
    return status, out.getvalue(), err.getvalue(), tmp


def test_warmup_longer_than_the_run_warns_at_validate(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 10, "warmup_steps": 100})
    status, _, err = cli(capsys, "validate", spec)
    assert status == 0
    assert "warning: train.warmup_steps (100) is longer than the run (10 steps)" in err
    status, _, err = cli(capsys, "validate", spec, "--set", "train.warmup_steps=5")
    assert status == 0 and "warning" not in err


def test_warmup_longer_than_the_run_warns_at_train(trained):
    status, out, _, _ = trained
    assert status == 0
    assert "warning: train.warmup_steps (50) is longer than the run (2 steps)" in out


def test_rope_with_learned_positions_warns_at_validate(tmp_path, capsys):
    spec = write_spec(tmp_path, model=ROPE)
    status, out, err = cli(capsys, "validate", spec)
    assert status == 0
    assert "attention 'modern.rope' encodes positions itself" in err and "book.learned" in err
    status, _, err = cli(capsys, "validate", spec, "--set", "model.positional.name=modern.none")
    assert status == 0 and "warning" not in err
    status, _, err = cli(capsys, "validate", spec, "--set", "model.attention.name=modern.alibi")
    assert "attention 'modern.alibi' encodes positions itself" in err


def test_rope_with_learned_positions_warns_at_train_and_the_model_line_lists_every_component(trained):
    _, out, _, _ = trained
    assert "warning: attention 'modern.rope' encodes positions itself" in out
    model_line = next(line for line in out.splitlines() if line.startswith("model:"))
    for part in ("attention modern.rope", "norm book.layernorm", "activation book.gelu",
                 "feedforward book.feedforward", "positional book.learned", "block book.pre_norm",
                 "init gpt2.normal"):
        assert part in model_line, model_line


def test_validate_lists_every_component(tmp_path, capsys):
    spec = write_spec(tmp_path, model=ROPE)
    _, out, _ = cli(capsys, "validate", spec)
    assert "attention modern.rope" in out and "positional book.learned" in out and "init gpt2.normal" in out


def test_validate_of_init_from_a_checkpoint_reports_the_checkpoints_shape(trained, tmp_path, capsys):
    *_, tmp = trained
    run = runs_of(tmp / "runs")[-1]
    # The file asks for another shape; init_from decides it (2 layers, emb 32).
    spec = write_spec(tmp_path, init_from=str(run), model={"n_layers": 6, "emb_dim": 64, "n_heads": 4})
    status, out, err = cli(capsys, "validate", spec)
    assert status == 0, err
    assert "2 layers, emb 32, 2 heads" in out and "shape from init_from" in out


def test_validate_of_init_from_hf_reports_the_configs_shape(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 128, "n_positions": 32, "n_embd": 48, "n_head": 3, "n_layer": 3,
        "activation_function": "gelu_new", "tie_word_embeddings": True}))
    spec = write_spec(tmp_path, init_from=f"hf:{hf}")
    status, out, err = cli(capsys, "validate", spec)
    assert status == 0, err
    assert "3 layers, emb 48, 3 heads" in out


@pytest.mark.parametrize("key,suggestion", [
    ("model.n_layer=3", "did you mean 'model.n_layers'?"),
    ("train.wamup_steps=3", "did you mean 'train.warmup_steps'?"),
    ("model.attention.nme=x", "did you mean 'model.attention.name'?"),
    ("data.max_lenght=8", "did you mean 'data.max_length'?"),
])
def test_misspelt_field_gets_did_you_mean(tmp_path, capsys, key, suggestion):
    spec = write_spec(tmp_path)
    status, _, err = cli(capsys, "validate", spec, "--set", key)
    assert status == 2 and suggestion in err, err


def test_check_on_a_missing_cuda_device_reports_once_instead_of_per_check(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, out, err = cli(capsys, "check", "--device", "cuda", "book.*")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "no CUDA GPU" in err
