"""Plugin discovery through real distributions with `minigpt` entry points, made in a temp dir."""

import importlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from minigpt_core import PluginLoadWarning, build_model, load_registry, spec_from_preset

THIRD_PARTY = '''
import torch
from torch import nn
from pydantic import BaseModel, ConfigDict, Field
from minigpt_core import hookimpl

class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, gt=0)

class TemperedAttention(nn.Module):
    """Single-projection causal attention whose softmax temperature is a parameter."""
    def __init__(self, emb_dim, context_length, temperature):
        super().__init__()
        self.qkv = nn.Linear(emb_dim, 3 * emb_dim)
        self.temperature = temperature
        self.register_buffer("mask", torch.ones(context_length, context_length).triu(1).bool())
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        t = x.shape[1]
        scores = (q @ k.transpose(1, 2)).masked_fill(self.mask[:t, :t], float("-inf"))
        return torch.softmax(scores / self.temperature, dim=-1) @ v

@hookimpl
def minigpt_register(registry):
    registry.add("attention", "third.tempered",
                 lambda ctx, p: TemperedAttention(ctx.emb_dim, ctx.context_length, p.temperature),
                 params=Params, description="causal attention with a fixed softmax temperature",
                 capabilities={"causal"})
'''


def make_distribution(site, dist, version, module, source, ep_name):
    """Lay out an installed distribution the way pip does: package + .dist-info with entry points."""
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[minigpt]\n{ep_name} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "thirdparty-attn", "0.3.0", "thirdparty_attn", THIRD_PARTY, "third")
    make_distribution(site, "broken-import", "1.0", "broken_import",
                      "raise ImportError('needs the missing package flash_thing')", "brokenimport")
    make_distribution(site, "broken-hook", "2.1", "broken_hook", '''
        from minigpt_core import hookimpl
        @hookimpl
        def minigpt_register(registry):
            registry.add("norm", "brokenhook.ok", lambda c, p: None, description="registered before the error")
            raise RuntimeError("hook exploded")
        ''', "brokenhook")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def test_third_party_plugin_is_discovered_and_used_in_a_spec(site):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        reg = load_registry()
    entry = reg.get("attention", "third.tempered")
    assert (entry.plugin, entry.distribution, entry.version) == ("third", "thirdparty-attn", "0.3.0")
    spec = spec_from_preset("tiny", registry=reg, model={
        "n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 16, "vocab_size": 100,
        "attention": {"name": "third.tempered", "params": {"temperature": 2.0}}}, tokenizer={"name": "char"})
    model = build_model(spec)
    assert type(model.trf_blocks[0].att).__name__ == "TemperedAttention"
    assert model.trf_blocks[0].att.temperature == 2.0
    assert model(torch.randint(0, 100, (2, 16))).shape == (2, 16, 100)


def test_broken_plugins_warn_with_name_distribution_and_error_and_the_rest_load(site):
    with pytest.warns(PluginLoadWarning) as record:
        reg = load_registry()
    messages = [str(w.message) for w in record]
    imp = next(m for m in messages if "'brokenimport'" in m)
    assert "broken-import 1.0" in imp and "flash_thing" in imp and "ImportError" in imp
    hook = next(m for m in messages if "'brokenhook'" in m)
    assert "broken-hook 2.1" in hook and "hook exploded" in hook
    # Nothing half-registered from the failing hook; everything else is there.
    assert ("norm", "brokenhook.ok") not in reg
    assert ("attention", "third.tempered") in reg and ("attention", "book.multihead") in reg
    assert {f.name for f in reg.failures} == {"brokenimport", "brokenhook"}


def test_minigpt_plugins_env_restricts_loading(site, monkeypatch):
    monkeypatch.setenv("MINIGPT_PLUGINS", "book,third")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken ones are not even imported
        reg = load_registry()
    assert {p.name for p in reg.plugins} == {"book", "third"}
    monkeypatch.setenv("MINIGPT_PLUGINS", "")
    reg = load_registry()
    assert reg.plugins == [] and reg.entries() == []


def test_unknown_name_in_minigpt_plugins_warns(site, monkeypatch):
    monkeypatch.setenv("MINIGPT_PLUGINS", "book,nosuchplugin")
    with pytest.warns(PluginLoadWarning, match="nosuchplugin"):
        load_registry()


def test_two_plugins_registering_one_name_is_an_error_naming_both(site):
    make_distribution(site, "copycat", "0.1", "copycat", '''
        from minigpt_core import hookimpl
        @hookimpl
        def minigpt_register(registry):
            registry.add("attention", "third.tempered", lambda c, p: None, description="same name")
        ''', "copycat")
    importlib.invalidate_caches()
    from minigpt_core import DuplicateComponentError
    with pytest.raises(DuplicateComponentError) as err:
        load_registry(["third", "copycat"])
    assert "thirdparty-attn 0.3.0" in str(err.value) and "copycat 0.1" in str(err.value)


def test_registries_are_independent(site):
    a = load_registry(["book"])
    b = load_registry(["book", "third"])
    assert ("attention", "third.tempered") not in a and ("attention", "third.tempered") in b


def test_cli_shows_third_party_and_broken_plugins(site, minigpt_cli):
    env = {"PYTHONPATH": str(site)}
    out = minigpt_cli("components", "attention", "third.*", env=env)
    assert out.returncode == 0, out.stderr
    assert "third.tempered" in out.stdout and "thirdparty-attn 0.3.0" in out.stdout
    out = minigpt_cli("plugins", env=env)
    assert out.returncode == 0
    assert "FAILED" in out.stdout and "brokenimport" in out.stdout and "broken-hook 2.1" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_pip_installed_plugin_distribution(tmp_path, minigpt_cli):
    """The whole path a plugin author takes: a pyproject with an entry point, pip install, use."""
    src = tmp_path / "src"
    (src / "tempered_attn").mkdir(parents=True)
    (src / "tempered_attn" / "__init__.py").write_text(THIRD_PARTY)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tempered-attn"
        version = "1.2.3"
        [project.entry-points.minigpt]
        tempered = "tempered_attn"
        '''))
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    exp = tmp_path / "exp.toml"
    exp.write_text('preset = "tiny"\n[model.attention]\nname = "third.tempered"\nparams = { temperature = 0.5 }\n')
    out = minigpt_cli("summary", str(exp), env={"PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert "third.tempered" in out.stdout
    listing = minigpt_cli("plugins", env={"PYTHONPATH": str(target)}).stdout
    assert re.search(r"^tempered\s+tempered-attn\s+1\.2\.3\s+1\s", listing, re.M), listing
