"""Runs at a glance: `minigpt runs`, `minigpt diff`, console.log, --label, and the reader minigpt_core/runs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_core.cli.app import main
from minigpt_core.runs import metric_series, read_metrics, summarize_run
from minigpt_core.spec import parse_spec
from minigpt_core.train import train
from minigpt_core.train.lock import RunLock
from training_utils import PATIENCE_S, cli, kill_training_at, runs_of, tiny_spec_data, write_spec

TRAIN = {"max_steps": 4, "save_every": 2, "eval_every": 2}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One experiment's runs: finished (CLI), finished with a label and another lr (CLI), Ctrl-C'd, failed."""
    tmp = tmp_path_factory.mktemp("runs")
    spec = write_spec(tmp, train=TRAIN)
    runs: dict[str, Path] = {}

    def new_run(kind: str) -> None:
        (runs[kind],) = set(runs_of(tmp / "runs")) - set(runs.values())

    assert main(["train", str(spec), "--no-progress"]) == 0
    new_run("finished")
    assert main(["train", str(spec), "--no-progress", "--set", "train.lr=1e-3", "--label", "low lr"]) == 0
    new_run("labelled")
    data = parse_spec(tiny_spec_data(tmp, train=TRAIN))

    def ctrl_c(text):  # what a Ctrl-C in the terminal does, at step 2's evaluation
        if text.startswith("step 2:"):
            os.kill(os.getpid(), signal.SIGINT)

    assert train(data, progress=False, write=ctrl_c).interrupted
    new_run("interrupted")

    def broken(text):  # an error raised inside the training loop
        if text.startswith("step 2:"):
            raise RuntimeError("the console broke at step 2")

    with pytest.raises(RuntimeError, match="the console broke"):  # the original error, not hidden by the event
        train(data, progress=False, write=broken)
    new_run("failed")
    return tmp / "runs", runs


def _rows(text: str) -> dict[str, str]:
    """Run directory name -> its row of the table (the notes below it left out)."""
    table = text.split("\n\n")[0].splitlines()[1:]
    return {line.split()[0]: line for line in table if len(line.split()) > 3}


def _last_val(run: Path) -> float:
    return [r["val/loss"] for r in read_metrics(run) if "val/loss" in r][-1]


def test_runs_table_shows_status_steps_losses_and_the_fields_that_differ(out, capsys):
    root, runs = out
    status, text, err = cli(capsys, "runs", root)
    assert status == 0, err
    assert all(len(line) <= 100 for line in text.splitlines())
    rows = _rows(text)
    fin, lab, intr, fail = (rows[runs[k].name].split() for k in ("finished", "labelled", "interrupted", "failed"))
    assert fin[3:7] == ["finished", "4/4", f"{_last_val(runs['finished']):.4f}",
                        f"{min(r['val/loss'] for r in read_metrics(runs['finished']) if 'val/loss' in r):.4f}"]
    assert fin[-1] == "lr=0.003" and lab[-1] == "lr=0.001"  # the only field the runs differ in
    assert runs["labelled"].name.endswith("-low-lr") and lab[3:5] == ["finished", "4/4"]
    assert intr[3:5] == ["interrupted", "2/4"]
    assert fail[3:5] == ["failed", "2/4"]
    assert f"{runs['failed'].name} failed: RuntimeError: the console broke at step 2" in text


def test_runs_json_has_status_label_and_error(out, capsys):
    root, runs = out
    status, text, _ = cli(capsys, "runs", root, "--json")
    assert status == 0
    got = {Path(r["run_dir"]).name: r for r in json.loads(text)}
    assert {k: got[r.name]["status"] for k, r in runs.items()} == {
        "finished": "finished", "labelled": "finished", "interrupted": "interrupted", "failed": "failed"}
    assert got[runs["labelled"].name]["label"] == "low lr"
    assert got[runs["labelled"].name]["differs"] == {"train.lr": 0.001}
    assert got[runs["failed"].name]["error"] == "RuntimeError: the console broke at step 2"
    assert not got[runs["interrupted"].name]["killed"]  # it said so: an interrupted event
    end = read_metrics(runs["finished"])[-1]  # the trainer's last word, whatever the fallbacks would guess
    assert (end["event"], end["step"], end["total_steps"]) == ("finished", 4, 4)
    assert end["val_loss"] == _last_val(runs["finished"])


