"""``minigpt evaluate``: lm_eval's evaluator on a run's checkpoint, RUN/eval/<task>.json, W&B, bad input;
and ``minigpt-lm-eval``, lm_eval's own command line with the minigpt model type."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from minigpt_core.spec import parse_spec  # noqa: E402
from minigpt_core.train.trainer import train  # noqa: E402
from training_utils import PATIENCE_S, cli, tiny_spec_data  # noqa: E402

LM_EVAL_KEYS = {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny char model trained 4 steps on python-docs (so its characters cover the shipped tasks)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = tiny_spec_data(tmp, train={"max_steps": 4, "save_every": 4, "eval_every": 4})
    data["data"] = {"source": {"name": "python-docs"}, "cache_dir": str(tmp / "cache"), "workers": 1}
    result = train(parse_spec(data), progress=False, write=lambda s: None)
    return result.run_dir, result.checkpoint


def test_evaluate_writes_lm_evals_results_per_task_and_prints_a_table(run, capsys, tmp_path):
    run_dir, ckpt = run
    status, out, err = cli(capsys, "evaluate", run_dir, "--tasks", "pydoc_mc,pydoc_cloze", "--limit", "6",
                           "--batch-size", "4", "--no-progress")
    assert status == 0, err
    assert "Traceback" not in err
    files = sorted((run_dir / "eval").glob("*.json"))
    assert [f.name for f in files] == ["pydoc_cloze.json", "pydoc_mc.json"]
    mc = json.loads((run_dir / "eval" / "pydoc_mc.json").read_text())
    assert LM_EVAL_KEYS <= set(mc) and set(mc["results"]) == {"pydoc_mc"}
    result = mc["results"]["pydoc_mc"]
    assert 0 <= result["acc,none"] <= 1 and result["acc_stderr,none"] > 0
    assert mc["n-samples"]["pydoc_mc"]["effective"] == 6 and mc["configs"]["pydoc_mc"]["output_type"] == "multiple_choice"
    assert mc["minigpt"]["step"] == 4 and mc["minigpt"]["checkpoint"] == str(ckpt.resolve())
    cloze = json.loads((run_dir / "eval" / "pydoc_cloze.json").read_text())
    assert set(cloze["results"]) == {"pydoc_cloze"} and "perplexity,none" in cloze["results"]["pydoc_cloze"]
    lines = out.splitlines()
    assert any(line.split()[:3] == ["pydoc_mc", "acc", f"{result['acc,none']:.4f}"] for line in lines), out
    assert any(line.startswith("pydoc_cloze") and " perplexity " in line for line in lines), out
    assert "bootstrapping" not in out  # lm_eval's own prints go to stderr: stdout is the table
    # --out puts them elsewhere; the group name gives both tasks
    status, _, err = cli(capsys, "evaluate", ckpt, "--tasks", "pydoc", "--limit", "3", "--out", tmp_path / "o",
                         "--no-progress")
    assert status == 0, err
    assert sorted(f.name for f in (tmp_path / "o").glob("*.json")) == ["pydoc_cloze.json", "pydoc_mc.json"]


def test_evaluate_gives_what_lm_evals_own_evaluator_gives_for_model_minigpt(run, capsys, tmp_path):
    """The same numbers as lm_eval's simple_evaluate(model="minigpt", model_args=...) with the registry."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from minigpt_core.downstream import register
    from minigpt_core.downstream.tasks import TASKS_DIR

    _, ckpt = run
    status, _, err = cli(capsys, "evaluate", ckpt, "--tasks", "pydoc_mc", "--limit", "8", "--out", tmp_path,
                         "--no-progress", "--no-wandb")
    assert status == 0, err
    ours = json.loads((tmp_path / "pydoc_mc.json").read_text())["results"]["pydoc_mc"]
    register()
    theirs = simple_evaluate(model="minigpt", model_args=f"checkpoint={ckpt},progress=false", tasks=["pydoc_mc"],
                             limit=8, batch_size=2, task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                                             include_defaults=False))
    assert theirs["results"]["pydoc_mc"]["acc,none"] == ours["acc,none"]
    assert theirs["results"]["pydoc_mc"]["acc_norm,none"] == ours["acc_norm,none"]


