"""Fine-tuning for classification: data files, padding and pooling, metrics, errors, training, resume, classify."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt_core.base import toml as _toml
from minigpt_core.base.errors import SpecError
from minigpt_core.spec import ClassificationSpec, dump_spec, parse_spec
from minigpt_core.tasks.classification import (
    classification_metrics,
    confusion_matrix,
    majority_baseline,
    pack_rows,
    pool,
    read_examples,
    split_examples,
)
from training_utils import ROOT, cli, losses, reference_and_killed_run, read_metrics, runs_of, tiny_spec_data

SHIPPED = ROOT / "experiments" / "finetune" / "data" / "pydoc_packages.tsv"


def _easy_set(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Two classes a tiny model separates in a few steps: texts over 'abc' against texts over 'xyz'."""
    rng = random.Random(seed)
    lines = ["label,text"]
    for i in range(n):
        label = ["low", "high"][i % 3 == 0]  # 2:1, so the majority baseline is about 67 %
        letters = "abc" if label == "low" else "xyz"
        lines.append(f"{label},{''.join(rng.choice(letters + ' ') for _ in range(rng.randint(6, 20)))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cls_spec(tmp_path: Path, data: Path, **classification) -> dict:
    spec = tiny_spec_data(tmp_path, task="classification",
                          classification={"path": str(data), **classification})
    spec["name"] = "cls-test"
    spec["train"] = {**spec["train"], "max_steps": 30, "batch_size": 16, "eval_every": 10, "save_every": 10}
    return spec


def _write(tmp_path: Path, data: dict, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(_toml.dumps(data), encoding="utf-8")
    return path


# -- padding, pooling, metrics (hand-computed) ----------------------------------------------------
def test_rows_are_padded_with_the_pad_id_and_pooled_at_the_last_position_or_the_mean_of_real_tokens():
    rows = pack_rows([[5, 6, 7, 9], [8]], np.array([1, 0]), max_length=3, pad_id=50256)
    assert rows.tolist() == [[5, 6, 7, 3, 1], [8, 50256, 50256, 1, 0]]  # truncated; padded; length; label
    logits = torch.tensor([[[1., 0.], [3., 2.], [5., 4.]],
                           [[2., 6.], [9., 9.], [7., 1.]]])
    lengths = torch.from_numpy(rows[:, -2])
    assert pool(logits, lengths, "last").tolist() == [[5., 4.], [7., 1.]]  # the book's: position -1
    assert pool(logits, lengths, "mean").tolist() == [[3., 2.], [2., 6.]]  # padding left out


def test_metrics_match_a_hand_computation():
    true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1])
    cm = confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    m = classification_metrics(cm, ["a", "b", "c"], "test")
    assert m["test/accuracy"] == pytest.approx(6 / 9)
    assert m["test/precision/a"] == pytest.approx(2 / 3) and m["test/recall/a"] == pytest.approx(2 / 3)
    assert m["test/precision/b"] == pytest.approx(2 / 4) and m["test/recall/b"] == pytest.approx(1.0)
    assert m["test/precision/c"] == pytest.approx(1.0) and m["test/recall/c"] == pytest.approx(2 / 4)
    # the training split's majority class (2) scored on these labels
    assert majority_baseline(np.array([2, 2, 1, 0]), true, 3) == (2, pytest.approx(4 / 9))