def test_a_run_whose_lock_a_live_process_holds_is_running(out, capsys):
    root, runs = out
    run = runs["finished"]
    holder = subprocess.Popen(  # holds the lock the way a trainer does (flock), until killed
        [sys.executable, "-c", "import fcntl, os, sys; "
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _rows(cli(capsys, "runs", root)[1])[run.name].split()[3] == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=PATIENCE_S)
    assert _rows(cli(capsys, "runs", root)[1])[run.name].split()[3] == "finished"
    RunLock(run).acquire().release()  # looking never left the lock taken


def test_looking_at_a_lock_never_makes_a_trainer_that_starts_at_that_moment_fail(tmp_path):
    import fcntl
    import threading

    fd = os.open(tmp_path / ".lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what `minigpt runs` holds for an instant
    threading.Timer(0.03, os.close, (fd,)).start()
    RunLock(tmp_path).acquire().release()


def test_diff_names_the_differing_fields_and_puts_the_metrics_side_by_side(out, capsys):
    root, runs = out
    status, text, err = cli(capsys, "diff", runs["finished"], root / "tiny-test")  # experiment dir: its latest run
    assert status == 0, err
    assert f"B: {max(runs.values())}" in text
    status, text, err = cli(capsys, "diff", runs["finished"], runs["labelled"])
    assert status == 0, err
    lines = text.splitlines()
    (field,) = [line for line in lines if line.startswith("train.")]
    assert field.split() == ["train.lr", "0.003", "0.001"]
    a, b = _last_val(runs["finished"]), _last_val(runs["labelled"])
    (row,) = [line for line in lines if line.startswith("final val loss")]
    assert row.split()[3:] == [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
    assert any(line.split()[:3] == ["steps", "4", "4"] for line in lines)


def test_diff_of_a_path_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    write_spec(tmp_path)  # an experiment file called spec.toml is not a run
    for path in (tmp_path, tmp_path / "missing"):
        status, _, err = cli(capsys, "diff", path, path)
        assert status == 2 and "Traceback" not in err
        assert f"error: {path} " in err and "minigpt runs" in err


def test_console_log_has_what_train_printed(out):
    _, runs = out
    text = (runs["finished"] / "console.log").read_text()
    assert text.startswith(f"run {runs['finished']} (new)\n")
    assert "step 2: val loss" in text and "step 4: val loss" in text
    assert f"run directory: {runs['finished']}" in text  # the closing lines of `minigpt train`
    failed = (runs["failed"] / "console.log").read_text()
    assert failed.rstrip().endswith("error: RuntimeError: the console broke at step 2")


def test_bad_label_is_refused_before_anything_is_written(tmp_path, capsys):
    spec = write_spec(tmp_path, train=TRAIN)
    status, _, err = cli(capsys, "train", spec, "--label", "../up", "--no-progress")
    assert status == 2 and "Traceback" not in err
    assert "--label '../up' cannot name a run directory: it holds '/'" in err
    assert not (tmp_path / "runs").exists()


def test_ablation_directory_is_one_row_and_lists_its_cells(out, tmp_path, capsys):
    root, runs = out
    abl = root / "abl"
    abl.mkdir(exist_ok=True)
    cells = [{"variant": "base", "seed": 1, "run_dir": str(runs["finished"]), "status": "done", "error": None},
             {"variant": "base", "seed": 2, "run_dir": str(runs["interrupted"]), "status": "running", "error": None},
             {"variant": "low", "seed": 1, "run_dir": str(runs["labelled"]), "status": "done", "error": None},
             {"variant": "low", "seed": 2, "run_dir": None, "status": "pending", "error": None}]
    (abl / "manifest.json").write_text(json.dumps({"ablation": "abl", "cells": cells}))
    try:
        status, text, _ = cli(capsys, "runs", root)
        assert status == 0
        (row,) = [line for line in text.splitlines() if line.startswith("abl/ ")]
        assert row.split()[3:6] == ["incomplete", "2/4", "cells"]
        assert "ablation: 2 done, 1 interrupted, 1 pending" in " ".join(text.split())  # "running": no live process
        status, text, _ = cli(capsys, "runs", abl)
        assert status == 0
        got = {k: v.split() for k, v in _rows(text).items()}
        assert got["base/seed-1"][3:5] == ["done", "4/4"] and got["base/seed-2"][3:5] == ["interrupted", "2/4"]
        assert got["low/seed-2"][1:3] == ["-", "pending"]  # not started
        assert got["low/seed-1"][-1] == "lr=0.001"
    finally:
        (abl / "manifest.json").unlink()
        abl.rmdir()


@pytest.mark.slow
def test_a_killed_run_is_interrupted_and_its_resume_appends_to_console_log(tmp_path, capsys):
    spec = write_spec(tmp_path, train={"max_steps": 400, "save_every": 5, "eval_every": 5})
    still_running, _ = kill_training_at(spec, tmp_path / "runs", 5)
    assert still_running, "the run finished before it could be killed"
    (run,) = runs_of(tmp_path / "runs")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "train/lo')  # what a kill in the middle of a line leaves
    status, text, _ = cli(capsys, "runs", tmp_path / "runs")
    row = _rows(text)[run.name].split()
    assert row[3] == "interrupted?" and row[4].endswith("/400") and "killed" in text
    summary = summarize_run(run)
    assert summary.killed and summary.status == "interrupted" and 5 <= summary.steps < 400

    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().rsplit("\n", 1)[0] + "\n")
    last = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    status, _, err = cli(capsys, "train", "--resume", run, "--no-progress", "--set", f"train.max_steps={last + 1}")
    assert status == 0, err
    log = (run / "console.log").read_text()
    assert log.startswith(f"run {run} (new)") and f"run {run} (resumed at step {last})" in log
    assert summarize_run(run).status == "finished"


# -- minigpt_core/runs.py -----------------------------------------------------------------------
def _write(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def test_a_run_that_reached_its_last_step_without_an_end_event_is_finished(out, tmp_path, capsys):
    # Killed between its last step and its finished event (or written before minigpt wrote one): the
    # steps it planned are all there, so it finished; one step short it was killed.
    import shutil

    root, runs = out
    records = [r for r in read_metrics(runs["finished"]) if r.get("event") != "finished"]
    assert max(r["step"] for r in records) == 4
    cases = {
        "last-step": records,
        # an older run's events say nothing of the plan: its last checkpoint does (step 4 of 4)
        "last-step-no-plan": [{k: v for k, v in r.items() if k != "total_steps"} for r in records],
        "step-short": [r for r in records if r["step"] < 4],
    }
    for name, recs in cases.items():
        shutil.copytree(runs["finished"], tmp_path / "exp" / name)
        _write(tmp_path / "exp" / name, recs)
    got = {name: summarize_run(tmp_path / "exp" / name) for name in cases}
    assert {k: (s.status, s.killed, s.steps, s.total_steps) for k, s in got.items()} == {
        "last-step": ("finished", False, 4, 4), "last-step-no-plan": ("finished", False, 4, 4),
        "step-short": ("interrupted", True, 3, 4)}
    status, text, err = cli(capsys, "runs", tmp_path / "exp")
    assert status == 0, err
    rows = _rows(text)
    assert rows["last-step"].split()[3:5] == ["finished", "4/4"]
    assert rows["step-short"].split()[3:5] == ["interrupted?", "3/4"]


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    run = _write(tmp_path / "r", [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.5}],
                 tail='{"step": 3, "train/lo')
    assert read_metrics(run) == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.5}]
    assert read_metrics(tmp_path / "none") == []


