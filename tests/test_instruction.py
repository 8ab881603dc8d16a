"""Instruction tuning: templates, rows and per-batch padding, -100 masking, the loss, errors, training,
resume and ``minigpt sample --instruction``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt_core.base import toml as _toml
from minigpt_core.base.errors import SpecError
from minigpt_core.spec import parse_spec
from minigpt_core.tasks.instruction import (
    IGNORE_INDEX,
    InstructionTask,
    instruction_targets,
    pack_instruction_rows,
    read_instructions,
)
from training_utils import ROOT, cli, losses, reference_and_killed_run, read_metrics, runs_of, tiny_spec_data

SHIPPED = ROOT / "experiments" / "finetune" / "data" / "pydoc_instructions.jsonl"


def _write_examples(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _easy_examples(n: int = 60) -> list[dict]:
    """Short examples a tiny model learns in a few dozen steps: every response is 'ok'."""
    words = ["ab", "ba", "abc", "cab", "bca", "aa", "bb", "cc"]
    return [{"instruction": f"say {words[i % len(words)]}", **({"input": "x"} if i % 4 == 0 else {}),
             "output": "ok"} for i in range(n)]


def _ins_spec(tmp_path: Path, data: Path, **instruction) -> dict:
    spec = tiny_spec_data(tmp_path, task="instruction",
                          instruction={"path": str(data), "template": {"name": "book.phi3"}, **instruction})
    spec["name"] = "ins-test"
    spec["model"] = {**spec["model"], "context_length": 48}
    spec["train"] = {**spec["train"], "max_steps": 40, "batch_size": 8, "eval_every": 20, "save_every": 20}
    return spec


def _write(tmp_path: Path, data: dict, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(_toml.dumps(data), encoding="utf-8")
    return path


# -- templates -----------------------------------------------------------------------------------------
def test_the_book_templates_format_as_the_book_does(registry):
    alpaca = registry.get("template", "book.alpaca").build(None)
    book_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\nIdentify the correct spelling of the following word."
                  "\n\n### Input:\nOcassion")
    prompt = alpaca.prompt("Identify the correct spelling of the following word.", "Ocassion")
    assert prompt == book_input  # the book's format_input(entry)
    assert alpaca.text(prompt, "Occasion") == book_input + "\n\n### Response:\nOccasion"
    assert "### Input" not in alpaca.prompt("Name a colour.", "")
    phi3 = registry.get("template", "book.phi3").build(None)
    assert phi3.text(phi3.prompt("Spell it.", "Ocassion"), "Occasion") == \
        "<|user|>\nSpell it.\nOcassion\n<|assistant|>\nOccasion"


def test_an_unknown_template_is_the_registrys_message(tmp_path, capsys):
    data = _write_examples(tmp_path / "data.jsonl", _easy_examples(10))
    with pytest.raises(SpecError) as err:
        parse_spec(_ins_spec(tmp_path, data, template={"name": "book.alpacca"}))
    assert "instruction.template.name" in str(err.value)
    assert "Unknown template component 'book.alpacca'" in str(err.value) and "Did you mean 'book.alpaca'" in str(err.value)


# -- rows, per-batch padding, targets (hand-computed) ------------------------------------------------------
def test_a_batch_is_padded_to_its_longest_example_with_the_first_pad_a_target_and_the_prompt_masked(tmp_path):
    # Three examples: token ids (prompt included) and the prompt's length; end-of-text id 0.
    rows = pack_instruction_rows([([1, 2, 3, 4, 5], 2), ([6, 7], 1), ([8, 9, 10], 3)], max_length=8, eot_id=0)
    assert rows.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0, 6, 2],
                             [6, 7, 0, 0, 0, 0, 0, 0, 3, 1],
                             [8, 9, 10, 0, 0, 0, 0, 0, 4, 3]]
    data = _write_examples(tmp_path / "data.jsonl", _easy_examples(10))
    task = InstructionTask(parse_spec(_ins_spec(tmp_path, data)))
    batch = torch.from_numpy(rows)
    # The book's collate: pad to the longest example + 1 (6), inputs = [:-1], targets = [1:].
    assert task.inputs(batch).tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 0, 0]]
    assert instruction_targets(batch, 5, mask_prompt=False).tolist() == [[2, 3, 4, 5, 0],
                                                                         [7, 0, -100, -100, -100],
                                                                         [9, 10, 0, -100, -100]]
    # Exercise 7.2: targets[:prompt_length - 1] = -100.
    assert instruction_targets(batch, 5, mask_prompt=True).tolist() == [[-100, 3, 4, 5, 0],
                                                                        [7, 0, -100, -100, -100],
                                                                        [-100, -100, 0, -100, -100]]
    # Another batch is only as wide as its own longest example.
    pair = batch[1:]
    assert task.inputs(pair).tolist() == [[6, 7, 0], [8, 9, 10]]
    assert instruction_targets(pair, 3, mask_prompt=True).tolist() == [[7, 0, -100], [-100, -100, 0]]
    # Truncation keeps max_length tokens (the end-of-text is cut off with the rest).
    assert pack_instruction_rows([([1, 2, 3, 4, 5], 2)], max_length=3, eot_id=0).tolist() == [[1, 2, 3, 3, 2]]


def test_the_loss_is_the_mean_over_targets_that_are_not_minus_100(tmp_path):
    data = _write_examples(tmp_path / "data.jsonl", _easy_examples(10))
    spec = _ins_spec(tmp_path, data)
    rows = torch.from_numpy(pack_instruction_rows([([1, 2, 3, 4, 5], 2), ([6, 7], 1)], max_length=8, eot_id=0))
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    kept = {True: [(0, 1, 3), (0, 2, 4), (0, 3, 5), (0, 4, 0), (1, 0, 7), (1, 1, 0)],
            False: [(0, 0, 2), (0, 1, 3), (0, 2, 4), (0, 3, 5), (0, 4, 0), (1, 0, 7), (1, 1, 0)]}
    for mask_prompt, positions in kept.items():
        task = InstructionTask(parse_spec({**spec, "instruction": {**spec["instruction"], "mask_prompt": mask_prompt}}))
        by_hand = torch.stack([F.cross_entropy(logits[b, t], torch.tensor(y)) for b, t, y in positions]).mean()
        assert task.loss(logits, rows).item() == pytest.approx(by_hand.item(), rel=1e-6)
        # the logits at ignored positions do not matter
        other = logits.clone()
        other[1, 2:] = 100.0
        if mask_prompt:
            other[0, 0] = -50.0
        assert task.loss(other, rows).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert IGNORE_INDEX == -100


def test_the_data_is_formatted_tokenized_ended_split_and_validated_on_responses(tmp_path):
    records = _easy_examples(40)
    data = _write_examples(tmp_path / "data.jsonl", records)
    spec = parse_spec(_ins_spec(tmp_path, data, mask_prompt=False, split=[0.5, 0.25, 0.25]))
    task = InstructionTask(spec)
    loaded = task.load_data(spec)
    tok, split = loaded.tokenizer, loaded.split
    assert (len(split.train), len(split.val), len(split.test)) == (20, 10, 10)
    assert split.eot_id == tok.n_vocab == spec.instruction.eot_id  # char: the first id past its vocabulary
    texts = {f"<|user|>\n{r['instruction']}" + (f"\n{r['input']}" if "input" in r else "") + "\n<|assistant|>\nok"
             for r in records}
    row = split.train[0]
    n, p = int(row[-2]), int(row[-1])
    assert tok.decode(row[:n - 1].tolist()) in texts and row[n - 1] == split.eot_id
    assert tok.decode(row[:p].tolist()).endswith("x") or tok.decode(row[:p].tolist()).startswith("<|user|>\nsay")
    assert tok.decode(row[p:n - 1].tolist()) == "\n<|assistant|>\nok"
    assert spec.instruction.max_length == max(int(r[-2]) for r in split.train)  # stored for the run
    # validation loss counts response tokens only, whatever mask_prompt trains on
    from minigpt_core.model.build import build_model

    model = build_model(spec)
    loss, _ = task.evaluate(model, "val", micro_batch=4, device=torch.device("cpu"))
    rows = torch.from_numpy(split.val)
    with torch.no_grad():
        logits = model(task.inputs(rows))
    targets = instruction_targets(rows, logits.shape[1], mask_prompt=True)
    assert loss == pytest.approx(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-5)


# -- errors: one paragraph, exit 2, no run directory ----------------------------------------------------------
@pytest.mark.parametrize("case,phrase", [
    ("empty file", "holds no examples"),
    ("missing field", "record 3: no 'output' field"),
    ("unknown template", "Unknown template component 'my.chat'"),
    ("not json", "line 2: not valid JSON"),
    ("not text", "record 1: the field(s) ['output'] must be text"),
])
def test_bad_instruction_data_is_one_error_and_no_run_directory(tmp_path, capsys, case, phrase):
    records = _easy_examples(10)
    extra = {}
    if case == "missing field":
        del records[2]["output"]
    data = _write_examples(tmp_path / "data.jsonl", records)
    if case == "empty file":
        data.write_text("\n", encoding="utf-8")
    elif case == "unknown template":
        extra = {"template": {"name": "my.chat"}}
    elif case == "not text":
        data = _write_examples(data, [{"instruction": "a", "output": None}] + records)
    elif case == "not json":
        data.write_text(data.read_text().replace("}\n", "\n", 2).replace("\n", "}\n", 1))
    spec = _write(tmp_path, _ins_spec(tmp_path, data, **extra))
    status, out, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2, (out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1
    assert phrase in err, err
    assert not (tmp_path / "runs").exists()


def test_a_json_list_reads_like_jsonl_and_input_is_optional(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]))
    assert read_instructions(str(path)) == [{"instruction": "a", "input": "b", "output": "c"},
                                            {"instruction": "d", "input": "", "output": "e"}]


# -- training, sampling, resume -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_instruction_run_from_a_language_model_learns_to_answer_and_sample_stops_at_the_end(tmp_path, capsys):
    lm_data = tiny_spec_data(tmp_path)
    lm_data["model"] = {**lm_data["model"], "context_length": 48}
    lm_data["train"] = {**lm_data["train"], "max_steps": 4, "eval_every": 0, "save_every": 0}
    assert cli(capsys, "train", _write(tmp_path, lm_data, "lm.toml"), "--no-progress")[0] == 0
    (lm_run,) = runs_of(tmp_path / "runs")
    # a base model: the template formats the prompt, but nothing teaches it to stop
    status, out, err = cli(capsys, "sample", lm_run, "--instruction", "say ab", "--template", "book.phi3",
                           "--max-new-tokens", "7", "--temperature", "0")
    assert status == 0 and len(out) == 8, (out, err)
    status, out, err = cli(capsys, "sample", lm_run, "--instruction", "say ab", "--template", "my.chat")
    assert status == 2 and "Unknown template component 'my.chat'" in err

    data = _write_examples(tmp_path / "data.jsonl", _easy_examples(60))
    spec = _ins_spec(tmp_path, data)
    spec.update(init_from=str(lm_run))
    spec["train"] = {**spec["train"], "lr": 1e-2, "sample_every": 20, "sample_tokens": 10, "sample_temperature": 0.0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert status == 0, err
    assert "instruction results" in out and "unigram entropy of the training responses" in out
    (run,) = runs_of(tmp_path / "runs", "ins-test")
    records = read_metrics(run)
    (report,) = [r for r in records if r.get("event") == "instruction"]
    assert report["val"]["loss"] < 1.0 and report["test"]["examples"] == 60 - 51 - 3
    assert [r["step"] for r in records if "val/loss" in r] == [20, 40]
    final = {k: v for r in records if r.get("step") == 40 for k, v in r.items()}
    assert final["val/response_loss"] == pytest.approx(final["val/loss"]) == pytest.approx(report["val"]["loss"])
    assert final["test/response_loss"] == pytest.approx(report["test"]["loss"])
    assert 'sample: ' in out and "ok'" in out  # the periodic sample: the response to a validation example
    saved = _toml.loads((run / "spec.toml").read_text())["instruction"]
    from minigpt_core.checkpoints.checkpoint import read_meta

    chars = read_meta(lm_run / "checkpoints" / "latest")["tokenizer"]["chars"]  # the base model's ids
    assert saved["eot_id"] == len(chars) and saved["template"]["name"] == "book.phi3" and saved["max_length"] > 20

    status, out, err = cli(capsys, "sample", run, "--instruction", "say cab", "--max-new-tokens", "40",
                           "--temperature", "0")
    assert status == 0, err
    assert out == "ok\n", out  # the response alone, ended by the end-of-text id
    status, out, err = cli(capsys, "sample", run, "--instruction", "say cab", "--input", "x", "--num-samples", "2",
                           "--max-new-tokens", "40", "--temperature", "0", "--no-progress")
    assert status == 0 and out.split() == ["ok", "-" * 40, "ok"], out
    status, out, err = cli(capsys, "sample", run, "--instruction", "a", "--prompt", "b")
    assert status == 2 and "not both" in err


@pytest.mark.slow
def test_an_instruction_run_killed_with_sigkill_resumes_with_identical_losses(tmp_path, capsys):
    data = _write_examples(tmp_path / "data.jsonl", _easy_examples(80))
    common = _ins_spec(tmp_path, data)
    common["model"] = {**common["model"], "drop_rate": 0.1}  # the RNG state must be restored too
    common["train"] = {**common["train"], "max_steps": 30, "save_every": 5, "eval_every": 10, "keep_last": 20,
                       "deterministic": True}
    resume_spec = reference_and_killed_run(capsys, tmp_path, common, 10)
    (killed,) = runs_of(tmp_path / "b" / "runs", "ins-test")
    assert 10 <= max(losses(killed)) < 30

    status, out, err = cli(capsys, "train", resume_spec, "--resume", "--no-progress")
    assert status == 0, err
    assert "resumed at step" in out
    (ref,) = runs_of(tmp_path / "a" / "runs", "ins-test")
    assert list(losses(killed)) == list(range(1, 31))
    assert losses(killed) == losses(ref)  # bitwise
    assert losses(killed, "val/loss") == losses(ref, "val/loss") and len(losses(ref, "val/loss")) == 3


def test_the_shipped_dataset_is_real_and_the_example_experiment_parses():
    records = read_instructions(str(SHIPPED))
    assert 500 <= len(records) <= 1000
    assert sum(bool(r["input"]) for r in records) > 100
    assert {"instruction": "What does `json.dumps` do?", "input": "",
            "output": "Serialize ``obj`` to a JSON formatted ``str``."} not in records  # markup is filtered out
    assert all(r["output"] and "`" not in r["output"] for r in records if not r["input"])  # plain summaries
    spec = _toml.loads((ROOT / "experiments" / "finetune" / "instruct.toml").read_text())
    assert spec["instruction"]["path"] == "experiments/finetune/data/pydoc_instructions.jsonl"
    parse_spec(spec)


def test_the_template_format_check_catches_a_template_whose_text_does_not_continue_its_prompt(registry):
    from minigpt_core.base.registry import make_entry
    from minigpt_core.testing import check_component

    class EndsWithATag:  # text(prompt, output) != text(prompt, "") + output: sampling would misread it
        def prompt(self, instruction, input):
            return f"Q: {instruction} {input}"

        def text(self, prompt, output):
            return f"{prompt}\nA: {output}</a>"

    entry = make_entry("template", "mine.tagged", lambda ctx, p: EndsWithATag(), params=None,
                       description="a broken template", plugin="test")
    results = {r.check: r for r in check_component(entry, registry=registry)}
    assert results["template_format"].status == "fail" and "is not text(prompt, '') + output" in \
        results["template_format"].message
    for name in ("book.alpaca", "book.phi3"):
        assert all(r.status == "pass" for r in check_component(registry.get("template", name), registry=registry))


def test_without_shuffling_the_split_is_the_books(tmp_path):
    from minigpt_core.spec import InstructionSpec
    from minigpt_core.tasks.instruction import split_indices

    parts = split_indices(1100, InstructionSpec(path="x.json", shuffle=False))
    # the book: data[:935] train, data[935:1045] test, data[1045:] validation
    assert parts["train"].tolist() == list(range(935)) and parts["test"].tolist() == list(range(935, 1045))
    assert parts["val"].tolist() == list(range(1045, 1100))
    shuffled = split_indices(1100, InstructionSpec(path="x.json"))
    assert sorted(np.concatenate(list(shuffled.values())).tolist()) == list(range(1100))
    assert shuffled["train"].tolist() != parts["train"].tolist()


@pytest.mark.slow
def test_instruction_tuning_with_lora_on_a_frozen_base_saves_only_the_adapter_and_samples_merged(tmp_path, capsys):
    lm_data = tiny_spec_data(tmp_path)
    lm_data["model"] = {**lm_data["model"], "context_length": 48}
    lm_data["train"] = {**lm_data["train"], "max_steps": 2, "eval_every": 0, "save_every": 0}
    assert cli(capsys, "train", _write(tmp_path, lm_data, "lm.toml"), "--no-progress")[0] == 0
    (lm_run,) = runs_of(tmp_path / "runs")
    spec = _ins_spec(tmp_path, _write_examples(tmp_path / "data.jsonl", _easy_examples(30)))
    spec.update(init_from=str(lm_run),
                finetune={"adapter": {"name": "book.lora", "params": {"rank": 2, "alpha": 4,
                                                                      "targets": ["trf_blocks.*.att.*"]}}})
    spec["train"] = {**spec["train"], "max_steps": 4, "eval_every": 0, "save_every": 0}
    status, out, err = cli(capsys, "train", _write(tmp_path, spec), "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs", "ins-test")
    from safetensors.torch import load_file

    from minigpt_core.assembly import load_model

    saved = load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))
    assert saved and all("lora" in k.lower() for k in saved), sorted(saved)  # the frozen base is named, not copied
    base, _ = load_model(lm_run / "checkpoints" / "latest")
    tuned, tuned_spec = load_model(run / "checkpoints" / "latest")
    assert tuned_spec.task == "instruction" and torch.equal(tuned.tok_emb.weight, base.tok_emb.weight)
    assert not torch.equal(tuned.trf_blocks[0].att.W_query.weight, base.trf_blocks[0].att.W_query.weight)
    status, out, err = cli(capsys, "sample", run, "--instruction", "say ab", "--max-new-tokens", "3")
    assert status == 0, err


@pytest.mark.slow
def test_the_shipped_dataset_rebuilds_identically(tmp_path):
    import subprocess
    import sys

    if sys.version_info[:2] == (3, 11):  # the committed file was built with CPython 3.11
        out = tmp_path / "rebuilt.jsonl"
        subprocess.run([sys.executable, str(SHIPPED.with_name("build_pydoc_instructions.py")), str(out)], check=True,
                       capture_output=True)
        assert out.read_bytes() == SHIPPED.read_bytes()
