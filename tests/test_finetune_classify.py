"""Fine-tuning a classifier: frozen weights, trainable counts, SIGKILL resume with an adapter, data
sources (the SMS Spam Collection as the book reads it, a local Hugging Face dataset), errors, and
init_from a classifier checkpoint to go on fine-tuning it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt_core.checkpoints.checkpoint import read_meta
from minigpt_core.assembly import load_model
from minigpt_core.assembly import count_trainable
from minigpt_core.spec import load_spec, parse_spec
from minigpt_core.tasks import build_task_model
from test_classification import _cls_spec, _easy_set, _write
from training_utils import ROOT, cli, losses, reference_and_killed_run, read_metrics, runs_of, tiny_spec_data

# The tiny model (training_utils): 2 blocks, emb 32, ff 128, no q/k/v bias, tied embedding / LM head.
C, F = 32, 128
BLOCK = 3 * C * C + (C * C + C) + (C * F + F) + (F * C + C) + 2 * (2 * C)  # att, out_proj, ff, two norms
FINAL_NORM = 2 * C
EMB = 128 * C + 32 * C  # token (tied with the LM head) + positions
HEAD = C * 2 + 2  # Linear(emb_dim, 2 classes)
LORA = {"rank": 2, "alpha": 4.0, "targets": ["trf_blocks.*.att.*"]}
LORA_ATT = 2 * 4 * 2 * (C + C)  # 2 blocks x 4 projections (W_q, W_k, W_v, out_proj) x rank 2 x (in + out)


def _spec(tmp_path: Path, data: Path, classification: dict | None = None, **top) -> dict:
    """test_classification's tiny classifier spec, with top-level sections (init_from, finetune) added."""
    return {**_cls_spec(tmp_path, data, **(classification or {})), **top}


def _ok(status, err):
    assert status == 0, err


def _lm_run(tmp_path: Path, capsys) -> Path:
    """A briefly pretrained tiny language model: the base a classifier is fine-tuned from."""
    spec = _write(tmp_path, tiny_spec_data(tmp_path, train={**tiny_spec_data(tmp_path)["train"], "max_steps": 4,
                                                           "eval_every": 0, "save_every": 0}), "lm.toml")
    _ok(*cli(capsys, "train", spec, "--no-progress")[::2])
    (run,) = runs_of(tmp_path / "runs")
    return run


def _error(capsys, *args) -> str:
    status, out, err = cli(capsys, *args)
    assert status == 2, (out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1, err
    return err


# -- frozen weights and trainable counts ---------------------------------------------------------------
@pytest.mark.parametrize("finetune", [{"trainable": "book"},
                                      {"adapter": {"name": "book.lora", "params": LORA}}], ids=["book", "lora"])
def test_frozen_parameters_of_a_classifier_are_bitwise_unchanged_after_training(tmp_path, capsys, finetune):
    # No init_from: the checkpoint holds every tensor, so the frozen ones are what training left, not the base's.
    spec = _spec(tmp_path, _easy_set(tmp_path / "data.csv", n=60), finetune=finetune)
    spec["train"] = {**spec["train"], "max_steps": 4, "eval_every": 0, "save_every": 0, "weight_decay": 0.5}
    _ok(*cli(capsys, "train", _write(tmp_path, spec), "--no-progress")[::2])
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    saved = load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))
    initial = build_task_model(load_spec(run / "spec.toml")).state_dict()  # the same seed: the run's start
    trains = (lambda k: k.startswith(("trf_blocks.1.", "final_norm.", "out_head."))) if "trainable" in finetune \
        else (lambda k: k.startswith("out_head."))
    frozen = [k for k in initial if not trains(k) and not k.endswith(".mask")]
    assert frozen and all(torch.equal(saved[k], initial[k]) for k in frozen)
    assert all(not torch.equal(saved[k], initial[k]) for k in initial if trains(k) and k.endswith("weight"))
    if "adapter" in finetune:
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if k.endswith(".lora.B"))


