"""Local plugins without packaging: a .py file or a module named by an experiment's `plugins`,
`--plugin` or MINIGPT_PLUGIN_PATH, recorded in the run and found again when its checkpoint loads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from minigpt_core.base import toml as _toml
from minigpt_core.base.loader import PLUGIN_PATH_ENV_VAR, load_registry, reset_registry
from training_utils import cli, run_minigpt, runs_of, tiny_spec_data

# A whole plugin in one file: an attention component (the book's, under a new name).
PLUGIN = '''
from minigpt_core.plugin import Params, hookimpl
from minigpt_torch import SDPAttention


class MyParams(Params):
    scale: float = 1.0


def make(ctx, p):
    return SDPAttention(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias)


@hookimpl
def minigpt_register(registry):
    registry.add("attention", "local.myattn", make, params=MyParams,
                 description="the book's attention, from a local file", capabilities={"causal"})
'''


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


def write_plugin(directory: Path, name: str = "my_attention.py", text: str = PLUGIN) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def write_experiment(tmp_path: Path, *, plugins=None, steps: int = 2, **model) -> Path:
    data = tiny_spec_data(tmp_path, train={"max_steps": steps, "eval_every": 0, "save_every": 0, "eval_batches": 1},
                          model={**tiny_spec_data(tmp_path)["model"], "attention": {"name": "local.myattn"}, **model})
    if plugins is not None:
        data["plugins"] = plugins
    path = tmp_path / "exp" / "experiment.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml.dumps(data), encoding="utf-8")
    return path


@pytest.mark.slow
def test_one_file_plugin_trains_and_its_checkpoint_loads_in_a_new_process(tmp_path, capsys, monkeypatch):
    plugin = write_plugin(tmp_path / "exp" / "plugins")
    exp = write_experiment(tmp_path, plugins=["./plugins/my_attention.py"])  # relative to the experiment file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    status, out, err = cli(capsys, "train", exp)
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs")
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    spec = _toml.loads((ckpt / "spec.toml").read_text())
    assert spec["plugins"] == [str(plugin.resolve())]
    assert spec["model"]["attention"]["name"] == "local.myattn"
    meta = json.loads((ckpt / "meta.json").read_text())
    sha = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert meta["local_plugins"] == {str(plugin.resolve()): {"sha256": sha, "components": ["attention local.myattn"]}}
    assert meta["plugins"][str(plugin.resolve())] == f"file sha256:{sha}"

    # The plugin is in the environment of the processes training starts (tokenization workers).
    assert os.environ[PLUGIN_PATH_ENV_VAR] == str(plugin.resolve())

    # A new process, another directory, no --plugin: the run's spec finds the file.
    monkeypatch.delenv(PLUGIN_PATH_ENV_VAR)
    sample = ("sample", run, "--prompt", "The", "--max-new-tokens", "4")
    r = run_minigpt(*sample, cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    # init_from the run, from an experiment that does not list the plugin: found through the run's spec.
    child = tmp_path / "child.toml"
    child_data = tiny_spec_data(tmp_path, init_from=str(ckpt))
    del child_data["model"]
    child.write_text(_toml.dumps(child_data), encoding="utf-8")
    reset_registry()
    status, out, err = cli(capsys, "validate", child)
    assert status == 0, err
    assert "attention local.myattn" in out

    # Gone: a clear error naming the component and the file, exit 2, no traceback.
    moved = plugin.rename(tmp_path / "moved.py")
    monkeypatch.delenv(PLUGIN_PATH_ENV_VAR)  # the in-process validate put it there
    reset_registry()
    status, out, err = cli(capsys, "validate", child)
    assert status == 2 and "attention 'local.myattn'" in err and str(plugin.resolve()) in err
    r = run_minigpt(*sample, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "attention 'local.myattn'" in r.stderr and str(plugin.resolve()) in r.stderr
    assert "no longer exists" in r.stderr and "--plugin" in r.stderr

    # --plugin with the file's new place brings the component back (with a warning): the run resumes.
    reset_registry()
    status, out, err = cli(capsys, "train", "--resume", run, "--set", "train.max_steps=3", "--plugin", moved)
    assert status == 0, err
    assert "no longer exists" in err and str(moved.resolve()) in err
    resumed = _toml.loads((run / "checkpoints" / "step_00000003" / "spec.toml").read_text())
    assert resumed["plugins"] == [str(moved.resolve())]

    # Edited since: loads, with a warning.
    moved.write_text(PLUGIN + "\n# edited\n", encoding="utf-8")
    monkeypatch.delenv(PLUGIN_PATH_ENV_VAR)
    reset_registry()
    status, out, err = cli(capsys, *sample)
    assert status == 0, err
    assert "changed since" in err and str(moved.resolve()) in err


def test_plugin_option_loads_a_file_before_or_after_the_command(tmp_path, capsys):
    plugin = write_plugin(tmp_path)
    status, out, err = cli(capsys, "components", "attention", "local.*", "--plugin", plugin)
    assert status == 0, err
    assert "local.myattn" in out and str(plugin.resolve()) in out
    reset_registry()
    status, out, err = cli(capsys, "--plugin", plugin, "plugins")
    assert status == 0, err
    assert str(plugin.resolve()) in out
    # Children of this process (tokenization workers, ...) see it.
    assert os.environ[PLUGIN_PATH_ENV_VAR].split(os.pathsep) == [str(plugin.resolve())]


def test_plugin_option_is_recorded_in_the_resolved_spec(tmp_path, capsys):
    plugin = write_plugin(tmp_path)
    exp = write_experiment(tmp_path)  # no `plugins`: the component comes from --plugin
    status, out, err = cli(capsys, "validate", exp)
    assert status == 2 and "local.myattn" in err
    status, out, err = cli(capsys, "validate", exp, "--plugin", plugin)
    assert status == 0, err
    from minigpt_core.spec import dump_spec, load_spec

    spec = load_spec(exp)
    assert spec.plugins == [str(plugin.resolve())]
    assert "plugins = " in dump_spec(spec)


def test_plugin_path_environment_variable(tmp_path, monkeypatch, capsys):
    a = write_plugin(tmp_path / "a")
    b = write_plugin(tmp_path / "b", "other.py", PLUGIN.replace("local.myattn", "local.other"))
    monkeypatch.setenv(PLUGIN_PATH_ENV_VAR, os.pathsep.join([str(a), str(b)]))
    reg = load_registry()
    assert ("attention", "local.myattn") in reg and ("attention", "local.other") in reg
    assert reg.get("attention", "local.other").plugin == str(b.resolve())
    monkeypatch.setenv(PLUGIN_PATH_ENV_VAR, str(a))
    reset_registry()  # the CLI's registry reads the variable when it is first loaded
    status, out, err = cli(capsys, "components", "attention", "local.*")
    assert status == 0, err
    assert "local.myattn" in out and "local.other" not in out
    monkeypatch.setenv(PLUGIN_PATH_ENV_VAR, str(tmp_path / "gone.py"))
    reset_registry()
    status, out, err = cli(capsys, "components")
    assert status == 2 and "gone.py (named by MINIGPT_PLUGIN_PATH) does not exist" in err


def test_plugin_module_by_name(tmp_path, monkeypatch, capsys):
    write_plugin(tmp_path, "my_plugin_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, out, err = cli(capsys, "components", "attention", "local.*", "--plugin", "my_plugin_mod")
    assert status == 0, err
    assert "local.myattn" in out
    status, out, err = cli(capsys, "components", "--plugin", "no_such_plugin_mod")
    assert status == 2
    assert "no_such_plugin_mod" in err and "Traceback" not in err


def test_a_file_that_raises_on_import_is_an_error_naming_it(tmp_path, capsys):
    broken = write_plugin(tmp_path, "broken.py", "import math\n\nraise RuntimeError('boom')\n")
    status, out, err = cli(capsys, "components", "--plugin", broken)
    assert status == 2
    assert str(broken.resolve()) in err and "line 3" in err and "RuntimeError: boom" in err
    assert "Traceback" not in err
    # Named by an experiment file: same, and the message says which file named it.
    exp = write_experiment(tmp_path, plugins=["../broken.py"])
    status, out, err = cli(capsys, "validate", exp)
    assert status == 2
    assert str(broken.resolve()) in err and str(exp) in err


def test_missing_file_without_hook_and_hook_errors(tmp_path, capsys):
    status, _, err = cli(capsys, "plugins", "--plugin", tmp_path / "nope.py")
    assert status == 2 and "does not exist" in err and "nope.py" in err
    nohook = write_plugin(tmp_path, "nohook.py", "X = 1\n")
    status, _, err = cli(capsys, "plugins", "--plugin", nohook)
    assert status == 2 and "defines no minigpt_register hook" in err
    raising = write_plugin(tmp_path, "raising.py", PLUGIN.replace("registry.add(", "1 / 0\n    registry.add("))
    status, _, err = cli(capsys, "plugins", "--plugin", raising)
    assert status == 2 and "ZeroDivisionError" in err and str(raising.resolve()) in err


def test_loading_twice_is_idempotent(tmp_path):
    from minigpt_core.base.loader import load_local_plugins

    plugin = write_plugin(tmp_path)
    reg = load_registry(local_plugins=())
    first = load_local_plugins([plugin, str(plugin)], reg)
    again = load_local_plugins([tmp_path / "." / plugin.name], reg)
    assert first[0] is first[1] is again[0]
    assert [p.local_ref for p in reg.plugins].count(str(plugin.resolve())) == 1


def test_spec_plugins_must_be_a_list_of_strings(tmp_path, capsys):
    exp = write_experiment(tmp_path, plugins="my_attention.py")
    status, _, err = cli(capsys, "validate", exp)
    assert status == 2 and "plugins: must be a list" in err


def test_a_clash_with_an_installed_component_names_both_and_adds_nothing(tmp_path, capsys):
    from minigpt_core.base.loader import load_local_plugins
    from minigpt_core.base.errors import DuplicateComponentError

    clash = write_plugin(tmp_path, "clash.py", PLUGIN.replace(
        'registry.add("attention", "local.myattn"',
        'registry.add("attention", "a.first", make, params=MyParams, description="x")\n'
        '    registry.add("attention", "book.multihead"'))
    reg = load_registry(local_plugins=())
    with pytest.raises(DuplicateComponentError, match=str(clash.resolve())):
        load_local_plugins([clash], reg)
    assert ("attention", "a.first") not in reg
    status, _, err = cli(capsys, "components", "--plugin", clash)
    assert status == 2 and "book.multihead" in err and "Traceback" not in err