def test_evaluate_logs_a_table_to_an_offline_wandb_run(run, capsys, tmp_path, monkeypatch):
    from test_wandb import finished_records, history

    _, ckpt = run
    monkeypatch.setenv("WANDB_MODE", "offline")
    status, out, err = cli(capsys, "evaluate", ckpt, "--tasks", "pydoc_mc", "--limit", "4", "--out", tmp_path / "ev",
                           "--no-progress")
    assert status == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("W&B run: ")]
    wandb_dir = Path(line[len("W&B run: "):])
    assert wandb_dir.parent == tmp_path / "wandb"  # beside the results
    (run_file,) = wandb_dir.glob("run-*.wandb")
    (wrun,) = [r.run for r in finished_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert wrun.job_type == "eval" and wrun.display_name == "tiny-test-eval"
    rows = [r for r in history(run_file) if r.get("eval/results/_type") == "table-file"]
    table = json.loads((wandb_dir / "files" / rows[-1]["eval/results/path"]).read_text())
    assert table["columns"] == ["task", "metric", "filter", "value", "stderr", "step"]
    saved = json.loads((tmp_path / "ev" / "pydoc_mc.json").read_text())["results"]["pydoc_mc"]
    assert ["pydoc_mc", "acc", "none", saved["acc,none"], saved["acc_stderr,none"], 4] in table["data"]


# -- bad input: one message, exit 2, nothing evaluated ----------------------------------------------------
def _refused(capsys, *args) -> str:
    status, out, err = cli(capsys, "evaluate", *args)
    assert status == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_an_unknown_task_is_named_with_close_matches(run, capsys):
    run_dir, _ = run
    err = _refused(capsys, run_dir, "--tasks", "pydoc_mcc,pydoc_cloze")
    assert "Unknown task 'pydoc_mcc' (did you mean pydoc_mc" in err and "Nothing was evaluated" in err


def test_a_missing_checkpoint_is_one_message(capsys, tmp_path):
    err = _refused(capsys, tmp_path / "nope", "--tasks", "pydoc_mc")
    assert f"No checkpoint at {tmp_path / 'nope'}" in err


def test_a_shipped_task_whose_data_file_is_missing_is_one_message(run, capsys, tmp_path, monkeypatch):
    from minigpt_core.downstream import tasks

    copy = tmp_path / "tasks"
    shutil.copytree(tasks.TASKS_DIR, copy)
    (copy / "pydoc_mc.jsonl").unlink()
    monkeypatch.setattr(tasks, "TASKS_DIR", copy)
    _, ckpt = run
    err = _refused(capsys, ckpt, "--tasks", "pydoc_mc", "--out", tmp_path / "out")
    assert f"The data file of the task pydoc_mc, {copy / 'pydoc_mc.jsonl'}, is missing" in err
    assert not (tmp_path / "out").exists()
    # lm_eval reading the directory itself (its command line, --include_path) gets the same cause
    sys.path.insert(0, str(copy))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("copied_loader", copy / "loader.py")
        loader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loader)
        with pytest.raises(FileNotFoundError, match="pydoc_mc.jsonl, is missing"):
            loader.pydoc_mc()
    finally:
        sys.path.remove(str(copy))


