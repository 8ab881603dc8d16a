"""Small things a newcomer trips over on the command line (issue 23, item 9): where a warning lands
during `sample`, option names shared between commands, which usage an unknown option shows, what an
unknown param lists, and where `components` puts an unavailable component."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import pytest

from minigpt_core.cli.app import main
from training_utils import cli, runs_of, tiny_spec_data, write_spec


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny language-model run (context 32 tokens) with a checkpoint."""
    tmp = tmp_path_factory.mktemp("details")
    spec = tiny_spec_data(tmp)
    spec["train"] = {**spec["train"], "max_steps": 2, "eval_every": 0, "save_every": 0}
    from minigpt_core.base import toml as _toml

    path = tmp / "spec.toml"
    path.write_text(_toml.dumps(spec), encoding="utf-8")
    assert main(["train", str(path), "--no-progress"]) == 0
    (run_dir,) = runs_of(tmp / "runs")
    return run_dir


def _one_stream(monkeypatch, *args) -> tuple[int, str]:
    """Run the command line with stdout and stderr on one stream, as a terminal shows them."""
    both = io.StringIO()
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    status = main([str(a) for a in args])
    return status, both.getvalue()


@pytest.mark.parametrize("how", [["--prompt", "The "], ["--instruction", "ab", "--template", "book.phi3"]])
def test_a_warning_during_sample_gets_a_line_of_its_own_on_stderr(run, monkeypatch, capsys, how):
    # 40 new tokens pass the 32-token context mid-response: the sliding-window warning comes while
    # the response's line is being written.
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown by both runs, not once per place in the code
        status, out, err = cli(capsys, "sample", run, *how, "--max-new-tokens", "40", "--temperature", "0")
        assert status == 0 and "warning" not in out and "context length" in err, (out, err)
        status, shown = _one_stream(monkeypatch, "sample", run, *how, "--max-new-tokens", "40", "--temperature", "0")
    assert status == 0, shown
    # The response reaches the screen whole, the warning on a line of its own (the response, greedy,
    # is the same as in the run above): never a warning inside the response's text.
    assert out in shown, (out, shown)
    lines = shown.splitlines()
    warned = [line for line in lines if "context length" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), shown
    assert sum("warning:" in line for line in lines) == 1


def test_sample_takes_max_tokens_as_max_new_tokens(run, capsys):
    """`attention` says --max-tokens (the tokens it reads); `sample` calls the tokens it writes
    --max-new-tokens and takes --max-tokens for the same, so the habit from one works in the other."""
    status, out, err = cli(capsys, "sample", run, "--prompt", "a", "--max-tokens", "5", "--temperature", "0")
    assert status == 0, err
    same = cli(capsys, "sample", run, "--prompt", "a", "--max-new-tokens", "5", "--temperature", "0")
    assert same == (0, out, err) and len(out) == len("a") + 5 + 1  # the prompt, 5 characters, the newline


@pytest.mark.parametrize("argv, usage", [
    (["sample", "RUN", "--bogus"], "usage: minigpt sample"),
    (["components", "--nope"], "usage: minigpt components"),
    (["validate", "x.toml", "--max-tokens"], "usage: minigpt validate"),
])
def test_an_unknown_option_shows_its_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(usage) and f"minigpt {argv[0]}: error: unrecognized arguments: {argv[-1]}" in err, err
    assert "usage: minigpt [-h]" not in err and "Traceback" not in err


def test_an_unknown_param_lists_the_components_params(tmp_path, capsys):
    spec = write_spec(tmp_path, model={**tiny_spec_data(tmp_path)["model"], "norm": {"name": "torch.layernorm"},
                                       "activation": {"name": "torch.gelu"}})
    status, _, err = cli(capsys, "validate", spec, "--set", "model.norm.params.epsilon=1",
                         "--set", "model.activation.params.approximate=tanh")
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert ("model.norm.params.epsilon: unknown param (did you mean 'model.norm.params.eps'? the norm "
            "'torch.layernorm' takes: eps, bias)") in err
    assert "model.activation.params.approximate: unknown param (the activation 'torch.gelu' takes no params)" in err


def test_an_unavailable_component_is_listed_under_its_kind(tmp_path, capsys, isolated_plugins):
    """A norm a one-file plugin declares unavailable (as torch.flex is on a CPU-only torch) is listed
    under [norm], after the available norms, not after every kind."""
    plugin = tmp_path / "detailsfix.py"
    plugin.write_text(
        "from minigpt_core.plugin import hookimpl\n\n\n"
        "@hookimpl\n"
        "def minigpt_register(registry):\n"
        "    registry.unavailable('norm', 'detailsfix.gone', 'it needs a device we lack')\n", encoding="utf-8")
    status, out, err = cli(capsys, "components", "--plugin", plugin)
    assert status == 0, err
    sections = {s.split("]", 1)[0]: s for s in out.split("\n[")[1:]}
    assert "detailsfix.gone  UNAVAILABLE" in sections["norm"], out
    assert "UNAVAILABLE" not in sections["activation"] + sections.get("init", "")
    norm = sections["norm"]
    assert norm.index("torch.layernorm") < norm.index("detailsfix.gone") and "needs a device we lack" in norm
    status, out, _ = cli(capsys, "components", "norm", "detailsfix.*", "--plugin", plugin)
    assert out.lstrip().startswith("[norm]") and "detailsfix.gone  UNAVAILABLE" in out
