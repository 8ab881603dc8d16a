"""Ablations with [evaluate]: each cell's final checkpoint through lm_eval, task columns in results.csv and
report.md (mean ± std, the paired difference with its interval, next to the validation loss), loss and
accuracy that disagree in sign marked; a changed [evaluate] evaluates again without training again."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from minigpt_core.ablation.report import disagreements  # noqa: E402
from minigpt_core.base import toml as _toml  # noqa: E402
from minigpt_core.downstream.results import TaskScore  # noqa: E402
from training_utils import cli, tiny_spec_data  # noqa: E402

ABLATION = """
name = "evaltiny"
base = "base.toml"
seeds = [1, 2]
[variants.base]
[variants.wide]
"model.emb_dim" = 48
[evaluate]
tasks = ["pydoc_mc"]
limit = {limit}
batch_size = 16
"""


def _write(tmp: Path, limit: int) -> Path:
    base = tiny_spec_data(tmp, train={"max_steps": 4, "save_every": 4, "eval_every": 4, "peak_flops": 1e12})
    base["data"] = {"source": {"name": "python-docs"}, "cache_dir": str(tmp / "cache"), "workers": 1}
    (tmp / "base.toml").write_text(_toml.dumps(base), encoding="utf-8")
    path = tmp / "abl.toml"
    path.write_text(ABLATION.format(limit=limit), encoding="utf-8")
    return path


@pytest.mark.slow
def test_an_ablation_with_evaluate_reports_task_accuracy_next_to_the_loss(tmp_path, capsys):
    path = _write(tmp_path, limit=8)
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    root = tmp_path / "runs" / "evaltiny"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["settings"]["evaluate"]["tasks"] == ["pydoc_mc"]
    runs = {}
    for cell in manifest["cells"]:
        assert cell["status"] == "done" and cell["eval"]["status"] == "done", cell
        assert cell["eval"]["options"]["limit"] == 8
        result = json.loads((Path(cell["run_dir"]) / "eval" / "pydoc_mc.json").read_text())
        assert result["minigpt"]["step"] == 4 and result["n-samples"]["pydoc_mc"]["effective"] == 8
        runs[cell["id"]] = (cell["run_dir"], result["results"]["pydoc_mc"]["acc,none"])
    assert "evaluating step_00000004 on pydoc_mc" in out
    status, out, err = cli(capsys, "report", root, "--no-wandb")
    assert status == 0, err
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "pydoc_mc/acc" in rows[0]
    for row in rows:
        run_dir, acc = runs[f"{row['variant']}/seed-{row['seed']}"]
        assert row["run_dir"] == run_dir and float(row["pydoc_mc/acc"]) == acc
    report = (root / "report.md").read_text()
    assert "## Downstream tasks" in report and "### `pydoc_mc`: acc (higher is better)" in report
    table = report[report.index("### `pydoc_mc`"):]
    (wide,) = [line for line in table.splitlines() if line.startswith("| `wide` |")]
    cells = [c.strip() for c in wide.strip("|").split("|")]
    # val loss mean ± std (n), Δ val loss [CI], acc mean ± std (n), Δ acc [CI], p, loss and acc
    assert cells[1].endswith("(2)") and "[" in cells[2] and cells[3].endswith("(2)") and "[" in cells[4]
    accs = [runs[f"wide/seed-{s}"][1] for s in (1, 2)]
    assert cells[3].startswith(f"{sum(accs) / 2:.4f} ± ")
    assert cells[6] in ("agree", "**disagree**")
    assert "**Loss and task score disagree in sign:**" in report

    # [evaluate] changed (another limit): evaluated again, nothing trained again
    path.write_text(ABLATION.format(limit=5), encoding="utf-8")
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    assert "0 to run, 4 trained cell(s) to evaluate" in out and "starting" not in out and "resuming" not in out
    again = json.loads((root / "manifest.json").read_text())
    for cell in again["cells"]:
        assert cell["run_dir"] == runs[cell["id"]][0] and cell["eval"]["options"]["limit"] == 5
        result = json.loads((Path(cell["run_dir"]) / "eval" / "pydoc_mc.json").read_text())
        assert result["n-samples"]["pydoc_mc"]["effective"] == 5
    # and a rerun with nothing changed does nothing
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0 and "0 to run" in out and "to evaluate" not in out, out
    # `minigpt ablate` killed (SIGKILL) while a cell was evaluating leaves it running, its evaluation running:
    # the next run keeps its training and evaluates it again
    killed = json.loads((root / "manifest.json").read_text())
    cell = killed["cells"][1]
    cell["status"], cell["eval"]["status"] = "running", "running"
    (root / "manifest.json").write_text(json.dumps(killed), encoding="utf-8")
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    assert "0 to run, 1 trained cell(s) to evaluate" in out and "starting" not in out and "resuming" not in out
    after = {c["id"]: c for c in json.loads((root / "manifest.json").read_text())["cells"]}
    assert after[cell["id"]]["status"] == "done" and after[cell["id"]]["eval"]["status"] == "done"
    assert after[cell["id"]]["run_dir"] == cell["run_dir"] and after[cell["id"]]["attempts"] == cell["attempts"]


def test_disagreement_is_a_lower_loss_with_a_lower_accuracy_or_the_reverse():
    def row(variant, seed, loss, acc):
        return {"variant": variant, "seed": seed, "status": "done", "final_val_loss": loss,
                "eval": {"t": TaskScore("t", "acc", acc, 0.01)}}

    rows = [row("base", 1, 2.0, 0.30), row("base", 2, 2.1, 0.31),
            row("good", 1, 1.9, 0.35), row("good", 2, 2.05, 0.37),     # lower loss, higher accuracy: agree
            row("odd", 1, 1.8, 0.25), row("odd", 2, 1.95, 0.27),       # lower loss, lower accuracy: disagree
            row("worse", 1, 2.3, 0.33), row("worse", 2, 2.45, 0.34)]   # higher loss, higher accuracy: disagree
    found = disagreements(["base", "good", "odd", "worse"], rows, "base")
    assert set(found) == {"t/acc"} and set(found["t/acc"]) == {"odd", "worse"}
    dl, da = found["t/acc"]["odd"]
    assert dl == pytest.approx(-0.175) and da == pytest.approx(-0.045)