@pytest.mark.parametrize("args,message", [(["--limit", "0"], "--limit must be > 0"),
                                          (["--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
                                          (["--batch-size", "0"], "--batch-size must be >= 1")])
def test_bad_numbers_are_refused(run, capsys, args, message):
    _, ckpt = run
    assert message in _refused(capsys, ckpt, "--tasks", "pydoc_mc", *args)


# -- lm_eval's own command line ----------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_evals_command_line_runs_the_minigpt_model_type(run, tmp_path):
    _, ckpt = run
    exe = Path(sys.executable).with_name("minigpt-lm-eval")
    proc = subprocess.run([str(exe), "--model", "minigpt", "--model_args", f"checkpoint={ckpt}", "--tasks", "pydoc_mc",
                           "--limit", "8", "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=PATIENCE_S, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|pydoc_mc|" in proc.stdout.replace(" ", "")
    (written,) = tmp_path.glob("out/**/results_*.json")
    theirs = json.loads(written.read_text())["results"]["pydoc_mc"]
    assert 0 <= theirs["acc,none"] <= 1
    assert json.loads(written.read_text())["config"]["model"] == "minigpt"


def test_a_standard_task_passes_through_to_lm_eval_which_downloads_its_data(run, minigpt_cli):
    """hellaswag is lm_eval's: accepted, and its data asked of the Hub (here offline: one clear message).
    A process of its own: the Hub's and datasets' offline switches are read when they are imported."""
    _, ckpt = run
    proc = minigpt_cli("evaluate", str(ckpt), "--tasks", "hellaswag", "--limit", "2", "--no-wandb",
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: The data of a task could not be loaded" in proc.stderr
    assert "(hellaswag) download their data" in proc.stderr


def test_minigpt_runs_shows_a_column_per_task_evaluated(run, capsys):
    run_dir, _ = run
    status, _, err = cli(capsys, "evaluate", run_dir, "--tasks", "pydoc_mc", "--limit", "5", "--no-progress",
                         "--no-wandb")
    assert status == 0, err
    acc = json.loads((run_dir / "eval" / "pydoc_mc.json").read_text())["results"]["pydoc_mc"]["acc,none"]
    status, out, err = cli(capsys, "runs", run_dir.parent.parent)
    assert status == 0, err
    header = out.splitlines()[0].split()
    assert header[:6] == ["run", "started", "status", "steps", "val", "best"] and "pydoc_mc" in header
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith(run_dir.name)]
    assert row[header.index("pydoc_mc") + 1] == f"{acc:.3f}"  # "started" is two words: 12-02 13:18
    assert "pydoc_mc: acc" in " ".join(out.split())  # the note names the metric (wrapped at 100 columns)
    status, out, _ = cli(capsys, "runs", run_dir.parent.parent, "--json")
    (record,) = [r for r in json.loads(out) if r.get("run_dir") == str(run_dir)]
    assert record["evaluations"]["pydoc_mc"] == {"metric": "acc", "value": acc,
                                                 "stderr": pytest.approx(record["evaluations"]["pydoc_mc"]["stderr"])}


def test_a_generative_task_runs_generate_until_through_lm_evals_evaluator(run, tmp_path):
    """A task of lm_eval's generate_until kind (a YAML of our own over the shipped cloze data): the greedy
    generation the evaluator scores is the adapter's, cut at the task's stop strings."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from minigpt_core.downstream.adapter import MinigptLM
    from minigpt_core.downstream.tasks import TASKS_DIR

    (tmp_path / "gen.yaml").write_text(f"""
task: pydoc_cloze_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASKS_DIR / 'pydoc_cloze.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
generation_kwargs:
  until: [".", ","]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    _, ckpt = run
    lm = MinigptLM(checkpoint=str(ckpt), device="cpu", progress=False)
    calls = []
    original = lm._generate
    lm._generate = lambda rows, options: calls.append((len(rows), options)) or original(rows, options)
    out = simple_evaluate(model=lm, tasks=["pydoc_cloze_gen"], limit=6, log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert 0 <= out["results"]["pydoc_cloze_gen"]["exact_match,none"] <= 1
    assert sum(n for n, _ in calls) == 6 and all(o["until"] == [".", ","] and o["max_gen_toks"] == 12
                                                 for _, o in calls)
    for sample in out["samples"]["pydoc_cloze_gen"]:
        (generated,) = sample["resps"][0]
        assert "." not in generated and "," not in generated and len(generated) <= 12  # cut at a stop string
        context = sample["arguments"][0][0]  # [(context, generation arguments)]
        assert generated == lm.generate_until([type("R", (), {"args": (context, {"until": [".", ","],
                                                                                  "max_gen_toks": 12})})()])[0]
