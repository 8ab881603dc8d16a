"""Nothing changes for users or plugin authors (issue 21): what the code of commit a7c99bc (before the
core was put in layers and the trainer split) wrote and did, the current code loads and does the same.

tests/fixtures/legacy_run/ was written by that code (tests/fixtures/make_legacy_checkpoint.py says how);
its expected.json holds what that code printed and logged. Each test runs the current command line
on a copy of it, in that copy (its specs use relative paths).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import minigpt_core.plugin as api
from training_utils import cli, torch_threads

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The generator's helpers and settings (its module imports only the standard library at the top).
_spec = importlib.util.spec_from_file_location("make_legacy_checkpoint", FIXTURES / "make_legacy_checkpoint.py")
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)
CLASSIFY_TEXTS, GREEDY_ARGS, SAMPLE_ARGS, TIMING = maker.CLASSIFY_TEXTS, maker.GREEDY_ARGS, maker.SAMPLE_ARGS, maker.TIMING
environment, logged_after_resume, state_digest = maker.environment, maker.logged_after_resume, maker.state_digest
LEGACY = FIXTURES / "legacy_run"
EXPECTED = json.loads((LEGACY / "expected.json").read_text(encoding="utf-8"))
# The fixture's floats are bitwise what torch computed with these kernels; another CPU's kernels
# (AVX2 against AVX-512, or an AMD EPYC against the Intel Xeon that wrote it, both "AVX512") or another
# torch may round differently, so elsewhere losses are compared to 1e-4 and sampled texts are not
# compared. A fixture written before the CPU's name was recorded counts as another CPU.
_WHERE = {k: v for k, v in environment().items() if k != "python"}
SAME_KERNELS = _WHERE == {k: v for k, v in EXPECTED["environment"].items() if k != "python"}
NOT_SAME = f"the fixture was computed with {EXPECTED['environment']}, this is {environment()}"

# minigpt_core.plugin.__all__ at a7c99bc, copied from that commit: a plugin written then may import
# any of them. Names may be added; none may go.
PLUGIN_API_AT_A7C99BC = [
    "hookimpl", "Registrar", "Params", "Factory",
    "KINDS", "KIND_PROTOCOLS", "AttentionProtocol", "NormProtocol", "ActivationProtocol", "FeedForwardProtocol",
    "PositionalProtocol", "BlockProtocol", "InitProtocol", "TokenizerProtocol", "DatasetProtocol",
    "WeightsProtocol", "AdapterProtocol", "TemplateProtocol",
    "CAPABILITIES", "CAPABILITY_CONTRACTS", "Capability", "CanonicalStateProtocol", "AuxLossProtocol",
    "BuildContext", "KVCache", "LayerKVCache", "mark_residual_projection", "is_residual_projection",
    "CANONICAL_ATTENTION_KEYS", "GELU", "FeedForward", "TransformerBlock", "attention_bias", "causal_attention",
    "SDPAttention",
    "mark_trainable", "is_marked_trainable", "match_modules",
    "model_weights", "attention_canonical_state", "load_attention_canonical_state",
    "TokenizerContext", "TokenizerError", "DataContext", "DataError", "TextSource", "TokenSource", "ShardSet",
    "open_shards",
    "MinigptError", "CheckpointError", "PretrainedError",
]
# Importable from minigpt_core.plugin at a7c99bc though not in __all__ (the module's own alias and
# the tokenizer base it documented). Its other public attributes were typing, pydantic and
# dataclasses imports (Any, BaseModel, Protocol, ...): not the API.
ALSO_IMPORTABLE_AT_A7C99BC = ["Tensor", "Tokenizer"]


@pytest.fixture
def legacy(tmp_path, monkeypatch, isolated_plugins):
    """A copy of the fixture (plugin.toml's ../old_api_plugin.py beside it), the working directory."""
    where = tmp_path / "legacy_run"
    shutil.copytree(LEGACY, where, symlinks=True)
    shutil.copy(FIXTURES / "old_api_plugin.py", tmp_path / "old_api_plugin.py")
    monkeypatch.chdir(where)
    return where


def minigpt(capsys, *args) -> str:
    """The command line in this process, on one torch thread as the fixture was made; its stdout."""
    with torch_threads(1):
        status, out, err = cli(capsys, *args)
    assert status == 0, err
    return out


def assert_same_numbers(got, expected, what: str):
    if SAME_KERNELS:
        assert got == expected, f"{what}: the current code logged other values than the code of a7c99bc"
    else:  # record by record: pytest.approx takes a dict of numbers, not a list of them
        assert [sorted(r) for r in got] == [sorted(r) for r in expected], what
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, rel=1e-4), f"{what}: step {e.get('step')}"