@pytest.mark.parametrize("adapter", ["book.lora", "peft.lora"])
def test_lora_on_a_classifier_and_its_new_head_leaves_its_outputs_unchanged_at_init_and_merges_exactly(tmp_path,
                                                                                                     adapter):
    from minigpt_core.finetune import apply_finetune, plain_model

    raw = _spec(tmp_path, tmp_path / "unused.csv", {"classes": ["a", "b", "c"]},
                finetune={"adapter": {"name": adapter, "params": {"rank": 2, "alpha": 4.0,
                                                                  "targets": ["trf_blocks.*", "out_head"]}}})
    spec = parse_spec(raw)
    model = build_task_model(spec).eval()  # the untied class head may be adapted too (the book's appendix E)
    idx = torch.randint(0, 92, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(idx)
        info = apply_finetune(model, spec)
        assert "out_head" in info.adapter_names and torch.equal(model(idx), before)
        for n, p in model.named_parameters():
            if "lora" in n.lower():  # a trained adapter
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
        unmerged = model(idx)
        assert unmerged.shape == (3, 12, 3) and (unmerged - before).abs().max() > 1e-2
        info.adapter.merge(model)
        assert (model(idx) - unmerged).abs().max() <= 1e-5
        info.adapter.unmerge(model)
        assert (plain_model(model)(idx) - unmerged).abs().max() <= 1e-5


def test_a_classifiers_trainable_counts_equal_a_hand_count_in_the_run_and_in_summary(tmp_path, capsys):
    data = _easy_set(tmp_path / "data.csv", n=30)
    cases = {"book": ({"trainable": "book"}, BLOCK + FINAL_NORM + HEAD, 2 * BLOCK + FINAL_NORM + EMB + HEAD),
             # a frozen base: the adapter and the new head (which always trains)
             "lora": ({"adapter": {"name": "book.lora", "params": LORA}}, LORA_ATT + HEAD,
                      2 * BLOCK + FINAL_NORM + EMB + HEAD + LORA_ATT)}
    for name, (finetune, trainable, total) in cases.items():
        raw = _spec(tmp_path, data, finetune=finetune)
        info = count_trainable(parse_spec(raw))  # the classes are read from the data
        assert (info.total, info.trainable) == (total, trainable), name
        status, out, err = cli(capsys, "summary", _write(tmp_path, raw, f"{name}.toml"))
        _ok(status, err)
        assert f"fine-tuning parameters: {total:,} total, {trainable:,} trainable" in out, out
        # the table's line: which of the model's own parameters (base and head, no adapter) train
        assert f"{'trainable parameters':<49} {trainable - (LORA_ATT if name == 'lora' else 0):>35,}" in out
    raw["train"] = {**raw["train"], "max_steps": 1, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, raw), "--no-progress")
    _ok(status, err)
    assert f"parameters: {total:,} total, {trainable:,} trainable" in out  # the run says what summary said


# -- exact resume after SIGKILL of an adapter fine-tuning run ------------------------------------------
@pytest.mark.slow
def test_a_lora_classifier_run_killed_with_sigkill_resumes_with_identical_losses(tmp_path, capsys):
    lm = _lm_run(tmp_path, capsys)
    common = _spec(tmp_path, _easy_set(tmp_path / "data.csv", n=120), init_from=str(lm),
                       finetune={"trainable": ["final_norm.*"],
                                 "adapter": {"name": "book.lora", "params": {**LORA, "dropout": 0.1}}})
    common["train"] = {**common["train"], "max_steps": 10, "save_every": 3, "eval_every": 5, "keep_last": 10,
                       "deterministic": True}
    resume_spec = reference_and_killed_run(capsys, tmp_path, common, 6)
    (killed,) = runs_of(tmp_path / "b" / "runs", "cls-test")
    assert 6 <= max(losses(killed)) < 10
    # checkpoints hold the adapter, the final norm and the head, and name the language model as their base
    ckpt = killed / "checkpoints" / "step_00000006"
    assert {k.split(".")[0] for k in load_file(str(ckpt / "model.safetensors"))} == {"trf_blocks", "final_norm",
                                                                                     "out_head"}
    assert read_meta(ckpt)["finetune"]["base"]["init_from"].startswith(str(lm.resolve()))
    status, out, err = cli(capsys, "train", resume_spec, "--resume", "--no-progress")
    _ok(status, err)
    assert "resumed at step" in out
    (ref,) = runs_of(tmp_path / "a" / "runs", "cls-test")
    assert list(losses(killed)) == list(range(1, 11))
    for key in ("train/loss", "val/loss", "val/accuracy", "test/accuracy"):
        assert losses(killed, key) == losses(ref, key), key  # bitwise


