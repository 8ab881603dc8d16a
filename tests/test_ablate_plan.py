"""`minigpt ablate`'s plan: names made from axes, the cell limit, validation once per distinct spec,
variants that resolve to the same spec, a selection of cells (--variants/--seeds), and what the
report embeds. A file of its own so that it runs beside the other ablation files.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from ablation_utils import cells_by_id, write_ablation
from minigpt_core.base import toml as _toml
from training_utils import ROOT, cli


@pytest.fixture(autouse=True)
def _clean_plugin_state(isolated_plugins):
    yield


def _one_error_paragraph(status: int, err: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error:") == 1 and "\n\n" not in err.strip(), err


# -- names made from axes -------------------------------------------------------------------------------
LONG = "x" * 70  # five string axes of 71-character values: a 300-character name before the fix


def _long_axes_file(tmp: Path) -> Path:
    return write_ablation(tmp, f'''
name = "long"
base = "base.toml"
seeds = [1]
[axes]
"description" = ["{LONG}1", "{LONG}2"]
"train.sample_prompt" = ["{LONG}3"]
"train.attention_prompt" = ["{LONG}4"]
"wandb.project" = ["{LONG}5"]
"wandb.entity" = ["{LONG}6"]
''')


def test_long_axis_values_make_short_unique_names_and_the_full_values_stay_visible(tmp_path, capsys,
                                                                                      monkeypatch):
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.file import _NAME
    from minigpt_core.ablation.report import write_report
    from minigpt_core.ablation.runner import reconcile, write_manifest

    path = _long_axes_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    plan = load_plan(path, probe=False)
    names = list(plan.variants)
    assert len(names) == 2 and len(set(names)) == 2  # the two differ only after the 355th character
    for name in names:
        assert _NAME.fullmatch(name) and len(name) <= 64, name
        assert name.startswith("description-xxxx")  # still readable: it starts like the axes
    for cell in plan.cells:  # a directory the file system takes (the old 300-character name was refused)
        cell.exp_dir.mkdir(parents=True)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    assert status == 0, err
    for n in range(1, 7):
        assert f"{LONG}{n}" in out  # every full value, in the overrides column
    # the report shows them too
    manifest = reconcile(plan, None, force=False)
    write_manifest(plan.root, manifest)
    report = write_report(plan.root, log_wandb=False, write=lambda s: None).report.read_text()
    for n in range(1, 7):
        assert f"{LONG}{n}" in report


def test_axis_values_that_make_the_same_name_are_named_in_the_message(tmp_path, capsys, monkeypatch):
    path = write_ablation(tmp_path, '''
base = "base.toml"
[axes]
"description" = ["a b", "a_b"]
''')
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    _one_error_paragraph(status, err)
    assert "'description-a_b'" in err
    assert 'description = "a b"' in err and 'description = "a_b"' in err
    assert "rename the named variant" not in err  # the file has no named variant
    assert not (tmp_path / "runs").exists()


# -- the number of cells ----------------------------------------------------------------------------------
MANY = '''
name = "many"
base = "base.toml"
seeds = [{seeds}]
[axes]
"train.lr" = [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.011]
'''


def test_more_cells_than_the_maximum_are_refused_unless_max_cells_raises_it(tmp_path, capsys, monkeypatch):
    # 11 variants x 91 seeds = 1,001 cells, one over the default maximum
    path = write_ablation(tmp_path, MANY.format(seeds=", ".join(map(str, range(91)))))
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    _one_error_paragraph(status, err)
    assert "1,001 cells" in err and "--max-cells 1001" in err
    assert not (tmp_path / "runs").exists()
    status, out, err = cli(capsys, "ablate", path, "--dry-run", "--max-cells", "1001")
    assert status == 0, err
    # the count comes first, before the cells are built and checked
    assert out.splitlines()[0] == "ablation many: 1001 cells (11 variants x 91 seeds); checking them"
    assert out.count("/seed-") == 1001 and "all cells are valid" in out


def test_each_distinct_spec_is_validated_once_and_each_distinct_model_counted_once(tmp_path, monkeypatch):
    from minigpt_core.ablation import budgets, load_plan, plan as plan_module
    from minigpt_core.spec import dump_spec, parse_spec

    path = write_ablation(tmp_path, '''
base = "base.toml"
seeds = [1, 2, 3, 4]
[axes]
"train.lr" = [0.001, 0.002, 0.003]
"model.n_layers" = [1, 2]
''')
    calls = {"parse_spec": 0, "summary": 0}
    real_parse, real_summary = plan_module.parse_spec, budgets._summary

    def counting_parse(*args, **kwargs):
        calls["parse_spec"] += 1
        return real_parse(*args, **kwargs)

    def counting_summary(*args, **kwargs):
        calls["summary"] += 1
        return real_summary(*args, **kwargs)

    monkeypatch.setattr(plan_module, "parse_spec", counting_parse)
    monkeypatch.setattr(budgets, "_summary", counting_summary)
    plan = load_plan(path, probe=False)
    assert len(plan.cells) == 24
    assert calls == {"parse_spec": 6, "summary": 2}  # 6 variants; 2 models (n_layers), whatever the lr
    # each seed's cell is the spec its own raw data parses to, with its own seed
    for cell in plan.cells:
        again = parse_spec(_toml.loads(dump_spec(cell.spec)))
        assert again == cell.spec and dump_spec(again) == dump_spec(cell.spec)
        assert cell.spec.seed == cell.seed and cell.spec.name == f"seed-{cell.seed}"
        assert cell.spec.wandb.config["seed"] == cell.seed and cell.spec.wandb.config["variant"] == cell.variant
    by_n = {}
    for cell in plan.cells:
        by_n.setdefault(cell.spec.model.n_layers, set()).add(cell.params)
    assert len(by_n[1]) == len(by_n[2]) == 1 and by_n[1] != by_n[2]  # the counts are each model's own


def test_a_seed_the_spec_refuses_is_refused_in_the_ablation_file(tmp_path, capsys):
    path = write_ablation(tmp_path, 'base = "base.toml"\nseeds = [1, 9223372036854775808]\n[variants.a]\n')
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    _one_error_paragraph(status, err)
    assert "seeds" in err and "2**63" in err


# -- variants that resolve to the same spec --------------------------------------------------------------
def test_no_shipped_ablation_has_two_variants_with_the_same_spec():
    from minigpt_core.ablation import load_plan

    files = sorted((ROOT / "experiments" / "ablations").glob("*.toml"))
    assert files
    for file in files:
        plan = load_plan(file, probe=False)
        assert plan.same_spec == [], f"{file.name}: variants {plan.same_spec} resolve to the same spec"


def test_the_shipped_attention_ablation_compares_book_with_sdpa():
    from minigpt_core.ablation import load_plan

    plan = load_plan(ROOT / "experiments" / "ablations" / "attention.toml", probe=False)
    names = {c.variant: c.spec.model.attention.name for c in plan.cells}
    assert names == {"book": "book.multihead", "sdpa": "torch.sdpa", "rope": "modern.rope"}


def test_dry_run_warns_about_variants_that_resolve_to_the_same_spec(tmp_path, capsys, monkeypatch):
    # "as_is" is the base as it is, "same" names the base's own attention: the same model, trained the same way
    from minigpt_core.spec import load_spec

    write_ablation(tmp_path, "")
    base_attention = load_spec(tmp_path / "base.toml").model.attention.name
    path = write_ablation(tmp_path, f'''
base = "base.toml"
[variants.as_is]
[variants.same]
"model.attention.name" = "{base_attention}"
[variants.rms]
"model.norm.name" = "modern.rmsnorm"
''')
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--dry-run")
    assert status == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "variants as_is, same resolve to the same spec" in warning and "rms" not in warning


# -- a selection of cells --------------------------------------------------------------------------------
SMALL = '''
name = "pick"
base = "base.toml"
seeds = [1, 2]
[variants.ln]
[variants.rms]
"model.norm.name" = "modern.rmsnorm"
'''


def test_unknown_variants_or_seeds_are_one_message_listing_the_valid_ones(tmp_path, capsys, monkeypatch):
    path = write_ablation(tmp_path, SMALL)
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--variants", "rms,nope", "--seeds", "1,7")
    _one_error_paragraph(status, err)
    assert "'nope'" in err and "ln, rms" in err  # the unknown name and the valid ones
    assert "no seed 7" in err and "seeds are: 1, 2" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # one cell as a `minigpt train` process
def test_variants_and_seeds_run_only_those_cells_and_the_rest_are_missing(tmp_path, capsys, monkeypatch):
    path = write_ablation(tmp_path, SMALL, max_steps=4, eval_every=2, save_every=0)
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "ablate", path, "--variants", "rms", "--seeds", "2")
    assert status == 0, out + err
    root = tmp_path / "runs" / "pick"
    cells = cells_by_id(root)
    assert {i: c["status"] for i, c in cells.items()} == {
        "ln/seed-1": "pending", "ln/seed-2": "pending", "rms/seed-1": "pending", "rms/seed-2": "done"}
    assert [c["run_dir"] for c in cells.values() if c["run_dir"]] == [cells["rms/seed-2"]["run_dir"]]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["rms"]  # no other cell was started
    assert "1 of 4 cells selected" in out
    with (root / "results.csv").open(newline="") as f:
        rows = {(r["variant"], r["seed"]): r["status"] for r in csv.DictReader(f)}
    assert rows == {("ln", "1"): "missing", ("ln", "2"): "missing", ("rms", "1"): "missing", ("rms", "2"): "done"}
    report = (root / "report.md").read_text()
    assert "failed" not in report and "**2 missing**" in report and "**1 missing**" in report
    # the full run afterwards runs the three others, keeping the one done
    status, out, err = cli(capsys, "ablate", path, "--no-report")
    assert status == 0, out + err
    assert "1 done, 3 to run" in out and all(c["status"] == "done" for c in cells_by_id(root).values())
    assert cells_by_id(root)["rms/seed-2"]["run_dir"] == cells["rms/seed-2"]["run_dir"]



# -- what the report embeds -----------------------------------------------------------------------------
NASTY = "a | b `tick` <img src=x onerror=alert(1)>"


def _table_rows(text: str) -> list[list[str]]:
    """The markdown table's rows, split at the pipes that are not escaped."""
    return [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in text.splitlines() if line.startswith("|")]