def test_a_legacy_checkpoint_and_its_int8_copy_sample_the_old_texts(legacy, capsys):
    ckpt = Path(EXPECTED["lm_run"]) / "checkpoints" / "step_00000020"
    (legacy / "corpus.txt").unlink()  # a checkpoint samples without its training data (its tokenizer is in it)
    greedy = minigpt(capsys, "sample", ckpt, *GREEDY_ARGS)
    int8_greedy = minigpt(capsys, "sample", "quantized-int8", *GREEDY_ARGS)
    if not SAME_KERNELS:
        pytest.skip(f"sampled texts are compared on the fixture's kernels only: {NOT_SAME}")
    assert greedy == EXPECTED["sample"]["lm_greedy"]
    assert int8_greedy == EXPECTED["sample"]["int8_greedy"]
    assert minigpt(capsys, "sample", ckpt, *SAMPLE_ARGS) == EXPECTED["sample"]["lm"]
    assert minigpt(capsys, "sample", "quantized-int8", *SAMPLE_ARGS) == EXPECTED["sample"]["int8"]


@pytest.mark.slow
def test_an_interrupted_legacy_run_resumes_to_the_old_losses_bitwise(legacy, capsys):
    run = legacy / EXPECTED["lm_run"]
    logged_before = (run / "metrics.jsonl").read_text()
    out = minigpt(capsys, "train", "--resume", EXPECTED["lm_run"], "--no-progress")
    assert "resumed at step 20" in out
    assert (run / "metrics.jsonl").read_text().startswith(logged_before)  # appended to, in the same run
    resumed = logged_after_resume(run)
    assert [r["step"] for r in resumed] == list(range(21, 41))
    assert_same_numbers(resumed, EXPECTED["lm_resumed"], "steps 21-40 after --resume")
    if SAME_KERNELS:
        final = run / "checkpoints" / "step_00000040" / "model.safetensors"
        assert state_digest(final) == EXPECTED["lm_final_weights"]


@pytest.mark.slow
def test_a_legacy_lora_classifier_classifies_and_resumes_as_before(legacy, capsys):
    ckpt = Path(EXPECTED["cls_run"]) / "checkpoints" / "step_00000004"
    data = (legacy / "labels.csv").rename(legacy / "elsewhere.csv")  # classifying needs no training data
    out = minigpt(capsys, "classify", ckpt, *[a for t in CLASSIFY_TEXTS for a in ("--text", t)])
    expected = EXPECTED["classify"]
    assert [line.split("\t")[0] for line in out.splitlines()] == [line.split("\t")[0] for line in expected.splitlines()]
    if SAME_KERNELS:
        assert out == expected

    data.rename(legacy / "labels.csv")
    out = minigpt(capsys, "train", "--resume", EXPECTED["cls_run"], "--no-progress")
    assert "resumed at step 4" in out
    resumed = logged_after_resume(legacy / EXPECTED["cls_run"])
    assert "test/accuracy" in resumed[-1]  # the task's final metrics, after its last step
    # Since issue 23.9 a classifier logs no val/perplexity (the exp of a class loss means nothing); every
    # other value must be what a7c99bc logged.
    expected = [{k: v for k, v in rec.items() if k != "val/perplexity"} for rec in EXPECTED["cls_resumed"]]
    assert_same_numbers(resumed, expected, "the classifier's steps 5-8 after --resume")
    if SAME_KERNELS:
        final = legacy / EXPECTED["cls_run"] / "checkpoints" / "step_00000008" / "model.safetensors"
        assert state_digest(final) == EXPECTED["cls_final_weights"]


@pytest.mark.slow
def test_a_plugin_written_against_the_old_api_passes_check_and_trains_as_before(legacy, capsys):
    out = minigpt(capsys, "check", "legacyapi.*", "--plugin", legacy.parent / "old_api_plugin.py")
    assert out.split("\n\n")[0] == EXPECTED["plugin_check"]

    minigpt(capsys, "train", "plugin.toml", "--no-progress")
    (run,) = [p for p in (legacy / "runs" / "legacy-plugin").iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in TIMING}
               for r in records if "event" not in r and "step" in r]
    # The plugin's norm adds an auxiliary loss: the model finds it and the trainer logs it.
    assert all("train/aux_loss" in m for m in metrics if m["step"] > 0)
    assert_same_numbers(metrics, EXPECTED["plugin_metrics"], "the old-API plugin's training run")
    if SAME_KERNELS:
        assert state_digest(run / "checkpoints" / "step_00000006" / "model.safetensors") \
            == EXPECTED["plugin_final_weights"]


def test_the_plugin_api_exports_every_name_it_exported_at_a7c99bc():
    missing = [n for n in PLUGIN_API_AT_A7C99BC if n not in api.__all__ or not hasattr(api, n)]
    assert missing == [], f"minigpt_core.plugin no longer exports {missing}: plugins written against it break"
    gone = [n for n in ALSO_IMPORTABLE_AT_A7C99BC if not hasattr(api, n)]
    assert gone == [], f"`from minigpt_core.plugin import {', '.join(gone)}` worked at a7c99bc and fails now"
    assert api.Tokenizer in api.TokenizerProtocol.__mro__
