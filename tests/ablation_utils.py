"""Helpers shared by the ablation tests (test_ablate*.py): a tiny base spec, test attentions, the manifest."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from minigpt_core.base import toml as _toml
from training_utils import tiny_spec_data

# An attention that raises in forward while MINIGPT_TEST_BOOM=1 (a run-time failure of one variant),
# and one that sleeps in forward, 10 ms or MINIGPT_TEST_SLOW_S (so a test can stop the ablation mid-cell).
PLUGIN = '''
import os, time
from minigpt_core.plugin import Params, hookimpl
from minigpt_torch import SDPAttention


class Boom(SDPAttention):
    def forward(self, x):
        if os.environ.get("MINIGPT_TEST_BOOM") == "1":
            raise RuntimeError("boom: this attention always fails")
        return super().forward(x)


class Slow(SDPAttention):
    def forward(self, x):
        time.sleep(float(os.environ.get("MINIGPT_TEST_SLOW_S", "0.01")))
        return super().forward(x)


@hookimpl
def minigpt_register(registry):
    registry.add("attention", "test.boom", lambda ctx, p: Boom(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias),
                 params=Params, description="raises in forward while MINIGPT_TEST_BOOM=1", capabilities={"causal"})
    registry.add("attention", "test.slow", lambda ctx, p: Slow(ctx.emb_dim, ctx.n_heads, ctx.drop_rate, ctx.qkv_bias),
                 params=Params, description="sleeps 10 ms (MINIGPT_TEST_SLOW_S) per call", capabilities={"causal"})
'''



def write_ablation(tmp: Path, body: str, name: str = "abl.toml", **train) -> Path:
    # peak_flops given: each cell process skips the matmul timing (cells are mostly start-up here)
    base = tiny_spec_data(tmp, train={"peak_flops": 1e12, **train})
    (tmp / "base.toml").write_text(_toml.dumps(base), encoding="utf-8")
    (tmp / "plugins").mkdir(exist_ok=True)
    (tmp / "plugins" / "testattn.py").write_text(PLUGIN, encoding="utf-8")
    path = tmp / name
    path.write_text(body, encoding="utf-8")
    return path



def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def cells_by_id(root: Path) -> dict:
    return {c["id"]: c for c in manifest_of(root)["cells"]}


def final_val(run_dir: str | Path) -> float:
    vals = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in vals if "val/loss" in r][-1]


def ablate_in_process(*args, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`minigpt ablate ARGS` run by this process (its cells are still child processes): (status, stdout,
    stderr). For module fixtures, which cannot use capsys: the working directory, the variables and the
    process-wide plugin registry are restored afterwards, as the isolated_plugins fixture does per test."""
    from minigpt_core.base.loader import PLUGIN_PATH_ENV_VAR, reset_registry
    from minigpt_core.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv(PLUGIN_PATH_ENV_VAR, "")  # recorded, so it is restored (or removed) on exit
        mp.delenv(PLUGIN_PATH_ENV_VAR)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        reset_registry()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(["ablate", *map(str, args)])
        finally:
            reset_registry()
    return status, out.getvalue(), err.getvalue()


def study_trials(root: Path, study: str, db: str | None = None) -> list:
    """The COMPLETE trials of an ablation's tuning study (tune/<study>.db, or the given db path under tune/)."""
    import optuna
    from optuna.trial import TrialState

    path = root / "tune" / (db or f"{study}.db")
    return optuna.load_study(study_name=study, storage=f"sqlite:///{path}").get_trials(states=(TrialState.COMPLETE,))


def tuned_table(root: Path) -> list[str]:
    """The rows of report.md's "Tuned `train.lr`" table."""
    lines = (root / "report.md").read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines[lines.index("## Tuned `train.lr`"):] if ln.startswith("| ")]