# -- data sources --------------------------------------------------------------------------------------
SMS = """ham\tGo until jurong point, crazy.. Available only in bugis n great world la e buffet... Cine there got amore wat...
ham\tOk lar... Joking wif u oni...
spam\tFree entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry question(std txt rate)T&C's apply 08452810075over18's
ham\tU dun say so early hor... U c already then say...
ham\tNah I don't think he goes to usf, he lives around here though
spam\tFreeMsg Hey there darling it's been 3 week's now and no word back! I'd like some fun you up for it still? Tb ok! XxX std chgs to send, \xa31.50 to rcv
ham\tEven my brother is not like to speak with me. They treat me like aids patent.
ham\tAs per your request 'Melle Melle (Oru Minnaminunginte Nurungu Vettam)' has been set as your callertune for all your Callers. Press *9 to copy your friends Callertune
spam\tWINNER!! As a valued network customer you have been selected to receivea \xa3900 prize reward! To claim call 09061701461. Claim code KL341. Valid 12 hours only.
spam\tHad your mobile 11 months or more? U R entitled to Update to the latest colour mobiles with camera for Free! Call The Mobile Update Co FREE on 08002986030
ham\tI'm gonna be home soon and i don't want to talk about this stuff anymore tonight, k? I've cried enough today.
ham\t"Hey! I'm here" is all he said
ham\tI HAVE A DATE ON SUNDAY WITH WILL!!
spam\tURGENT! You have won a 1 week FREE membership in our \xa3100,000 Prize Jackpot! Txt the word: CLAIM to No: 81010 T&C www.dbuk.net LCCLTD POBOX 4403LDNW1A7RW18
"""