# Lines that parse as JSON but are no record the trainer writes. Each carries a training loss of 9.5
# that would show in the summaries and curves if the line were read.
ODD_LINES = {
    "Infinity tokens": '{"step": 3, "time": 1e9, "train/tokens": Infinity, "train/loss": 9.5}',
    "400-digit tokens": '{"step": 3, "time": 1e9, "train/tokens": 1' + "0" * 399 + ', "train/loss": 9.5}',
    "400-digit step": '{"step": 1' + "0" * 399 + ', "time": 1e9, "train/loss": 9.5}',
    "string step": '{"step": "three", "time": 1e9, "train/tokens": 96, "train/loss": 9.5}',
    "null step": '{"step": null, "time": 1e9, "train/tokens": 96, "train/loss": 9.5}',
    "bool step": '{"step": true, "time": 1e9, "train/tokens": 96, "train/loss": 9.5}',
    "negative step": '{"step": -3, "time": 1e9, "train/tokens": 96, "train/loss": 9.5}',
    "list loss": '{"step": 3, "time": 1e9, "train/tokens": 96, "train/loss": [9.5], "val/loss": [9.5]}',
    "bool loss": '{"step": 3, "time": 1e9, "train/tokens": 96, "val/loss": true, "train/loss": 9.5}',
    "NaN loss": '{"step": 3, "time": 1e9, "train/tokens": 96, "val/loss": NaN, "train/loss": 9.5}',
    "huge time": '{"step": 3, "time": 1e300, "train/tokens": 96, "train/loss": 9.5}',
    "Infinity time": '{"step": 3, "time": Infinity, "train/tokens": 96, "train/loss": 9.5}',
    "event not a string": '{"step": 3, "time": 1e9, "event": ["finished"], "total_steps": 3, "train/loss": 9.5}',
    "non-object lines": '[{"step": 3, "train/loss": 9.5}]\nnull\n"step"\n9.5',  # skipped before too
}


