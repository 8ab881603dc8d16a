"""The shipped tasks through lm_eval's real evaluator: a trained model above chance, a fresh one at
chance; a GPT-2 imported from transformers scores the same through ``minigpt evaluate`` as through
lm_eval's own ``hf`` model (both offline, from a randomly initialised GPT-2 saved to disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from minigpt_core.downstream.tasks import TASKS_DIR  # noqa: E402
from minigpt_core.model.build import build_model  # noqa: E402
from minigpt_core.checkpoints.checkpoint import save_model  # noqa: E402
from minigpt_core.spec import load_spec, parse_spec  # noqa: E402
from minigpt_core.train.trainer import train  # noqa: E402
from training_utils import PATIENCE_S, ROOT, cli  # noqa: E402

CHANCE = 0.25  # four choices
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _mc(capsys, ckpt: Path, out: Path) -> dict:
    status, _, err = cli(capsys, "evaluate", ckpt, "--tasks", "pydoc_mc", "--batch-size", "16", "--out", out,
                         "--no-progress", "--no-wandb")
    assert status == 0, err
    return json.loads((out / "pydoc_mc.json").read_text())["results"]["pydoc_mc"]


@pytest.mark.slow
def test_a_trained_model_beats_chance_and_a_fresh_one_is_at_chance(tmp_path, capsys):
    """The quickstart's recipe, smaller and shorter (the quickstart itself takes 6 minutes: its figures are in
    docs/evaluate.md): 2 layers of width 64, context 64, 1000 steps of 16 x 64 characters of python-docs."""
    small = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 64}
    quickstart = load_spec(ROOT / "experiments" / "quickstart.toml", overrides=[
        *(f"model.{k}={v}" for k, v in small.items()), f"train.out_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1", "train.max_steps=1000", "train.batch_size=16",
        "train.warmup_steps=20", "train.eval_every=1000", "train.save_every=1000", "train.sample_every=0",
        "train.log_every=50", "train.sample_tokens=16", "wandb.mode=disabled", "train.threads=1", "train.peak_flops=1e12"])
    trained = train(quickstart, progress=False, write=lambda s: None)
    fresh_dir = save_model(build_model(quickstart), quickstart, tmp_path / "fresh",
                           meta={"tokenizer": json.loads((trained.checkpoint / "meta.json").read_text())["tokenizer"]})
    good = _mc(capsys, trained.checkpoint, tmp_path / "trained")  # the whole test split (1,609 examples)
    fresh = _mc(capsys, fresh_dir, tmp_path / "fresh-eval")
    for name, r in (("trained", good), ("fresh", fresh)):
        print(f"{name}: acc {r['acc,none']:.4f} ± {r['acc_stderr,none']:.4f}, "
              f"acc_norm {r['acc_norm,none']:.4f} ± {r['acc_norm_stderr,none']:.4f}")
    # above chance by more than 3 standard errors; chance inside the fresh model's 95% interval (1.96 of them)
    assert good["acc,none"] > CHANCE + 3 * good["acc_stderr,none"]
    assert abs(fresh["acc,none"] - CHANCE) < 1.96 * fresh["acc_stderr,none"]
    assert abs(fresh["acc_norm,none"] - CHANCE) < 1.96 * fresh["acc_norm_stderr,none"]


def _hf_small(directory: Path, registry_tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2)
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    for name, blob in registry_tokenizer.hf_files(128).items():  # GPT-2's own tokenizer files, offline
        (directory / name).write_bytes(blob)


@pytest.mark.slow
def test_an_imported_gpt2_scores_the_same_through_minigpt_as_through_lm_evals_hf_model(tmp_path, capsys):
    from minigpt_core.model.tokenizers import build_tokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    _hf_small(hf_dir, build_tokenizer("gpt2"))
    status, _, err = cli(capsys, "import-hf", hf_dir, tmp_path / "ckpt")
    assert status == 0, err
    limit = "40"
    status, _, err = cli(capsys, "evaluate", tmp_path / "ckpt", "--tasks", "pydoc_mc,pydoc_cloze", "--limit", limit,
                         "--batch-size", "4", "--out", tmp_path / "ours", "--no-progress", "--no-wandb")
    assert status == 0, err
    # lm_eval's own command line and hf model, offline, on the same shipped task directory
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(lm_eval), "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
                           "--tasks", "pydoc_mc,pydoc_cloze", "--include_path", str(TASKS_DIR), "--limit", limit,
                           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "theirs")],
                          capture_output=True, text=True, timeout=PATIENCE_S, cwd=tmp_path,
                          env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = tmp_path.glob("theirs/**/results_*.json")
    theirs = json.loads(written.read_text())["results"]
    for task, metrics in (("pydoc_mc", ("acc", "acc_norm")), ("pydoc_cloze", ("acc", "perplexity"))):
        ours = json.loads((tmp_path / "ours" / f"{task}.json").read_text())["results"][task]
        for metric in metrics:
            key = f"{metric},none"
            assert ours[key] == pytest.approx(theirs[task][key], rel=1e-4), (task, metric)
    # the numbers are a real comparison: not everything at one value
    assert len({json.loads((tmp_path / "ours" / "pydoc_cloze.json").read_text())["results"]["pydoc_cloze"]
                ["perplexity,none"], 0.0}) == 2
