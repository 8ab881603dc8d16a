"""Training loop: schedule, parameter groups, loss falls, accumulation, aux loss, precision, CLI."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from minigpt_core import SpecError, build_model, hookimpl, load_registry, parse_spec, spec_from_preset
from minigpt_core.spec import TrainSpec
from minigpt_core.train import DeviceError, lr_at, param_groups, train
from training_utils import MINIGPT, PATIENCE_S, ROOT, cli, losses, read_metrics, run_minigpt, tiny_spec_data, write_spec

quiet = dict(progress=False, write=lambda s: None)


# -- optimizer and schedule ---------------------------------------------------------------------
def test_warmup_then_cosine_to_min_lr():
    t = TrainSpec(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, t, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert lrs[60] == pytest.approx(5.5e-4)  # cosine midpoint
    assert lr_at(110, t, 110) == pytest.approx(1e-4)
    assert lr_at(50, TrainSpec(lr=1e-3, warmup_steps=0, schedule="constant"), 100) == 1e-3
    assert lr_at(50, TrainSpec(lr=1e-3, min_lr=0.0, warmup_steps=0, schedule="linear"), 100) == pytest.approx(5e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_past_its_last_step_the_schedule_stays_at_min_lr(schedule):
    # Steps past the planned total (a resumed run's total cut short, a token budget rounded up) must
    # not carry the decay on: linear would go below min_lr (even negative), cosine back up.
    t = TrainSpec(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule=schedule)
    assert lr_at(109, t, 110) > 1e-4
    for step in (110, 111, 150, 400):
        assert lr_at(step, t, 110) == pytest.approx(1e-4, rel=1e-9), step


def test_matrices_decay_and_biases_and_norms_do_not():
    model = build_model(spec_from_preset("tiny", model={"n_layers": 1, "qkv_bias": True}))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied head counted once
    assert any(p is model.tok_emb.weight for p in decay["params"])
    assert any(p is model.final_norm.scale for p in no_decay["params"])


def test_train_section_is_validated():
    with pytest.raises(SpecError, match="train: batch_size .10. must be a multiple of micro_batch_size"):
        parse_spec({"train": {"batch_size": 10, "micro_batch_size": 4}})
    with pytest.raises(SpecError, match="train.lrr: unknown field"):
        parse_spec({"train": {"lrr": 1e-3}})
    with pytest.raises(SpecError, match="wandb.mode"):
        parse_spec({"wandb": {"mode": "cloud"}})


# -- the loop ---------------------------------------------------------------------------------
def test_loss_falls_below_unigram_entropy_and_everything_is_logged(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 300, "lr": 5e-3, "eval_every": 150,
                                                      "sample_every": 300, "sample_tokens": 20, "log_every": 50,
                                                      "save_every": 0, "peak_flops": None}))  # measured
    result = train(spec, **quiet)
    assert result.step == 300 and not result.interrupted
    assert result.val_loss < result.unigram_entropy - 0.3  # learnt from context, not just frequencies
    records = read_metrics(result.run_dir)
    logged = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in logged] == [50, 100, 150, 200, 250, 300]
    assert logged[-1]["train/loss"] < logged[0]["train/loss"]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/peak_memory_mb"):
        assert all(r[key] > 0 for r in logged), key
    assert [r["step"] for r in records if "val/loss" in r] == [150, 300]
    assert [r for r in records if "val/loss" in r][-1]["val/perplexity"] == pytest.approx(math.exp(result.val_loss))
    assert any(r.get("data/unigram_entropy") == pytest.approx(result.unigram_entropy) for r in records)
    sample = [r for r in records if "sample/text" in r]
    assert len(sample) == 1 and len(sample[0]["sample/text"]) == 20  # char tokenizer: 20 characters
    assert result.checkpoint.name == "step_00000300"


def test_token_budget_sets_the_number_of_steps(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 1000, "max_tokens": 8 * 32 * 3 + 1,
                                                      "eval_every": 0, "save_every": 0}))
    result = train(spec, **quiet)
    assert result.step == 4  # ceil(769 / 256)


def test_accumulated_gradient_equals_the_whole_batch_gradient(tmp_path):
    # The gradients themselves, as the optimizer receives them: AdamW's update barely depends on the
    # gradient's scale, so equal losses would not show micro-batch gradients summed instead of averaged.
    import copy

    from minigpt_core.train import Trainer

    spec = parse_spec(tiny_spec_data(tmp_path, train={
        "max_steps": 1, "batch_size": 8, "micro_batch_size": 2, "grad_clip": 0.0, "peak_flops": 1e12}))
    trainer = Trainer(spec, loggers=[], **quiet)
    assert trainer.accum == 4
    # the reference: the whole batch at once through a copy of the model
    ref = copy.deepcopy(trainer.model)
    split = trainer.data.split
    batch = torch.from_numpy(split.corpus.windows(split.train[copy.deepcopy(trainer.sampler).next_batch()],
                                                  split.length))
    logits = ref(batch[:, :-1])
    nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    seen = {}
    trainer.optimizer.register_step_pre_hook(  # what the optimizer is about to apply
        lambda opt, args, kwargs: seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    trainer.train_step()
    assert list(seen) == [n for n, _ in ref.named_parameters()]
    for name, p in ref.named_parameters():
        assert (seen[name] - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item() + 1e-8, name


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    base = tiny_spec_data(tmp_path, train={"max_steps": 4, "eval_every": 0, "save_every": 0, "batch_size": 8})
    whole = train(parse_spec(base), **quiet)
    base["train"]["micro_batch_size"] = 2
    base["name"] = "accumulated"
    accumulated = train(parse_spec(base), **quiet)
    a, b = losses(whole.run_dir), losses(accumulated.run_dir)
    assert list(a) == list(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


class _AuxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = 100.0


class _AuxFeedForward(nn.Module):
    """A feed-forward that also asks for small outputs, like a mixture-of-experts balance loss."""

    def __init__(self, ctx, weight):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(ctx.emb_dim, 4 * ctx.emb_dim), nn.GELU(), nn.Linear(4 * ctx.emb_dim, ctx.emb_dim))
        self.weight = weight
        self.aux_loss = None

    def forward(self, x):
        y = self.net(x)
        self.aux_loss = self.weight * y.pow(2).mean()
        return y


class _AuxPlugin:
    @hookimpl
    def minigpt_register(self, registry):
        registry.add("feedforward", "auxtest.ff", lambda ctx, p: _AuxFeedForward(ctx, p.weight), params=_AuxParams,
                     description="feed-forward with an auxiliary loss")


def test_auxiliary_loss_is_trained_on_and_logged(tmp_path):
    reg = load_registry(extra_plugins=[("auxtest", _AuxPlugin())])
    raw = tiny_spec_data(tmp_path, train={"max_steps": 15, "eval_every": 0, "save_every": 0})
    raw["model"]["feedforward"] = {"name": "auxtest.ff"}
    result = train(parse_spec(raw, registry=reg), **quiet)
    aux = losses(result.run_dir, "train/aux_loss")
    assert list(aux) == list(range(1, 16))
    # Only the objective pulls the feed-forward outputs towards zero this fast.
    assert aux[15] < 0.2 * aux[1]
    lm = losses(result.run_dir)
    assert all(lm[s] < 10 for s in lm)  # train/loss stays the language-model loss alone


def test_bf16_autocast_trains_on_cpu_and_fp16_asks_for_a_gpu(tmp_path):
    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 3, "precision": "bf16", "eval_every": 0,
                                                      "save_every": 0}))
    result = train(spec, **quiet)
    assert all(math.isfinite(v) for v in losses(result.run_dir).values())
    spec = parse_spec(tiny_spec_data(tmp_path, train={"precision": "fp16", "device": "cpu"}))
    with pytest.raises(DeviceError, match="fp16.*CUDA"):
        train(spec, **quiet).step  # noqa: B018


def test_a_cuda_device_is_refused_clearly_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status, _, err = cli(capsys, "train", write_spec(tmp_path, train={"device": "cuda"}))
    assert status == 2 and "no CUDA GPU" in err


# -- command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    spec = parse_spec(tiny_spec_data(tmp, train={"max_steps": 30, "eval_every": 10, "save_every": 10}))
    return tmp, train(spec, **quiet)


def test_checkpoints_keep_the_last_k_and_the_best(trained):
    _, result = trained
    ckpts = sorted(p.name for p in (result.run_dir / "checkpoints").glob("step_*"))
    best = (result.run_dir / "checkpoints" / "best").resolve().name
    assert ckpts == sorted({"step_00000020", "step_00000030", best})
    assert (result.run_dir / "checkpoints" / "latest").resolve().name == "step_00000030"
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "char" and len(meta["tokenizer"]["chars"]) > 50
    assert {"book", "data", "tokenizers"} <= set(meta["plugins"])
    trainer = json.loads((result.checkpoint / "trainer.json").read_text())
    assert trainer["sampler"]["position"] == 30 * 8 and set(trainer["sha256"]) >= {"model.safetensors", "optimizer.safetensors"}


def test_sample_command_generates_from_a_checkpoint(trained, capsys):
    tmp, result = trained
    args = ("sample", result.checkpoint, "--prompt", "The ", "--max-new-tokens", "40", "--seed", "1")
    a = run_minigpt(*args)  # the installed console script, as a user runs it
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("The ") and len(a.stdout.rstrip("\n")) == 44
    status, out, _ = cli(capsys, *args)
    assert status == 0 and out == a.stdout  # same seed, same text
    status, _, err = cli(capsys, "sample", result.run_dir, "--prompt", "The ", "--temperature", "0",
                         "--num-samples", "2")
    assert status == 0 and "checkpoints/step_" in err  # a run directory: its best checkpoint
    status, _, err = cli(capsys, "sample", tmp / "nowhere")
    assert status == 2 and "No checkpoint" in err


def test_eval_command_prints_loss_and_perplexity(trained, tmp_path, capsys):
    _, result = trained
    status, out, err = cli(capsys, "eval", result.checkpoint)
    assert status == 0, err
    loss = float(out.split("loss ")[1].split()[0])
    assert loss == pytest.approx(json.loads((result.checkpoint / "meta.json").read_text())["val_loss"], abs=0.25)
    assert "perplexity" in out and "validation split" in out
    other = tmp_path / "other.txt"
    other.write_text("The value of the expression is the value of the object. " * 40)
    status, out, err = cli(capsys, "eval", result.checkpoint, "--data", other, "--max-windows", "8")
    assert status == 0, err
    assert "8 windows" in out and "other.txt" in out


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    spec = write_spec(tmp_path, train={"max_steps": 100000, "eval_every": 0, "save_every": 0, "log_every": 1})
    proc = subprocess.Popen([str(MINIGPT), "train", str(spec), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + PATIENCE_S
    metrics = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("*/*/metrics.jsonl"))
        if found and sum("train/loss" in line for line in found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, "training did not start"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    step = max(losses(metrics.parent))
    assert f"interrupted at step {step}" in out and "--resume" in out
    assert (metrics.parent / "checkpoints" / f"step_{step:08d}" / "trainer.json").is_file()


def test_a_run_that_cannot_start_leaves_nothing_behind(tmp_path, capsys):
    spec = write_spec(tmp_path, data={"source": {"name": "text", "params": {"paths": [str(tmp_path / "nope.txt")]}}})
    status, _, err = cli(capsys, "train", spec)
    assert status == 2 and "found no file" in err
    assert not (tmp_path / "runs").exists()  # neither a run directory nor the directories made for it


def test_the_applied_update_uses_the_clipped_gradient(tmp_path):
    # eps = 1 makes AdamW's first step nearly SGD (lr * g / (|g| + eps)), so the update shows the
    # gradient's scale; with the default 1e-8 it would be lr * sign(g) whether clipped or not.
    import copy

    from minigpt_core.train import Trainer

    clip, lr, eps = 0.05, 0.1, 1.0
    spec = parse_spec(tiny_spec_data(tmp_path, train={
        "max_steps": 1, "batch_size": 8, "micro_batch_size": 4, "lr": lr, "warmup_steps": 0, "schedule": "constant",
        "weight_decay": 0.0, "eps": eps, "grad_clip": clip, "peak_flops": 1e12}))
    trainer = Trainer(spec, loggers=[], **quiet)
    # the reference: the same batch through a copy of the model, the global norm clipped by hand
    ref = copy.deepcopy(trainer.model)
    split = trainer.data.split
    batch = torch.from_numpy(split.corpus.windows(split.train[copy.deepcopy(trainer.sampler).next_batch()],
                                                  split.length))
    logits = ref(batch[:, :-1])
    nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    grads = {name: p.grad for name, p in ref.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert norm > 5 * clip  # clipping has work to do
    scale = min(1.0, clip / (norm + 1e-6))

    def adamw_first_step(g):  # m_hat = g, v_hat = g**2 after bias correction
        return -lr * g / (g.abs() + eps)

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    stats = trainer.train_step()
    assert float(stats["grad_norm"]) == pytest.approx(norm, rel=1e-4)  # the norm logged is the unclipped one
    names = list(before)
    moved = torch.cat([(p.detach() - before[name]).flatten() for name, p in trainer.model.named_parameters()])
    expected = torch.cat([adamw_first_step(grads[name] * scale).flatten() for name in names])
    unclipped = torch.cat([adamw_first_step(grads[name]).flatten() for name in names])
    # float32 rounding of the parameters (norm gains near 1) bounds the agreement, not the update's own scale
    tolerance = 1e-3 * float(expected.abs().max())
    assert float((moved - expected).abs().max()) < tolerance
    assert float((unclipped - expected).abs().max()) > 10 * tolerance  # the check above tells them apart