@pytest.mark.parametrize("line", ODD_LINES.values(), ids=ODD_LINES)
def test_odd_metrics_lines_are_skipped_by_runs_diff_and_plot(out, tmp_path, capsys, line):
    import shutil

    _, runs = out
    clean, odd = tmp_path / "clean" / "exp" / "run", tmp_path / "odd" / "exp" / "run"
    shutil.copytree(runs["finished"], clean)
    shutil.copytree(runs["finished"], odd)
    good = (odd / "metrics.jsonl").read_text().splitlines()
    # first (where the start time is read), in the middle and last: mixed with good lines
    (odd / "metrics.jsonl").write_text("\n".join([line, *good[:3], line, *good[3:], line]) + "\n")

    def summary(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("run_dir", "name")}

    # One listing holds both runs: the odd one reads as the run it is, and does not break the other.
    status, text, err = cli(capsys, "runs", tmp_path, "--json")
    assert status == 0 and "Traceback" not in err, err
    got = {r["name"]: summary(r) for r in json.loads(text)}
    assert set(got) == {"clean/exp/run", "odd/exp/run"} and got["odd/exp/run"] == got["clean/exp/run"]
    assert got["odd/exp/run"]["final_train_loss"] != 9.5 and got["odd/exp/run"]["status"] == "finished"
    status, text, err = cli(capsys, "runs", tmp_path)
    assert status == 0 and "odd/exp/" in text and "clean/exp/" in text, err

    status, text, err = cli(capsys, "diff", clean, odd, "--json")
    assert status == 0, err
    metrics = json.loads(text)["metrics"]
    assert summary(metrics["a"]) == summary(metrics["b"])
    status, text, err = cli(capsys, "diff", clean, odd)
    assert status == 0 and "the specs are identical" in text, err

    # The same records make the same picture (the legend names exp/run in both).
    for run in (clean, odd):
        status, _, err = cli(capsys, "plot", run, "--out", run.parent.parent / "plot.png")
        assert status == 0, err
    assert (tmp_path / "odd" / "plot.png").read_bytes() == (tmp_path / "clean" / "plot.png").read_bytes()
    assert read_metrics(odd) == read_metrics(clean)  # the one reader every command and report uses


def test_metric_series_takes_tokens_as_x_and_the_last_value_of_a_repeated_step():
    records = [{"step": 1, "train/tokens": 100, "train/loss": 3.0}, {"step": 2, "train/tokens": 200, "val/loss": 2.9},
               {"step": 2, "event": "resume"},
               {"step": 2, "train/tokens": 200, "val/loss": 2.8},  # after a rewind: replaces step 2
               {"step": 3, "train/tokens": 300, "val/loss": None}]  # NaN is logged as null: skipped
    assert metric_series(records, "val/loss") == ([200.0], [2.8])
    assert metric_series(records, "train/loss", x="step") == ([1.0], [3.0])


