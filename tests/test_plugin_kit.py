"""The plugin authoring kit: `minigpt new-plugin`, minigpt's pytest fixtures, `minigpt plugins --trace`."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

import minigpt_core.base.loader as plugins
from minigpt_core import load_registry
from minigpt_core.cli.commands.new_plugin import EXAMPLES, create_plugin
from minigpt_core.plugin import Params
from minigpt_core.testing import run_checks

from training_utils import PATIENCE_S, ROOT, cli

pytest_plugins = ["pytester"]


def generate(tmp_path: Path, monkeypatch, kind: str, name: str | None = None):
    """Generate a plugin and import its package from the generated directory: (dir, module)."""
    name = name or f"kit_{kind}"
    target = create_plugin(name, kind, tmp_path / name)
    monkeypatch.syspath_prepend(str(target))
    return target, importlib.import_module(name)


# -- minigpt new-plugin --------------------------------------------------------------------------
def test_new_plugin_writes_an_installable_package(tmp_path, capsys):
    status, out, err = cli(capsys, "new-plugin", "myattn", "--dir", tmp_path / "pkg")
    assert status == 0, err
    pkg = tmp_path / "pkg"
    assert {str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "experiment.toml", ".github/workflows/test.yml", "myattn/__init__.py",
        "myattn/attention.py", "tests/test_myattn.py"}
    project = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["minigpt"] == {"myattn": "myattn"}
    assert project["project"]["name"] == "myattn"
    workflow = (pkg / ".github/workflows/test.yml").read_text()
    assert "${{ matrix.python-version }}" in workflow and "pytest" in workflow  # $$ escapes rendered
    test = (pkg / "tests/test_myattn.py").read_text()
    assert 'parametrize_component_checks(pattern="myattn.*")' in test
    assert "myattn.causal_attention" in (pkg / "README.md").read_text()
    assert "myattn.causal_attention" in out


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_the_next_steps_new_plugin_prints_work_in_the_plugins_directory(tmp_path, capsys, monkeypatch, kind,
                                                                        isolated_plugins):
    """The hint once named experiments/quickstart.toml, which is not in the plugin's directory: every file
    its commands name is there, and the experiment file it trains is valid with the plugin's component."""
    name = f"hint_{kind}"
    status, out, err = cli(capsys, "new-plugin", name, "--kind", kind, "--dir", tmp_path / name)
    assert status == 0, err
    monkeypatch.chdir(tmp_path / name)  # where `cd {target}` leaves the user
    monkeypatch.syspath_prepend(str(tmp_path / name))  # as `pip install -e .` would make it importable
    named = re.findall(r"\b[\w./-]+\.toml\b", out.split("next:", 1)[1])
    assert "experiment.toml" in named and all(Path(f).is_file() for f in named), (named, out)
    status, text, err = cli(capsys, "validate", "experiment.toml", "--plugin", name)
    assert status == 0, err
    assert f"{kind} {name}.{EXAMPLES[kind][0]}" in text  # the component under test is in the model
    readme = Path("README.md").read_text()
    assert "minigpt train experiment.toml" in readme and "experiments/quickstart.toml" not in readme
    article = "an" if kind[0] in "aeiou" else "a"
    assert f"check for {article} {kind}," in readme  # not "for a attention"


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_every_example_component_passes_every_check_of_its_kind(tmp_path, monkeypatch, kind):
    _, module = generate(tmp_path, monkeypatch, kind)
    reg = load_registry(extra_plugins=[(f"kit_{kind}", module)])
    entry = reg.get(kind, f"kit_{kind}.{EXAMPLES[kind][0]}")
    assert issubclass(entry.params, Params) and entry.plugin == f"kit_{kind}"
    results = run_checks(reg, f"kit_{kind}.*")
    assert results and all(r.status == "pass" for r in results), [(r.check, r.message) for r in results]
    if kind == "attention":  # the capabilities it declares, so their checks ran
        assert {"causality", "kv_cache", "attention_weights", "generate_cached"} <= {r.check for r in results}


@pytest.mark.parametrize("name, expected", [
    ("My-Plugin", "lowercase Python identifier"),
    ("class", "lowercase Python identifier"),
    ("book", "already installed"),
    ("json", "already importable"),
])
def test_new_plugin_refuses_bad_names(tmp_path, capsys, name, expected):
    status, out, err = cli(capsys, "new-plugin", name, "--dir", tmp_path / "pkg")
    assert status == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "pkg").exists()