# -- data --------------------------------------------------------------------------------------------
def test_sms_spam_tsv_loads_as_the_book_reads_it_and_splits_like_the_book(tmp_path):
    # The SMS Spam Collection: label<TAB>text, no header, quotes are text.
    path = tmp_path / "SMSSpamCollection"
    path.write_text('ham\tGo until jurong point, crazy..\nspam\tFree entry in 2 a wkly comp\n'
                    'ham\t"Hi" he said, 5,000 times\tand more\n', encoding="utf-8")
    cs = ClassificationSpec(path=str(path), format="tsv", header=False, label_column=0, text_column=1)
    assert read_examples(cs) == [("Go until jurong point, crazy..", "ham"), ("Free entry in 2 a wkly comp", "spam"),
                                 ('"Hi" he said, 5,000 times', "ham")]
    # The book: 4,825 ham / 747 spam, ham undersampled to 747, 70/10/20 -> 1,045 / 149 / 300.
    labels = np.array([0] * 4825 + [1] * 747)
    parts = split_examples(labels, 2, ClassificationSpec(path="x.tsv", balance="undersample"))
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1045, 149, 300]
    kept = np.concatenate(list(parts.values()))
    assert len(set(kept.tolist())) == 1494 and np.bincount(labels[kept]).tolist() == [747, 747]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_field_longer_than_the_csv_modules_default_limit_loads_and_trains_cut_to_the_context(tmp_path, capsys,
                                                                                                  fmt):
    # The csv module refuses fields over 131,072 characters by default: a long document is no error.
    long_text = "abc " * 50_000  # 200,000 characters
    sep = "," if fmt == "csv" else "\t"
    lines = _easy_set(tmp_path / "easy.csv", n=40).read_text().splitlines()
    lines = [line.replace(",", sep, 1) for line in lines]
    lines[1:1] = [f"low{sep}{long_text}"] * 3
    data = tmp_path / f"data.{fmt}"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples = read_examples(ClassificationSpec(path=str(data)))
    assert len(examples) == 43 and examples[:3] == [(long_text, "low")] * 3
    spec = _cls_spec(tmp_path, data)
    spec["train"] = {**spec["train"], "max_steps": 2, "eval_every": 2, "save_every": 2}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    # a long text in the training split sets max_length to what the model reads: its context
    assert _toml.loads((run / "spec.toml").read_text())["classification"]["max_length"] == 32


def test_the_shipped_dataset_is_small_and_real():
    assert SHIPPED.stat().st_size < 1_000_000
    examples = read_examples(ClassificationSpec(path=str(SHIPPED)))
    labels = [label for _, label in examples]
    assert sorted(set(labels)) == ["asyncio", "email", "tkinter", "xml"] and len(examples) > 500
    assert max(labels.count(c) for c in set(labels)) / len(labels) < 0.4  # majority baseline 36 %


@pytest.mark.slow
def test_the_shipped_dataset_rebuilds_identically(tmp_path):
    import sys

    if sys.version_info[:2] == (3, 11):  # the committed file was built with CPython 3.11
        out = tmp_path / "rebuilt.tsv"
        subprocess.run([sys.executable, str(SHIPPED.with_name("build_pydoc_packages.py")), str(out)], check=True,
                       capture_output=True)
        assert out.read_bytes() == SHIPPED.read_bytes()


# -- spec ----------------------------------------------------------------------------------------------
def test_the_task_and_its_section_are_validated_together(tmp_path):
    base = tiny_spec_data(tmp_path)
    with pytest.raises(SpecError, match="needs a \\[classification\\] section"):
        parse_spec({**base, "task": "classification"})
    with pytest.raises(SpecError, match="only read with task"):
        parse_spec({**base, "classification": {"path": "x.csv"}})
    with pytest.raises(SpecError, match="add up to 1"):
        parse_spec({**base, "task": "classification", "classification": {"path": "x.csv", "split": [0.5, 0.1, 0.1]}})
    assert "task" not in _toml.loads(dump_spec(parse_spec(base)))  # language-model runs' spec.toml unchanged


