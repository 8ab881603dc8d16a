"""Start-up (issue 23.4): a command imports only what it uses. `minigpt --help`, `runs` and `diff`
read files and never import torch; `components` and `validate` load the plugins (which import
torch) but not the trainer, ablations, checkpoints or figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_core.cli.app import _command_named, build_parser, main
from minigpt_core.cli.parser import COMMAND_MODULES, COMMANDS
from training_utils import PATIENCE_S, runs_of, write_spec

ROOT = Path(__file__).resolve().parents[1]

# What a file-reading command must not import: torch and the heavy libraries, and our layers built on them.
HEAVY = ["torch", "matplotlib", "scipy", "wandb", "transformers", "peft", "torchao",
         "minigpt_core.model.gpt", "minigpt_core.train.trainer", "minigpt_core.checkpoints.state",
         "minigpt_core.ablation", "minigpt_core.tasks", "minigpt_core.data"]

# Runs the console script's own entry (minigpt.main, as `minigpt ARGS` does) in a fresh interpreter
# and prints the modules it imported.
DRIVER = """
import json, sys
import minigpt
sys.argv = ["minigpt", *json.loads(sys.argv[1])]
try:
    status = minigpt.main()
except SystemExit as exc:  # --help
    status = exc.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def _imported(argv: list[str], cwd: Path) -> tuple[int, set[str]]:
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv)], cwd=cwd, capture_output=True,
                         text=True, timeout=PATIENCE_S)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["status"], set(result["modules"])


def _heavy(modules: set[str], heavy: list[str] = HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("startup")
    spec = write_spec(tmp, train={"max_steps": 2, "save_every": 2, "eval_every": 2})
    for lr in ("1e-3", "2e-3"):
        assert main(["train", str(spec), "--no-progress", "--set", f"train.lr={lr}"]) == 0
    a, b = sorted(runs_of(tmp / "runs"))
    return tmp, a, b


@pytest.mark.parametrize("argv", [["--help"], ["runs", "--help"], ["diff", "--help"], ["components", "--help"],
                                  ["new-plugin", "--help"]], ids=" ".join)
def test_help_does_not_import_torch(argv, tmp_path):
    status, modules = _imported(argv, tmp_path)
    assert status == 0
    assert _heavy(modules) == []


@pytest.mark.parametrize("which", ["runs", "runs --json", "diff"])
def test_runs_and_diff_read_real_runs_without_importing_torch(two_runs, which):
    tmp, a, b = two_runs
    argv = {"runs": ["runs"], "runs --json": ["runs", "--json"], "diff": ["diff", str(a), str(b)]}[which]
    status, modules = _imported(argv, tmp)
    assert status == 0
    assert _heavy(modules) == []
    assert "minigpt_core.runs" in modules  # it did read the runs


@pytest.mark.parametrize("argv", [["components"], ["validate", "SPEC"]], ids=lambda a: a[0])
def test_components_and_validate_load_plugins_but_not_the_trainer_or_figures(argv, tmp_path):
    spec = write_spec(tmp_path)
    status, modules = _imported([str(spec) if a == "SPEC" else a for a in argv], tmp_path)
    assert status == 0
    assert "minigpt_book" in modules  # the plugins registered (they import torch: see benchmarks/RESULTS.md)
    # the plugins' own imports: torch, the model's layers and the data sources
    plugins_need = ("torch", "minigpt_core.model.gpt", "minigpt_core.data")
    assert _heavy(modules, [h for h in HEAVY if h not in plugins_need]) == []
    assert not [m for m in modules if m.startswith("minigpt_core.cli.commands.")]


def test_importing_minigpt_core_and_its_plugin_api_does_not_import_torch(tmp_path):
    code = "import json, sys, minigpt_core, minigpt_core.plugin; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert _heavy(set(json.loads(out.stdout))) == []
    import minigpt_core
    import minigpt_core.plugin as api

    # the names that need torch are still there, imported on first use
    assert minigpt_core.GPT.__name__ == "GPT" and api.SDPAttention.__name__ == "SDPAttention"
    assert set(minigpt_core.__all__) <= set(dir(minigpt_core)) and set(api.__all__) <= set(dir(api))
    with pytest.raises(AttributeError):
        minigpt_core.not_a_name


def test_the_command_index_names_each_command_module_and_help():
    build_parser()  # every command module
    app_commands = [n for n, (_, _, run) in COMMANDS.items() if run.__module__ == "minigpt_core.cli.app"]
    assert set(COMMANDS) == set(app_commands) | set(COMMAND_MODULES)
    for name, (help_, module) in COMMAND_MODULES.items():
        assert COMMANDS[name][2].__module__ == f"minigpt_core.cli.commands.{module}", name
        assert COMMANDS[name][0] == help_, name


def test_help_lists_every_command_and_a_command_gets_its_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n    {name} " in listing, name
    with pytest.raises(SystemExit):
        main(["--plugin", "nothing.py", "train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_the_command_is_the_first_word_that_is_not_an_option():
    assert _command_named(["--help"]) is None
    assert _command_named([]) is None
    assert _command_named(["--plugin", "p.py", "runs", "out"]) == "runs"
    assert _command_named(["--plugin=p.py", "diff", "a", "b"]) == "diff"
    assert _command_named(["validate", "x.toml"]) == "validate"
    # an abbreviated --plugin: its value looks like a command, so every command module is loaded
    assert _command_named(["--plug", "p.py", "runs"]) == ""
    assert _command_named(["nonsense"]) == ""