def test_report_escapes_the_description_overrides_and_error_text_it_embeds(tmp_path, capsys, monkeypatch):
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.runner import reconcile, write_manifest

    path = write_ablation(tmp_path, f'''
name = "nasty"
description = """{NASTY}
second line"""
base = "base.toml"
seeds = [1]
[variants.plain]
[variants.odd]
"description" = "{NASTY}"
''')
    monkeypatch.chdir(tmp_path)
    plan = load_plan(path, probe=False)
    manifest = reconcile(plan, None, force=False)
    for rec in manifest["cells"]:
        if rec["variant"] == "odd":  # a failed cell whose error text holds them too, over two lines
            rec.update(status="failed", error=f"RuntimeError: {NASTY}\nTraceback line <script>x</script>")
    write_manifest(plan.root, manifest)
    status, out, err = cli(capsys, "report", plan.root, "--no-wandb")
    assert status == 0, err
    text = (plan.root / "report.md").read_text()
    assert "<img" not in text and "<script" not in text and "onerror=alert(1)" in text
    rows = _table_rows(text.split("## Statistics")[0])
    assert len(rows) == 4  # header, rule, two variants
    assert {len(r) for r in rows} == {8}
    stats_rows = _table_rows(text.split("## Statistics")[1])  # header, rule, the variant compared
    assert len(stats_rows) == 3 and {len(r) for r in stats_rows} == {10}  # its header's |Δ| is escaped
    odd = next(r for r in rows if "odd" in r[0])
    assert "tick" in odd[1] and "`tick`" not in odd[1]  # a backtick would open a code span
    # the failed cell's note is one line, with the error escaped
    (note,) = [line for line in text.splitlines() if "**failed**" in line]
    assert "onerror=alert(1)" in note and "Traceback line" in note
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    # the only images are the report's own figures; our code spans stay
    assert re.findall(r'<img src="([^"]*)"', html) == ["curves.png", "throughput.png"]
    assert "<img src=x" not in html and "<script" not in html and "<code>" in html
    bodies = [b.split("</tbody>")[0] for b in html.split("<tbody>")[1:]]
    assert [[row.count("<td") for row in b.split("<tr>")[1:]] for b in bodies] == [[8, 8], [10]]
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "a | b" in html  # shown as the text it is
