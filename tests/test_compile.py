"""torch.compile: the `compiles` conformance check, components that declare they cannot compile, and
train.compile (compile time apart from tokens/s, no recompilation per step or at evaluation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minigpt_core import SpecError, hookimpl, load_registry, parse_spec
from minigpt_core.runs import summarize_run
from minigpt_core.testing import check_component
from minigpt_core.train import train
from training_utils import read_metrics, tiny_spec_data

quiet = dict(progress=False, write=lambda s: None)
REASON = "it keeps a Python-side call counter that every call changes"


class BranchyNorm(nn.LayerNorm):
    """A norm with a branch on a tensor's value: torch.compile cannot trace it in one graph."""

    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else super().forward(-x)


class CountingNorm(nn.LayerNorm):
    """A norm whose output depends on a Python int it changes every call: a recompile per step."""

    def __init__(self, dim):
        super().__init__(dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * (1 + 1e-3 * (self.calls % 7))


class Declared(CountingNorm):
    pass


class Plugin:
    @hookimpl
    def minigpt_register(self, registry):
        registry.add("norm", "thirdparty.branchy", lambda ctx, p: BranchyNorm(ctx.emb_dim),
                     description="a norm with a data-dependent branch")
        registry.add("norm", "thirdparty.counting", lambda ctx, p: CountingNorm(ctx.emb_dim),
                     description="a norm with a per-call Python counter")
        registry.add("norm", "thirdparty.declared", lambda ctx, p: Declared(ctx.emb_dim),
                     description="a norm that says it cannot be compiled", not_compilable=REASON)


@pytest.fixture(scope="module")
def third_party():
    return load_registry(extra_plugins=[("thirdparty", Plugin())])


def _compiles(registry, name):
    [result] = check_component(registry.get("norm", name), registry=registry, checks=["compiles"])
    return result


def test_compiles_check_catches_a_graph_break(third_party):
    result = _compiles(third_party, "thirdparty.branchy")
    assert result.status == "fail"
    assert "cannot trace it in one graph" in result.message and "not_compilable" in result.message


def test_compiles_check_catches_a_recompile_at_every_step(third_party):
    result = _compiles(third_party, "thirdparty.counting")
    assert result.status == "fail"
    assert "recompiled at the second training step" in result.message and "calls" in result.message


def test_a_component_declaring_it_cannot_compile_is_refused_by_train_compile(third_party, tmp_path):
    assert _compiles(third_party, "thirdparty.declared").status == "pass"  # the check verified the refusal
    raw = tiny_spec_data(tmp_path)
    raw["model"]["norm"] = {"name": "thirdparty.declared"}
    parse_spec(raw, registry=third_party)  # without train.compile it is fine
    raw["train"]["compile"] = True
    with pytest.raises(SpecError) as err:
        parse_spec(raw, registry=third_party)
    assert "model.norm.name" in str(err.value) and REASON in str(err.value) and "train.compile = false" in str(err.value)


def test_not_compilable_needs_a_reason():
    class Empty:
        @hookimpl
        def minigpt_register(self, registry):
            registry.add("norm", "thirdparty.empty", lambda ctx, p: nn.LayerNorm(ctx.emb_dim),
                         description="x", not_compilable="  ")

    with pytest.warns(Warning, match="must say why"):
        reg = load_registry(extra_plugins=[("empty", Empty())])
    assert ("norm", "thirdparty.empty") not in reg


@pytest.mark.slow
def test_train_compile_reports_compile_time_apart_and_never_recompiles(tmp_path):
    # The default (inductor) backend, as `train.compile = true` runs it; evaluation at steps 2 and 4.
    raw = tiny_spec_data(tmp_path, train={"max_steps": 5, "eval_every": 2, "save_every": 0, "log_every": 1,
                                          "compile": True})
    raw["model"]["n_layers"] = 1  # inductor's compile time grows with the layers
    result = train(parse_spec(raw), **quiet)
    records = read_metrics(result.run_dir)
    [compiled] = [r for r in records if r.get("event") == "compiled"]
    [finished] = [r for r in records if r.get("event") == "finished"]
    assert compiled["step"] == 1 and compiled["compile_seconds"] > 0
    assert finished["recompiles"] == 0 and finished["compile_seconds"] == compiled["compile_seconds"]
    logged = {r["step"]: r for r in records if "train/loss" in r}
    assert "train/tokens_per_s" not in logged[1] and logged[1]["compile/seconds"] == compiled["compile_seconds"]
    assert all(logged[s]["train/tokens_per_s"] > 0 for s in (2, 3, 4, 5))
    assert sum("val/loss" in r for r in records) == 3  # steps 2, 4 and the last: the plain module, no recompile
    summary = summarize_run(result.run_dir)
    assert summary.compile_s == compiled["compile_seconds"] and summary.recompiles == 0