def test_new_plugin_refuses_a_kind_without_an_example(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(capsys, "new-plugin", "fine", "--kind", "tokenizer", "--dir", tmp_path / "pkg")
    assert exc.value.code == 2
    assert "choose from 'attention', 'norm', 'activation'" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_new_plugin_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path, capsys):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "notes.txt").write_text("mine")
    status, _, err = cli(capsys, "new-plugin", "myattn", "--dir", tmp_path / "pkg")
    assert status == 2 and "not an empty directory" in err
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["notes.txt"]
    assert (tmp_path / "pkg" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert cli(capsys, "new-plugin", "myattn", "--dir", tmp_path / "empty")[0] == 0


# -- minigpt plugins --trace ---------------------------------------------------------------------
def test_plugins_trace_shows_hooks_and_registered_components(tmp_path, monkeypatch, capsys):
    _, module = generate(tmp_path, monkeypatch, "norm", "kit_trace")
    monkeypatch.setattr(plugins, "_default", load_registry(extra_plugins=[("kit_trace", module)]))
    status, out, _ = cli(capsys, "plugins", "--trace")
    assert status == 0
    trace = out.split("\nkit_trace  (module kit_trace)\n", 1)[1].split("\n\n")[0]
    assert trace.splitlines() == ["  hooks: minigpt_register", "  norm: kit_trace.rmsnorm"]
    book = out.split("\nbook  (minigpt ", 1)[1].split("\n\n")[0]
    assert "  hooks: minigpt_register" in book and "book.multihead" in book and "  block: book.pre_norm" in book
    assert "hooks:" not in cli(capsys, "plugins")[1]  # only with --trace


# -- the pytest plugin ---------------------------------------------------------------------------
INNER_TESTS = '''
import pytest
import torch
from torch import nn

from minigpt_core import get_registry


class Doubling(nn.Module):
    def forward(self, x):
        return 2 * x


class Leaky(nn.Module):
    """Not batch independent: every sequence sees the batch mean."""

    def forward(self, x):
        return x + x.mean(0, keepdim=True)


def test_register_component_for_one_test(register_component, minigpt_registry):
    register_component("activation", "inner.double", lambda ctx, p: Doubling())
    assert ("activation", "inner.double") in minigpt_registry
    assert get_registry() is minigpt_registry  # what the CLI and build_model see during the test


def test_registration_is_gone_in_the_next_test(minigpt_registry):
    assert ("activation", "inner.double") not in minigpt_registry
    assert ("attention", "book.multihead") in minigpt_registry


def test_tiny_spec_and_model(register_component, tiny_spec, tiny_model):
    register_component("activation", "inner.double", lambda ctx, p: Doubling())
    assert tiny_spec(n_layers=1).n_layers == 1
    model = tiny_model(activation="inner.double", norm={"name": "book.layernorm", "params": {"eps": 1e-6}})
    assert model.spec.activation.name == "inner.double" and model.spec.norm.params == {"eps": 1e-6}
    assert isinstance(model.trf_blocks[0].ff.layers[1], Doubling)
    again = tiny_model(activation="inner.double", norm={"name": "book.layernorm", "params": {"eps": 1e-6}})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


def test_assert_conforms_passes(assert_conforms):
    results = assert_conforms("attention", "torch.sdpa", checks=["causality", "kv_cache"])
    assert [r.check for r in results] == ["causality", "kv_cache"]


def test_assert_conforms_fails_a_broken_component(register_component, assert_conforms):
    register_component("activation", "inner.leaky", lambda ctx, p: Leaky())
    assert_conforms("activation", "inner.leaky")
'''


def test_pytest_plugin_fixtures(pytester):
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*test_assert_conforms_fails_a_broken_component*",
                                 "*batch_independence: activation 'inner.leaky': sequence 0 gives a different*"])


# -- the acceptance test: generate, install, test, train -----------------------------------------
@pytest.mark.slow
def test_generated_plugin_installs_passes_its_tests_and_trains(tmp_path):
    """`minigpt new-plugin`, then what its README says: install it, run its tests, train with it.

    The throwaway environment is a bare venv of the base interpreter whose .pth file adds this
    project's environment as a site directory (so torch, pytest and minigpt are reused, offline);
    pip installs the generated package into the new venv only, editable and without a build
    isolation download.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MINIGPT_PLUGINS", None)

    def run(*cmd, cwd):
        start = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=PATIENCE_S)
        print(f"{time.perf_counter() - start:5.1f}s  {' '.join(map(str, cmd[1:4]))}")
        assert proc.returncode == 0, f"{cmd} failed ({time.perf_counter() - start:.0f}s):\n{proc.stdout}\n{proc.stderr}"
        return proc

    from minigpt_core.cli.app import main

    assert main(["new-plugin", "genattn", "--dir", str(tmp_path / "genattn")]) == 0  # in-process: no startup
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    run(base, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site_dir = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout
    ours = sysconfig.get_paths()["purelib"]
    Path(site_dir.strip(), "_minigpt_parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-e", tmp_path / "genattn", cwd=tmp_path)

    tests = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=tmp_path / "genattn")
    assert " passed" in tests.stdout and "failed" not in tests.stdout and "skipped" not in tests.stdout
    # Not installed here: this interpreter's registry lacks it, the throwaway venv's has it.
    assert "genattn" not in {p.name for p in load_registry().plugins}

    # What new-plugin's hint says, in the plugin's directory: train its own experiment file.
    train = run(python, "-m", "minigpt", "train", "experiment.toml", "--set", "train.max_steps=2",
                "--set", "train.batch_size=4", "--set", "train.warmup_steps=0", "--set", "train.eval_every=0",
                "--set", "train.eval_batches=1", "--set", "train.sample_every=0", "--set", "train.sample_tokens=0",
                "--set", "train.save_every=0", "--set", f"train.out_dir={tmp_path / 'runs'}",
                "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "wandb.mode=disabled",
                "--set", "data.source.params.docstrings=false", "--set", "train.threads=1", cwd=tmp_path / "genattn")
    assert "attention genattn.causal_attention" in train.stdout
    assert list((tmp_path / "runs" / "genattn-try").glob("*/metrics.jsonl"))
