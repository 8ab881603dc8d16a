"""The `minigpt` command line. The console script runs as a user would run it where that is the point
(help, `python -m minigpt`, an error's whole stderr being one paragraph); the other commands' output is
checked in this process, without a start-up per test."""

import json
import re
import subprocess
import sys

import pytest

from minigpt_core import spec_from_preset
from minigpt_core.assembly import summarize_spec
from training_utils import ROOT, cli


def test_summary_of_gpt2_124m_shows_the_books_figures(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, text, err = cli(capsys, "summary", "experiments/gpt2_124m.toml")
    assert status == 0, err
    for figure in ("163,009,536", "124,412,160", "2,360,064", "4,722,432", "38,597,376"):
        assert figure in text, figure
    assert re.search(r"attention\s+book\.multihead\s+2,360,064\s+12", text)
    assert re.search(r"feedforward\s+book\.feedforward\s+4,722,432\s+12", text)
    assert re.search(r"token embedding\s+nn\.Embedding\s+38,597,376", text)
    assert "training FLOPs/token" in text


def test_summary_counts_tied_heads_once():
    untied = summarize_spec(spec_from_preset("gpt2-124m"))
    tied = summarize_spec(spec_from_preset("gpt2-124m", model={"tie_weights": True}))
    assert untied.total == 163_009_536 and untied.without_output_head == 124_412_160
    assert tied.total == 124_412_160 and tied.tied
    # 6N + attention term; N counts the head's matmul but not the embedding lookups
    n = 124_412_160 - 38_597_376 - 786_432 + 38_597_376
    assert untied.flops_per_token == 6 * n + 12 * 12 * 1024 * 768
    assert summarize_spec(spec_from_preset("gpt2-xl")).total > 1_500_000_000  # built on meta: no memory


def test_components_lists_book_attentions_with_description_capabilities_and_source(capsys, isolated_plugins):
    status, stdout, _ = cli(capsys, "components", "attention")
    assert status == 0
    block = stdout.split("book.multihead\n", 1)[1].split("\n  book.", 1)[0]
    assert "MultiHeadAttention" in block and "causal" in block and "kv_cache" in block
    assert "from: book (minigpt" in block
    for name in ("book.self_attention_v1", "book.self_attention_v2", "book.causal", "book.multihead_wrapper"):
        assert name in stdout
    assert "NOT FOR LANGUAGE MODELS" in stdout
    status, stdout, _ = cli(capsys, "components", "norm", "book.*", "--json")
    data = json.loads(stdout)
    assert data[0]["name"] == "book.layernorm" and "eps" in data[0]["params"]


def test_validate_misspelt_attention(tmp_path, minigpt_cli):
    path = tmp_path / "typo.toml"
    path.write_text('preset = "tiny"\n[model.attention]\nname = "book.multihaed"\n')
    out = minigpt_cli("validate", str(path))
    assert out.returncode == 2
    assert "Did you mean 'book.multihead'" in out.stderr and "model.attention.name" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1  # one paragraph


def test_validate_bad_parameter_gives_the_path(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('preset = "tiny"\n[model.positional.params]\nmax_positions = "many"\n')
    status, _, err = cli(capsys, "validate", path)
    assert status == 2
    assert "model.positional.params.max_positions" in err and "integer" in err
    assert "Traceback" not in err


def test_validate_ok_and_missing_file(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli(capsys, "validate", "experiments/tiny.toml")[0] == 0
    status, _, err = cli(capsys, "validate", "experiments/nope.toml")
    assert status == 2 and "no such experiment file" in err and "Traceback" not in err


def test_schema_is_json(capsys):
    status, stdout, _ = cli(capsys, "schema")
    assert status == 0
    assert "ModelSpec" in json.loads(stdout)["$defs"]


@pytest.mark.parametrize("args", [["--help"], ["summary", "--help"], ["components", "--help"]])
def test_help(args, minigpt_cli):
    out = minigpt_cli(*args)
    assert out.returncode == 0 and "usage: minigpt" in out.stdout


def test_python_dash_m_minigpt_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "minigpt", "plugins"], capture_output=True, text=True)
    assert out.returncode == 0 and "book" in out.stdout
