"""`minigpt ablate` / `report`: the plan's validation and budgets, the manifest, reruns, the report.

One module-scoped ablation (2 good variants and one whose attention raises in forward, 2 seeds)
is shared by the report, failure and rerun tests. Interruption and resume are in test_ablate_resume.py,
the runner's cell states and executors in test_ablate_runner.py (files run on separate test workers).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ablation_utils import ablate_in_process, cells_by_id, final_val, manifest_of, write_ablation
from minigpt_core.base import toml as _toml
from training_utils import ROOT, cli


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


MAIN = '''
name = "main"
description = "norms, and a variant that fails at run time"
base = "base.toml"
seeds = [1, 2]

[variants.ln]

[variants.rms]
"model.norm.name" = "modern.rmsnorm"

[variants.boom]
plugins = ["plugins/testattn.py"]
"model.attention.name" = "test.boom"
'''


@pytest.fixture(scope="module")
def main_ablation(tmp_path_factory):
    """The shared ablation, run once: 6 cells, 2 at a time; the boom cells fail.

    `minigpt ablate` runs in this process (a start-up saved); its cells are child processes as always.
    The console script and its exit codes are covered by test_ablate_resume.py and test_ablate_runner.py."""
    tmp = tmp_path_factory.mktemp("ablation")
    path = write_ablation(tmp, MAIN)
    status, out, err = ablate_in_process(path, "--jobs", "2", cwd=tmp, env={"MINIGPT_TEST_BOOM": "1"})
    return tmp, path, tmp / "runs" / "main", SimpleNamespace(returncode=status, stdout=out, stderr=err)


# -- validation before anything runs -------------------------------------------------------------------
def test_a_bad_parameter_in_one_cell_runs_nothing_and_names_cell_field_and_allowed_values(tmp_path, capsys):
    path = write_ablation(tmp_path, '''
base = "base.toml"
seeds = [1, 2]
[variants.ok]
[variants.bad_schedule]
"train.schedule" = "cosin"
[variants.bad_norm]
"model.norm.name" = "book.layernrom"
''')
    status, out, err = cli(capsys, "ablate", path)
    assert status == 2
    assert "Traceback" not in err
    # every problem at once: both bad variants, their field, the allowed values
    assert "variant 'bad_schedule' (seeds 1, 2): train.schedule" in err
    assert "'cosine', 'linear' or 'constant'" in err
    assert "variant 'bad_norm' (seeds 1, 2): model.norm.name" in err and "book.layernorm" in err
    assert "nothing was run" in err
    assert not (tmp_path / "runs").exists()


def test_reserved_fields_and_bad_file_structure_are_refused(tmp_path, capsys):
    path = write_ablation(tmp_path, '''
base = "base.toml"
seeds = [1, 1]
[variants.a]
''')
    status, _, err = cli(capsys, "ablate", path)
    assert status == 2 and "seeds: seeds must be distinct" in err and "Invalid ablation file" in err
    path = write_ablation(tmp_path, '''
base = "base.toml"
combine = "zip"
[axes]
"train.lr" = [1e-3, 2e-3]
"model.n_layers" = [1]
''')
    status, _, err = cli(capsys, "ablate", path)
    assert status == 2 and "combine = \"zip\" needs axes of equal length" in err
    path = write_ablation(tmp_path, '''
base = "base.toml"
[variants.a]
seed = 5
''')
    status, _, err = cli(capsys, "ablate", path)
    assert status == 2 and "variant 'a'" in err and "seed: cannot be set by a variant" in err


def test_dry_run_lists_grid_cells_and_matches_flops(tmp_path, capsys):
    path = write_ablation(tmp_path, '''
base = "base.toml"
seeds = [3]
budget = "flops"
[axes]
"model.n_layers" = [2, 1]
"train.lr" = [0.001, 0.002]
''')
    status, out, err = cli(capsys, "ablate", path, "--dry-run", "--set", "train.max_steps=10")
    assert status == 0, err
    assert "4 cells (4 variants x 1 seeds)" in out
    from minigpt_core.ablation import load_plan

    plan = load_plan(path, ["train.max_steps=10"])
    steps = {c.variant: c.steps for c in plan.cells}
    fpt = {c.variant: c.flops_per_token for c in plan.cells}
    assert list(steps) == ["n_layers-2_lr-0.001", "n_layers-2_lr-0.002", "n_layers-1_lr-0.001", "n_layers-1_lr-0.002"]
    assert steps["n_layers-2_lr-0.001"] == 10
    # the 1-layer model is cheaper per token: it gets more steps for the same compute
    assert steps["n_layers-1_lr-0.001"] == round(10 * fpt["n_layers-2_lr-0.001"] / fpt["n_layers-1_lr-0.001"]) > 10
    assert not (tmp_path / "runs").exists()


# -- the shared ablation ---------------------------------------------------------------------------------
@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_failing_cell_does_not_stop_the_others_and_is_reported(main_ablation):
    tmp, path, root, proc = main_ablation
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cells = cells_by_id(root)
    assert {i: c["status"] for i, c in cells.items()} == {
        "ln/seed-1": "done", "ln/seed-2": "done", "rms/seed-1": "done", "rms/seed-2": "done",
        "boom/seed-1": "failed", "boom/seed-2": "failed"}
    assert "boom: this attention always fails" in cells["boom/seed-1"]["error"]
    # the layout: runs/<ablation>/<variant>/seed-<s>/<run>
    run = Path(cells["rms/seed-2"]["run_dir"])
    assert run.parent == root / "rms" / "seed-2" and (run / "metrics.jsonl").is_file()
    spec = _toml.loads((run / "spec.toml").read_text())
    assert spec["seed"] == 2 and spec["model"]["norm"]["name"] == "modern.rmsnorm"
    assert spec["wandb"]["group"] == "main" and spec["wandb"]["job_type"] == "rms"
    assert spec["wandb"]["config"]["overrides"] == {"model.norm.name": "modern.rmsnorm"}
    report = (root / "report.md").read_text()
    assert "**2 failed**" in report and "boom: this attention always fails" in report
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert [r["status"] for r in rows if r["variant"] == "boom"] == ["failed", "failed"]
    assert "done, 2 failed, 0 remaining" in proc.stdout


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_report_statistics_match_an_independent_computation(main_ablation):
    from scipy import stats

    tmp, path, root, proc = main_ablation
    cells = cells_by_id(root)
    val = {(c["variant"], c["seed"]): final_val(c["run_dir"]) for c in cells.values() if c["status"] == "done"}
    rows = {(r["variant"], int(r["seed"])): r for r in csv.DictReader((root / "results.csv").open())}
    for key, v in val.items():
        assert float(rows[key]["final_val_loss"]) == pytest.approx(v, abs=1e-12)
    ln = [val[("ln", s)] for s in (1, 2)]
    rms = [val[("rms", s)] for s in (1, 2)]
    mean, std = sum(rms) / 2, math.sqrt(sum((x - sum(rms) / 2) ** 2 for x in rms))  # ddof 1 with n = 2
    d = [b - a for a, b in zip(ln, rms)]
    dm, ds = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
    half = stats.t.ppf(0.975, 1) * ds / math.sqrt(2)
    # the variant's row in the table of variants, then in the statistics table
    line, stats_line = [ln_ for ln_ in (root / "report.md").read_text().splitlines() if ln_.startswith("| `rms`")]
    assert f"{mean:.4f} ± {std:.4f} (2)" in line
    assert f"| 2 | {dm:+.4f} [{dm - half:+.4f}, {dm + half:+.4f}] |" in stats_line
    assert stats_line.endswith("| needs ≥3 seeds (n = 2) |")
    assert "fewer than 3 finished seeds" in (root / "report.md").read_text()
    assert "same training tokens" in (root / "report.md").read_text()


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_figures_have_one_line_per_variant_with_results(main_ablation):
    from minigpt_core.ablation.report import write_report

    tmp, path, root, proc = main_ablation
    for name in ("curves.png", "throughput.png"):
        data = (root / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    files = write_report(root, log_wandb=False, write=lambda s: None)
    assert files.curves_figure_lines == {"ln": 2, "rms": 2}  # boom has no curve: it failed


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_curves_and_their_legend_count_only_done_cells(main_ablation):
    from minigpt_core.ablation.report import write_report

    tmp, path, root, proc = main_ablation
    manifest = root / "manifest.json"
    kept = manifest.read_bytes()
    data = json.loads(kept)
    next(c for c in data["cells"] if c["variant"] == "ln")["status"] = "running"  # its run has val records
    try:
        manifest.write_text(json.dumps(data))
        files = write_report(root, log_wandb=False, write=lambda s: None)
        assert files.curves_figure_lines == {"ln": 1, "rms": 2}
    finally:
        manifest.write_bytes(kept)
        write_report(root, log_wandb=False, write=lambda s: None)


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_report_command_rebuilds_the_files_and_refuses_a_plain_directory(main_ablation, capsys, tmp_path):
    tmp, path, root, proc = main_ablation
    (root / "report.md").unlink()
    status, out, err = cli(capsys, "report", root, "--no-wandb")
    assert status == 0, err
    assert "| `rms` |" in out and (root / "report.md").is_file()
    status, out, err = cli(capsys, "report", tmp_path)
    assert status == 2 and "not an ablation directory" in err


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_report_of_a_moved_ablation_reads_the_runs_where_they_are_now(main_ablation, capsys, tmp_path):
    # The manifest's run_dirs name the old place; the check that keeps each cell's run inside its own
    # directory must follow the ablation's directory, not refuse it or read the old runs.
    import shutil

    tmp, path, root, proc = main_ablation
    moved = tmp_path / "elsewhere" / "main"
    shutil.copytree(root, moved, symlinks=True)
    status, out, err = cli(capsys, "report", moved, "--no-wandb")
    assert status == 0, err
    rows = {(r["variant"], r["seed"]): r for r in csv.DictReader((moved / "results.csv").open())}
    for cell in manifest_of(root)["cells"]:
        row = rows[(cell["variant"], str(cell["seed"]))]
        if cell["status"] == "done":
            assert Path(row["run_dir"]).parent == moved / cell["variant"] / f"seed-{cell['seed']}"
            assert float(row["final_val_loss"]) == pytest.approx(final_val(cell["run_dir"]))


def test_band_figure_draws_mean_and_min_max_of_seeds():
    from minigpt_core.viz.curves import band_figure

    fig = band_figure({"a": [([1, 2], [4.0, 3.0]), ([1, 2], [2.0, 1.0])], "b": [([1, 2], [5.0, 5.0])]}, ylabel="y")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"a (n=2)", "b (n=1)"}
    assert list(lines["a (n=2)"].get_ydata()) == [3.0, 2.0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 1.0 and band.max() == 4.0


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_rerun_skips_done_and_retry_failed_reruns_only_the_failed(main_ablation, monkeypatch, capsys):
    tmp, path, root, proc = main_ablation
    before = cells_by_id(root)
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MINIGPT_TEST_BOOM", "1")
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 1 and "0 to run, 2 failed (rerun them with --retry-failed)" in out
    assert cells_by_id(root) == before  # nothing ran
    monkeypatch.setenv("MINIGPT_TEST_BOOM", "0")  # the bug is fixed
    status, out, err = cli(capsys, "ablate", path, "--retry-failed", "--jobs", "2")
    assert status == 0, out + err
    after = cells_by_id(root)
    assert all(c["status"] == "done" for c in after.values())
    for cid in ("ln/seed-1", "ln/seed-2", "rms/seed-1", "rms/seed-2"):
        assert after[cid]["run_dir"] == before[cid]["run_dir"] and after[cid]["attempts"] == 1
    assert after["boom/seed-1"]["attempts"] == 2 and after["boom/seed-1"]["error"] is None
    assert out.count("starting") == 2
    report = (root / "report.md").read_text()
    assert "failed**" not in report and "| `boom` |" in report


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_a_changed_file_is_refused_for_finished_cells_unless_force(main_ablation, monkeypatch, capsys):
    tmp, path, root, proc = main_ablation
    monkeypatch.chdir(tmp)
    status, out, err = cli(capsys, "ablate", path, "--dry-run", "--set", "train.lr=0.001")
    assert status == 0  # a dry run changes nothing
    status, out, err = cli(capsys, "ablate", path, "--set", "train.lr=0.001")
    assert status == 2 and "finished cell(s) a different spec" in err and "train.lr: 0.003 -> 0.001" in err
    assert "--force" in err and manifest_of(root)["settings"]["set"] == []


# -- the report's ratios and the runner's states, without the shared ablation ------------------------------
def _done_ablation(tmp: Path, speeds: dict[str, float], memory: dict[str, float]) -> Path:
    """The manifest of a real plan, every cell done, each run's metrics.jsonl written with these numbers."""
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.runner import reconcile, write_manifest

    path = write_ablation(tmp, '''
name = "ratios"
base = "base.toml"
seeds = [1, 2]
[variants.base]
[variants.fast]
"train.lr" = 0.002
''')
    plan = load_plan(path, probe=False)
    manifest = reconcile(plan, None, force=False)
    for rec in manifest["cells"]:
        run = plan.root / rec["variant"] / f"seed-{rec['seed']}" / "20260101-000000"
        run.mkdir(parents=True)
        wobble = 1.1 if rec["seed"] == 1 else 0.9  # the seeds' mean is the given number
        records = [{"step": 0, "time": 100.0, "event": "start", "total_steps": 4}]
        records += [{"step": s, "time": 100.0 + s, "train/loss": 3.0, "train/tokens": 256 * s,
                     "train/tokens_per_s": speeds[rec["variant"]] * wobble,
                     "train/peak_memory_mb": memory[rec["variant"]] * wobble} for s in (1, 2, 3, 4)]
        records += [{"step": 4, "time": 104.5, "val/loss": 2.5}, {"step": 4, "time": 105.0, "event": "finished"}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rec.update(status="done", run_dir=str(run), attempts=1)
    write_manifest(plan.root, manifest)
    return plan.root


def test_report_gives_tokens_per_s_and_peak_memory_as_variant_over_baseline(tmp_path, capsys):
    root = _done_ablation(tmp_path, speeds={"base": 1000.0, "fast": 2000.0}, memory={"base": 100.0, "fast": 50.0})
    status, out, err = cli(capsys, "report", root, "--no-wandb")
    assert status == 0, err
    table = (root / "report.md").read_text()
    cols = {v: [c.strip() for c in next(line for line in table.splitlines() if line.startswith(f"| `{v}`"))
                .split("|")] for v in ("base", "fast")}
    # | variant | overrides | params | steps | loss | tokens/s | peak memory | cells |
    assert cols["base"][6:8] == ["1,000 (1.00x)", "100 (1.00x)"]
    assert cols["fast"][6:8] == ["2,000 (2.00x)", "50 (0.50x)"]  # twice as fast, half the memory


# -- interruption ----------------------------------------------------------------------------------------
# -- submitit ------------------------------------------------------------------------------------------
def test_time_budget_gives_each_variant_the_steps_that_fit_the_time(tmp_path):
    from minigpt_core.ablation import load_plan

    body = '''
base = "base.toml"
seeds = [1, 2]
budget = "time"
time_budget_s = 5
[variants.small]
[variants.wide]
"model.emb_dim" = 128
"model.n_layers" = 4
'''
    path = write_ablation(tmp_path, body)
    plan = load_plan(path)
    # Each variant is timed here and now: its steps are the budget over its own measured step time.
    # That holds at any speed and load; which variant gets more steps does not (a loaded probe of
    # the small model can be as slow as the wide one's), so it is not asserted.
    assert set(plan.step_seconds) == {"small", "wide"} and plan.time_budget_s == 5
    for cell in plan.cells:
        per_step = plan.step_seconds[cell.variant]
        assert per_step > 0 and cell.steps == max(1, round(5 / per_step)), (cell.variant, per_step, cell.steps)
        assert cell.spec.train.max_steps == cell.steps and cell.tokens == cell.steps * cell.tokens_per_step
    assert "same wall-clock time: 5.0 s" in plan.budget_summary
    # no time given: the baseline's own steps at its measured speed, so it keeps exactly its steps
    path = write_ablation(tmp_path, body.replace("time_budget_s = 5\n", ""), name="no_time.toml")
    plan = load_plan(path)
    base_steps = _toml.loads((tmp_path / "base.toml").read_text())["train"]["max_steps"]
    assert plan.time_budget_s == pytest.approx(base_steps * plan.step_seconds["small"])
    steps = {c.variant: c.steps for c in plan.cells}
    assert steps["small"] == base_steps
    assert steps["wide"] == max(1, round(plan.time_budget_s / plan.step_seconds["wide"]))
    # a rerun takes the steps from the manifest instead of timing again
    again = load_plan(path, time_steps={"small": 7, "wide": 3})
    assert [c.steps for c in again.cells] == [7, 7, 3, 3] and again.step_seconds == {}


@pytest.mark.slow  # the shared ablation: 6 cells, each a `minigpt train` process
def test_report_is_logged_to_wandb_offline_in_a_run_of_its_own(main_ablation, monkeypatch):
    from minigpt_core.ablation.report import write_report

    tmp, path, root, proc = main_ablation
    monkeypatch.setenv("WANDB_MODE", "offline")
    lines = []
    write_report(root, write=lines.append)
    (run,) = (root / "wandb").glob("offline-run-*")
    assert any(p.suffix == ".wandb" for p in run.iterdir())
    assert any("W&B offline report run" in ln for ln in lines), lines


def test_the_example_ablation_is_valid_and_matches_tokens():
    from minigpt_core.ablation import load_plan

    plan = load_plan(ROOT / "experiments" / "ablations" / "attention.toml")
    assert [v for v in plan.variants] == ["book", "sdpa", "rope"] and len(plan.cells) == 9
    assert {c.tokens for c in plan.cells} == {120 * 32 * 128}
    assert plan.root == (Path("runs") / "attention").resolve()