def test_the_sms_spam_collection_file_trains_as_is_with_the_books_settings(tmp_path, capsys):
    # The UCI file as the book downloads it: no extension, label<TAB>text, no header, a stray quote, a pound sign.
    data = tmp_path / "SMSSpamCollection"
    data.write_text(SMS, encoding="utf-8")
    spec = _cls_spec(tmp_path, data, format="tsv", header=False, label_column=0, text_column=1,
                     classes=["ham", "spam"], balance="undersample", split=[0.7, 0.1, 0.2])
    spec["train"] = {**spec["train"], "max_steps": 2, "batch_size": 2, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    _ok(status, err)
    # 14 messages (9 ham, 5 spam), ham undersampled to 5: 10 examples, 70/10/20 -> 7 / 1 / 2
    assert "14 examples (ham 9, spam 5), undersampled to balance the classes" in out, out
    assert "7 train / 1 validation / 2 test examples, 2 classes ['ham', 'spam']" in out, out
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    (report,) = [r for r in read_metrics(run) if r.get("event") == "classification"]
    assert [report[s]["examples"] for s in ("train", "val", "test")] == [7, 1, 2]


def _class_label_dataset(directory: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    rows = [("abcab cab", 0), ("zyx xyzzy", 1), ("cab bac", 0), ("xzy yzx", 1)] * 6
    ds = datasets.Dataset.from_dict({"sentence": [t for t, _ in rows], "label": [l for _, l in rows]},
                                    features=datasets.Features({"sentence": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["low", "high"])}))
    ds.save_to_disk(str(directory))
    return directory


@pytest.mark.parametrize("kind", ["files", "saved"])
def test_a_local_hugging_face_dataset_trains_a_classifier_offline(tmp_path, capsys, monkeypatch, kind):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cache outside the test
    if kind == "files":  # a directory of data files (load_dataset); integer labels stay as they are
        directory = tmp_path / "ds"
        directory.mkdir()
        (directory / "train.jsonl").write_text("".join(
            json.dumps({"sentence": s, "label": l}) + "\n"
            for s, l in [("abcab cab", 0), ("zyx xyzzy", 1), ("cab bac", 0), ("xzy yzx", 1)] * 6))
        classes = ["0", "1"]
    else:  # Dataset.save_to_disk: a ClassLabel's integers become its names
        directory = _class_label_dataset(tmp_path / "saved")
        classes = ["high", "low"]
    spec = tiny_spec_data(tmp_path, task="classification",
                          classification={"hf_dataset": str(directory), "text_column": "sentence"})
    spec["name"] = "cls-test"
    spec["train"] = {**spec["train"], "max_steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    _ok(status, err)
    assert f"24 examples ({classes[0]} 12, {classes[1]} 12)" in out, out
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    assert load_spec(run / "spec.toml").classification.classes == classes


# -- errors: one paragraph, exit status 2, no run directory ------------------------------------------------
@pytest.mark.parametrize("case,phrase", [
    ("tsv column number beyond the row", "has 2 column(s), but classification.text_column / label_column need "
                                         "column 2"),
    ("jsonl without the label field", "label_column = 'category' is not a field of"),
    ("csv with only its header", "holds no examples"),
    ("empty jsonl", "holds no examples"),
    ("one label only", "has only one label ('low')"),
])
def test_more_bad_classification_data_is_one_error_and_no_run_directory(tmp_path, capsys, case, phrase):
    section: dict = {}
    if case.startswith("tsv"):
        path = tmp_path / "data.tsv"
        path.write_text("ham\tfine\nspam\twin\n", encoding="utf-8")
        section = {"header": False, "label_column": 0, "text_column": 2}
    elif case.startswith("jsonl"):
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": "abc", "label": "low"}\n', encoding="utf-8")
        section = {"label_column": "category"}
    elif case.startswith("csv"):
        path = tmp_path / "data.csv"
        path.write_text("label,text\n", encoding="utf-8")
    elif case == "empty jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n\n", encoding="utf-8")
    else:
        path = tmp_path / "data.csv"
        path.write_text("label,text\nlow,abc\nlow,cab\n", encoding="utf-8")
    spec = _cls_spec(tmp_path, path, **section)
    err = _error(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert phrase in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_classification_data_after_init_from_leaves_no_run_directory(tmp_path, capsys):
    lm = _lm_run(tmp_path, capsys)
    out_dir = tmp_path / "ft-runs"
    data = _easy_set(tmp_path / "data.csv", n=30)
    for extra, phrase in [({"label_column": "category"}, "label_column = 'category' is not a column"),
                          ({"classes": ["low", "medium"]}, "outside the declared classification.classes")]:
        spec = _spec(tmp_path, data, extra, init_from=str(lm))
        spec["train"] = {**spec["train"], "out_dir": str(out_dir)}
        assert phrase in _error(capsys, "train", _write(tmp_path, spec), "--no-progress")
        assert not out_dir.exists()


def test_init_from_an_experiment_directory_names_the_run_it_followed_in_the_banner_and_every_checkpoint(
        tmp_path, capsys):
    """init_from = "runs/quickstart" follows that experiment's latest run: a later run there changes the base
    of the same file. The run says which checkpoint it started from (banner, start event, meta.json of each
    checkpoint, a full fine-tune included), and a resume keeps the record even after a newer base run."""
    lm = _lm_run(tmp_path, capsys)
    given = str(lm.parent)  # the experiment directory, as the shipped fine-tuning examples give it
    spec = _spec(tmp_path, _easy_set(tmp_path / "data.csv", n=60), init_from=given)
    spec["train"] = {**spec["train"], "max_steps": 2, "eval_every": 0, "save_every": 1}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    _ok(status, err)
    base = (lm / "checkpoints" / "step_00000004").resolve()
    line = f"init_from: {given} -> {base} (best checkpoint of the latest run in {given}, {lm.name})"
    assert out.splitlines()[1] == line, out  # right under the run's own line
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    record = {"given": given, "checkpoint": str(base),
              "which": f"best checkpoint of the latest run in {given}, {lm.name}"}
    assert read_metrics(run)[0]["event"] == "start" and read_metrics(run)[0]["init_from"] == record
    assert read_meta(run / "checkpoints" / "step_00000002")["init_from"] == record
    assert load_spec(run / "spec.toml").init_from == given  # the file's value: a resume compares it

    _ok(*cli(capsys, "train", _write(tmp_path, tiny_spec_data(tmp_path, train={
        **tiny_spec_data(tmp_path)["train"], "max_steps": 1, "eval_every": 0, "save_every": 0}), "lm2.toml"),
        "--no-progress")[::2])
    assert len(runs_of(tmp_path / "runs")) == 2  # the experiment directory now has a later run
    status, out, err = cli(capsys, "train", "--resume", run, "--set", "train.max_steps=3", "--no-progress")
    _ok(status, err)
    assert line in out.splitlines()  # still the base it started from
    assert read_meta(run / "checkpoints" / "step_00000003")["init_from"] == record


# -- init_from a classifier: go on fine-tuning it -------------------------------------------------------
@pytest.fixture
def classifier(tmp_path, capsys) -> Path:
    spec = _cls_spec(tmp_path, _easy_set(tmp_path / "data.csv"), pooling="mean")
    spec["train"] = {**spec["train"], "max_steps": 20, "eval_every": 0, "save_every": 0}
    _ok(*cli(capsys, "train", _write(tmp_path, spec, "classifier.toml"), "--no-progress")[::2])
    (run,) = runs_of(tmp_path / "runs", "cls-test")
    return run


def _continue(tmp_path: Path, classifier: Path, name: str, **extra) -> dict:
    spec = _spec(tmp_path, _easy_set(tmp_path / "data.csv"), {"pooling": "mean"}, init_from=str(classifier), **extra)
    spec["name"] = name
    spec["train"] = {**spec["train"], "max_steps": 2, "lr": 1e-9, "eval_every": 2, "save_every": 0,
                     "warmup_steps": 0}
    return spec


def test_init_from_a_classifier_goes_on_fine_tuning_its_head(tmp_path, capsys, classifier):
    before, _ = load_model(classifier / "checkpoints" / "latest")
    first = {k: v for r in read_metrics(classifier) if r.get("event") == "classification" for k, v in r.items()}
    # classes left out: they are the checkpoint's; with classes declared, the same in the same order
    for name, classes in [("again", None), ("again-declared", ["high", "low"])]:
        spec = _continue(tmp_path, classifier, name)
        if classes:
            spec["classification"] = {**spec["classification"], "classes": classes}
        _ok(*cli(capsys, "train", _write(tmp_path, spec), "--no-progress")[::2])
        (run,) = runs_of(tmp_path / "runs", name)
        after, spec = load_model(run / "checkpoints" / "latest")
        assert spec.classification.classes == ["high", "low"] and spec.init_from == str(classifier)
        # lr 1e-9: the head and body are the classifier's, not a new random head
        assert torch.allclose(after.out_head.weight, before.out_head.weight, atol=1e-6)
        assert torch.allclose(after.trf_blocks[1].ff.layers[0].weight, before.trf_blocks[1].ff.layers[0].weight,
                              atol=1e-6)
        again = {k: v for r in read_metrics(run) if r.get("event") == "classification" for k, v in r.items()}
        assert again["test"]["test/accuracy"] == first["test"]["test/accuracy"] > 0.8


def test_a_lora_on_a_classifier_checkpoint_saves_only_the_adapter_and_head_and_loads_back(tmp_path, capsys,
                                                                                          classifier):
    spec = _continue(tmp_path, classifier, "lora", finetune={"adapter": {"name": "book.lora", "params": LORA}})
    spec["train"] = {**spec["train"], "lr": 3e-3}
    _ok(*cli(capsys, "train", _write(tmp_path, spec), "--no-progress")[::2])
    (run,) = runs_of(tmp_path / "runs", "lora")
    ckpt = run / "checkpoints" / "latest"
    assert {k.split(".")[0] for k in load_file(str(ckpt / "model.safetensors"))} == {"trf_blocks", "out_head"}
    model, loaded = load_model(ckpt)  # the classifier rebuilt as its base, the adapter merged, the head loaded
    base, _ = load_model(classifier / "checkpoints" / "latest")
    assert loaded.task == "classification" and model.out_head.weight.shape == (2, C)
    assert torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    assert not torch.equal(model.out_head.weight, base.out_head.weight)
    _ok(*cli(capsys, "classify", run, "--text", "abcab cab")[::2])


def test_init_from_a_classifier_with_other_classes_or_another_task_is_refused(tmp_path, capsys, classifier):
    out_dir = tmp_path / "more-runs"
    (tmp_path / "medium.csv").write_text("label,text\nlow,abc\nmedium,xyz\nhigh,zzz\n", encoding="utf-8")
    cases = [
        ({"classification": {"classes": ["low", "high"]}}, "classifier of the classes ['high', 'low'], but "
                                                           "classification.classes is ['low', 'high']"),
        ({"classification": {"path": str(tmp_path / "medium.csv")}}, "outside the classes ['high', 'low'] of the "
                                                                      "init_from classifier"),
    ]
    for change, phrase in cases:
        spec = _continue(tmp_path, classifier, "refused")
        spec["classification"] = {**spec["classification"], **change["classification"]}
        spec["train"] = {**spec["train"], "out_dir": str(out_dir)}
        assert phrase in _error(capsys, "train", _write(tmp_path, spec), "--no-progress")
    # a language model run cannot start from a classifier
    lm = tiny_spec_data(tmp_path, init_from=str(classifier), train={**tiny_spec_data(tmp_path)["train"],
                                                                    "out_dir": str(out_dir)})
    err = _error(capsys, "train", _write(tmp_path, lm, "lm.toml"), "--no-progress")
    assert "is a classification model" in err and "this experiment's task is 'lm'" in err, err
    assert not out_dir.exists()


# -- the LoRA example -----------------------------------------------------------------------------------------
def test_the_lora_example_parses_and_fine_tunes_the_classify_example_data_with_an_adapter():
    lora = load_spec(ROOT / "experiments" / "finetune" / "classify_lora.toml")
    full = load_spec(ROOT / "experiments" / "finetune" / "classify.toml")
    assert lora.task == "classification" and lora.init_from == full.init_from
    assert lora.classification == full.classification  # the same data, split and pooling
    assert lora.finetune.adapter.name in ("book.lora", "peft.lora") and lora.finetune.trainable == "none"
    assert lora.components["finetune.adapter"].entry.kind == "adapter"