# -- errors: one paragraph, exit 2, no run directory -------------------------------------------------------
@pytest.mark.parametrize("case,phrase", [
    ("bad label column", "label_column = 'category' is not a column"),
    ("empty file", "holds no examples"),
    ("label outside the classes", "outside the declared classification.classes"),
])
def test_bad_classification_data_is_one_error_and_no_run_directory(tmp_path, capsys, case, phrase):
    data = _easy_set(tmp_path / "data.csv", n=30)
    extra = {}
    if case == "bad label column":
        extra = {"label_column": "category"}
    elif case == "empty file":
        data.write_text("", encoding="utf-8")
    else:
        extra = {"classes": ["low", "medium"]}
    spec = _write(tmp_path, _cls_spec(tmp_path, data, **extra))
    status, out, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2, (out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1
    assert phrase in err, err
    assert not (tmp_path / "runs").exists()


# -- training, checkpoints, classify ------------------------------------------------------------------------
def test_a_tiny_fine_tune_beats_the_majority_baseline_and_classify_reads_its_checkpoint(tmp_path, capsys):
    data = _easy_set(tmp_path / "data.csv")
    spec = _write(tmp_path, _cls_spec(tmp_path, data, pooling="mean"))
    status, out, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 0, err
    assert "classification results" in out and "confusion matrix (test" in out
    # exp of a loss over classes is no perplexity: the validation lines and metrics leave it out
    val_lines = [line for line in out.splitlines() if line.startswith("step ") and "val loss" in line]
    assert len(val_lines) == 3 and all("perplexity" not in line and "accuracy" in line for line in val_lines), out
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    records = read_metrics(run)
    assert not any("val/perplexity" in r for r in records)
    final = {k: v for r in records if r.get("step") == 30 for k, v in r.items()}
    assert final["test/accuracy"] >= final["test/majority_baseline"] + 0.2, final
    assert 0.5 < final["test/majority_baseline"] < 0.8
    assert {"val/accuracy", "val/precision/low", "val/recall/high", "test/recall/low"} <= set(final)
    (report,) = [r for r in records if r.get("event") == "classification"]
    assert np.sum(report["test"]["confusion_matrix"]) == report["test"]["examples"]
    # the run stores what it read from the data, so the head rebuilds from spec.toml alone
    saved = _toml.loads((run / "spec.toml").read_text())
    assert saved["classification"]["classes"] == ["high", "low"] and saved["classification"]["max_length"] == 20
    from minigpt_core.assembly import load_model

    model, loaded_spec = load_model(run / "checkpoints" / "latest")
    assert tuple(model.out_head.weight.shape) == (2, 32) and loaded_spec.task == "classification"

    status, out, err = cli(capsys, "classify", run, "--text", "abcab cab", "--text", "zyx xyzzy")
    assert status == 0, err
    first, second = out.splitlines()
    assert first.startswith("low\t") and second.startswith("high\t"), out
    probs = [float(p.split()[-1]) for p in first.split("\t")[1].split(", ")]
    assert sum(probs) == pytest.approx(1, abs=1e-3)
    status, out, err = cli(capsys, "sample", run, "--max-new-tokens", "3")  # a classifier predicts no tokens
    assert status == 2 and "cannot be used for sampling" in err, err


def test_summary_of_a_fine_tuning_spec_counts_the_head_and_trainable_parameters(tmp_path, capsys):
    data = _easy_set(tmp_path / "data.csv", n=30)
    status, out, err = cli(capsys, "summary", _write(tmp_path, _cls_spec(tmp_path, data)))
    assert status == 0, err
    # tiny model: 128 x 32 tok + 32 x 32 pos + 2 blocks + final norm (64); the head Linear(32, 2) = 66
    block = 4 * 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32 + 4 * 32  # attention, feed-forward, two norms
    total = 128 * 32 + 32 * 32 + 2 * block + 64 + 66
    assert f"{'output head':<22} {'nn.Linear':<26} {66:>14,}" in out
    assert f"{'trainable parameters':<49} {total:>35,}" in out
    assert f"{'total parameters':<49} {total:>35,}" in out


@pytest.mark.slow
def test_a_classification_run_killed_with_sigkill_resumes_with_identical_losses(tmp_path, capsys):
    data = _easy_set(tmp_path / "data.csv", n=200)
    common = _cls_spec(tmp_path, data)
    common["model"] = {**common["model"], "drop_rate": 0.1}  # the RNG state must be restored too
    common["train"] = {**common["train"], "max_steps": 30, "save_every": 5, "eval_every": 10, "keep_last": 20,
                       "deterministic": True}
    resume_spec = reference_and_killed_run(capsys, tmp_path, common, 10)
    (killed,) = runs_of(tmp_path / "b" / "runs", "cls-test")
    assert 10 <= max(losses(killed)) < 30

    # the file infers the classes, the run stored them: a resume with the file is still the same spec
    status, out, err = cli(capsys, "train", resume_spec, "--resume", "--no-progress")
    assert status == 0, err
    assert "resumed at step" in out
    (ref,) = runs_of(tmp_path / "a" / "runs", "cls-test")
    assert list(losses(killed)) == list(range(1, 31))
    assert losses(killed) == losses(ref)  # bitwise
    for key in ("val/loss", "val/accuracy", "test/accuracy"):
        assert losses(killed, key) == losses(ref, key)


@pytest.mark.slow
def test_fine_tuning_from_a_language_model_run_keeps_its_weights_and_tokenizer(tmp_path, capsys):
    lm = _write(tmp_path, tiny_spec_data(tmp_path, train={**tiny_spec_data(tmp_path)["train"], "max_steps": 6,
                                                          "eval_every": 0, "save_every": 0}), "lm.toml")
    assert cli(capsys, "train", lm, "--no-progress")[0] == 0
    (lm_run,) = runs_of(tmp_path / "runs")
    data = _easy_set(tmp_path / "data.csv")
    spec = _cls_spec(tmp_path, data)
    spec.update(init_from=str(lm_run))
    spec["train"] = {**spec["train"], "max_steps": 1, "lr": 1e-9, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    from minigpt_core.checkpoints.checkpoint import read_meta
    from minigpt_core.assembly import load_model

    base, _ = load_model(lm_run / "checkpoints" / "latest")
    tuned, _ = load_model(run / "checkpoints" / "latest")
    # the char ids the pretrained weights were trained with, not a vocabulary learnt from the labelled texts
    tokenizer = read_meta(run / "checkpoints" / "latest")["tokenizer"]
    assert tokenizer == read_meta(lm_run / "checkpoints" / "latest")["tokenizer"]
    assert torch.allclose(tuned.trf_blocks[0].att.W_query.weight, base.trf_blocks[0].att.W_query.weight, atol=1e-6)
    assert tuned.out_head.weight.shape == (2, 32) and base.out_head.weight.shape == (128, 32)


@pytest.mark.slow
def test_a_hugging_face_dataset_directory_is_a_source(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(
        "".join(json.dumps({"sentence": s, "label": l}) + "\n" for s, l in [("good", 1), ("bad", 0), ("fine", 1)]))
    cs = ClassificationSpec(hf_dataset=str(tmp_path / "ds"), text_column="sentence")
    assert read_examples(cs) == [("good", "1"), ("bad", "0"), ("fine", "1")]


def test_the_example_experiment_parses_and_names_the_shipped_data():
    from minigpt_core.spec import load_spec

    spec = load_spec(ROOT / "experiments" / "finetune" / "classify.toml")
    assert spec.task == "classification" and spec.init_from == "runs/quickstart"
    assert (ROOT / spec.classification.path).resolve() == SHIPPED.resolve()


@pytest.mark.slow
def test_a_classifier_trains_with_lora_on_a_frozen_base_and_its_checkpoint_holds_only_what_trained(tmp_path, capsys):
    """The book's appendix E: LoRA on a pretrained GPT fine-tuned as a classifier (task + [finetune])."""
    lm = _write(tmp_path, tiny_spec_data(tmp_path, train={**tiny_spec_data(tmp_path)["train"], "max_steps": 6,
                                                          "eval_every": 0, "save_every": 0}), "lm.toml")
    assert cli(capsys, "train", lm, "--no-progress")[0] == 0
    (lm_run,) = runs_of(tmp_path / "runs")
    spec = _cls_spec(tmp_path, _easy_set(tmp_path / "data.csv"), pooling="mean")
    spec.update(init_from=str(lm_run),
                finetune={"adapter": {"name": "book.lora", "params": {"rank": 4, "alpha": 8,
                                                                      "targets": ["trf_blocks.*.att.*"]}}})
    spec["train"] = {**spec["train"], "max_steps": 10, "lr": 3e-3, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    from safetensors.torch import load_file

    from minigpt_core.assembly import load_model

    saved = load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))
    # the new head and the LoRA matrices trained; the frozen base is named, not copied
    assert any(k.startswith("out_head.") for k in saved) and any("lora" in k.lower() for k in saved)
    assert not any(k.startswith("tok_emb.") or k.endswith("ff.layers.0.weight") for k in saved), sorted(saved)
    base, _ = load_model(lm_run / "checkpoints" / "latest")
    tuned, tuned_spec = load_model(run / "checkpoints" / "latest")  # base + head + the adapter merged
    assert tuned_spec.task == "classification" and tuned.out_head.weight.shape == (2, 32)
    assert torch.equal(tuned.tok_emb.weight, base.tok_emb.weight)  # frozen: bitwise the base's
    assert torch.equal(tuned.trf_blocks[0].ff.layers[0].weight, base.trf_blocks[0].ff.layers[0].weight)
    assert not torch.equal(tuned.trf_blocks[0].att.W_query.weight, base.trf_blocks[0].att.W_query.weight)
    status, out, err = cli(capsys, "classify", run, "--text", "abcab cab")
    assert status == 0 and out.split("\t")[0] in ("low", "high"), err