def test_metric_series_places_a_record_without_tokens_by_the_tokens_per_step_of_its_neighbours():
    # a validation line logged without a token count was drawn at its step number: near 0 on a token axis
    records = [{"step": 30, "val/loss": 3.1},
               {"step": 40, "train/tokens": 40 * 4096, "train/loss": 3.0},
               {"step": 60, "val/loss": 2.9}]
    assert metric_series(records, "val/loss") == ([30 * 4096.0, 60 * 4096.0], [3.1, 2.9])
    assert metric_series([{"step": 5, "val/loss": 2.0}], "val/loss") == ([5.0], [2.0])  # no token axis at all


def test_summarize_run_status_of_the_last_session(tmp_path):
    start = {"step": 0, "time": 100.0, "event": "start", "total_steps": 4, "label": "x"}
    metrics = [{"step": s, "time": 100.0 + s, "train/loss": 3.0 - s / 10, "train/tokens": 64 * s,
                "train/tokens_per_s": 10.0 * s, "train/peak_memory_mb": 50.0 + s} for s in (1, 2)]
    vals = [{"step": 2, "time": 102.5, "val/loss": 2.9}]
    cases = {
        "finished": [start, *metrics, *vals, {"step": 2, "time": 103.0, "event": "finished"}],
        "interrupted": [start, *metrics, {"step": 2, "time": 103.0, "event": "interrupted"}],
        "failed": [start, *metrics, {"step": 2, "time": 103.0, "event": "failed", "error": "E: boom"}],
        "diverged": [start, *metrics, {"step": 2, "time": 103.0, "event": "diverged", "error": "Training diverged"}],
        "killed": [start, *metrics],
        # a resumed run: the earlier session's end does not count, nor does the pause between sessions
        "resumed": [start, *metrics, {"step": 2, "time": 103.0, "event": "failed", "error": "E"},
                    {"step": 2, "time": 1000.0, "event": "resume", "total_steps": 4}],
    }
    got = {name: summarize_run(_write(tmp_path / name, recs)) for name, recs in cases.items()}
    assert {k: v.status for k, v in got.items()} == {
        "finished": "finished", "interrupted": "interrupted", "failed": "failed", "diverged": "diverged",
        "killed": "interrupted", "resumed": "interrupted"}
    assert got["killed"].killed and not got["interrupted"].killed and got["resumed"].killed
    f = got["finished"]
    assert (f.steps, f.total_steps, f.tokens, f.label) == (2, 4, 128, "x")
    assert (f.final_val_loss, f.best_val_loss, f.final_train_loss) == (2.9, 2.9, 2.8)
    assert (f.tokens_per_s, f.peak_memory_mb, f.train_time_s) == (20.0, 52.0, 3.0)
    assert got["failed"].error == "E: boom" and got["diverged"].error == "Training diverged"
    assert got["resumed"].error is None and got["resumed"].train_time_s == 3.0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.toml").write_text('name = "x"\n')
    (empty / ".lock").write_text("")
    assert summarize_run(empty).status == "empty"


def test_runs_lists_an_empty_run_and_a_truncated_one_without_crashing(tmp_path, capsys):
    empty = tmp_path / "exp" / "20261127-100000"
    empty.mkdir(parents=True)
    (empty / "spec.toml").write_text('name = "exp"\n')
    (empty / ".lock").write_text("")
    _write(tmp_path / "exp" / "20261127-110000", [{"step": 0, "time": 1.0, "event": "start"}], tail="{bro")
    loading = tmp_path / "exp" / "20261127-120000"  # a trainer still loading its data: only its lock so far
    loading.mkdir()
    lock = RunLock(loading).acquire()
    try:
        status, text, err = cli(capsys, "runs", tmp_path)
    finally:
        lock.release()
    assert status == 0, err
    rows = [line.split() for line in _rows(text).values()]
    assert [r[0] for r in rows] == ["20261127-100000", "20261127-110000", "20261127-120000"]
    assert rows[0][3] == "empty" and rows[1][3] == "interrupted?" and rows[2][3:5] == ["running", "-"]
    status, text, _ = cli(capsys, "runs", tmp_path / "nothing-here")
    assert status == 2
