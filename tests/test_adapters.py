"""Fine-tuning: which parameters train ([finetune] trainable), LoRA adapters (book.lora, peft.lora),
partial checkpoints that name their base, merging for inference and export-hf."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from minigpt_core import hookimpl, load_registry
from minigpt_core.checkpoints.checkpoint import read_meta
from minigpt_core.assembly import load_model
from minigpt_core.finetune import apply_finetune, plain_model
from minigpt_core.assembly import count_trainable, restore_finetuned
from minigpt_core.model.build import build_model
from minigpt_core.spec import parse_spec
from minigpt_core.testing import check_component
from minigpt_core.train.optim import build_optimizer
from minigpt_core.train.trainer import train
from training_utils import cli, losses, tiny_spec_data, write_spec

ADAPTERS = ["book.lora", "peft.lora"]
LORA = {"rank": 2, "alpha": 4.0}
# The tiny model (training_utils): 2 blocks, emb 32, ff 128, no q/k/v bias, tied head.
C, F = 32, 128
BLOCK = 3 * C * C + (C * C + C) + (C * F + F) + (F * C + C) + 2 * (2 * C)  # att, out_proj, ff, two norms
FINAL_NORM = 2 * C
LORA_PER_BLOCK = 2 * (4 * (C + C) + (C + F) + (F + C))  # rank 2 on W_q, W_k, W_v, out_proj, ff.0, ff.2
MAGNITUDES = {"book.lora": 0, "peft.lora": 0, "peft.dora": 4 * C + F + C}  # DoRA: one per output feature


def _spec(tmp_path, **sections):
    return parse_spec(tiny_spec_data(tmp_path, **sections))


def _idx(vocab=92):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A briefly pretrained tiny run: the base every fine-tuning test starts from."""
    tmp = tmp_path_factory.mktemp("base")
    result = train(_spec(tmp, train={"max_steps": 4, "save_every": 4, "eval_every": 4}), progress=False)
    return result.checkpoint


def _finetune(tmp_path, base, name="ft", steps=4, **finetune):
    spec = _spec(tmp_path, name=name, init_from=str(base), finetune=finetune,
                 train={"max_steps": steps, "save_every": 2, "eval_every": steps})
    return train(spec, progress=False)


# -- which parameters train ---------------------------------------------------------------------
def test_trainable_counts_equal_a_hand_count(tmp_path):
    cases = {"all": 2 * BLOCK + FINAL_NORM + 128 * C + 32 * C,  # + tied embedding + positions
             "book": BLOCK + FINAL_NORM,
             ("final_norm.*", "trf_blocks.0.norm1.*"): FINAL_NORM + 2 * C}
    for trainable, expected in cases.items():
        spec = _spec(tmp_path, finetune={"trainable": list(trainable) if isinstance(trainable, tuple) else trainable})
        model = build_model(spec)
        info = apply_finetune(model, spec)
        assert info.trainable == expected, trainable
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        # frozen parameters stay out of the optimizer
        opt = build_optimizer(model, spec.train, torch.device("cpu"))
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == expected


@pytest.mark.parametrize("adapter", [*ADAPTERS, "peft.dora"])
def test_lora_trainable_count_equals_a_hand_count(tmp_path, adapter):
    spec = _spec(tmp_path, finetune={"adapter": {"name": adapter, "params": LORA}})
    info = apply_finetune(build_model(spec), spec)
    # the base is frozen by default with an adapter
    assert info.trainable == 2 * (LORA_PER_BLOCK + MAGNITUDES[adapter])
    spec = _spec(tmp_path, finetune={"trainable": "book", "adapter": {"name": adapter,
                                     "params": {**LORA, "targets": ["trf_blocks.*.att.*"]}}})
    info = apply_finetune(build_model(spec), spec)
    assert info.trainable == BLOCK + FINAL_NORM + 2 * (2 * 4 * (C + C) + (4 * C if MAGNITUDES[adapter] else 0))
    assert len(info.adapter_names) == 8


def test_frozen_parameters_are_bitwise_unchanged_after_training(tmp_path, base):
    result = _finetune(tmp_path, base, steps=3, trainable="book")
    before, _ = load_model(base)
    after, _ = load_model(result.checkpoint)  # rebuilt from the base + the saved trainable tensors
    b, a = before.state_dict(), after.state_dict()
    trained = [k for k in a if k.startswith(("trf_blocks.1.", "final_norm.")) and not k.endswith(".mask")]
    frozen = [k for k in a if k not in trained]
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert all(not torch.equal(a[k], b[k]) for k in trained if k.endswith("weight"))
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert set(saved) == set(trained)


# -- LoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [*ADAPTERS, "peft.dora"])
def test_lora_at_init_leaves_logits_unchanged_and_merge_equals_unmerged(tmp_path, adapter):
    spec = _spec(tmp_path, finetune={"adapter": {"name": adapter, "params": LORA}})
    model = build_model(spec).eval()
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
        info = apply_finetune(model, spec)
        assert torch.allclose(model(idx), before, atol=1e-7, rtol=0)
        for n, p in model.named_parameters():
            if p.requires_grad:  # a trained adapter
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
        unmerged = model(idx)
        assert (unmerged - before).abs().max() > 1e-2
        info.adapter.merge(model)
        assert (model(idx) - unmerged).abs().max() <= 1e-5
        info.adapter.unmerge(model)
        assert (model(idx) - unmerged).abs().max() <= 1e-5
        plain = plain_model(model)
        assert set(plain.state_dict()) == set(build_model(spec).state_dict())
        assert (plain(idx) - unmerged).abs().max() <= 1e-5


def test_book_lora_is_the_books_formula(tmp_path):
    """W x + alpha * (x @ A @ B), no alpha/rank scaling; A ~ kaiming_uniform(a=sqrt(5)) over (in, rank)."""
    spec = _spec(tmp_path, finetune={"adapter": {"name": "book.lora", "params": {"rank": 4, "alpha": 3.0,
                                                                                  "targets": ["trf_blocks.0.ff.layers.0"]}}})
    model = build_model(spec)
    apply_finetune(model, spec)
    linear = model.trf_blocks[0].ff.layers[0]
    lora = linear.lora
    assert lora.A.shape == (C, 4) and lora.B.shape == (4, F) and torch.all(lora.B == 0)
    assert lora.A.abs().max() <= 1 / 4 ** 0.5 and lora.A.abs().max() > 0.3  # bound 1/sqrt(fan_in = rank)
    with torch.no_grad():
        lora.B.normal_()
        x = torch.randn(3, C)
        want = x @ linear.weight.T + linear.bias + 3.0 * (x @ lora.A @ lora.B)
        assert torch.allclose(linear(x), want, atol=1e-5)


def test_a_broken_adapter_fails_the_conformance_checks():
    from minigpt_adapters import LoraParams
    from minigpt_adapters.lora import BookLora

    class NoisyLora(BookLora):  # B not zero at initialisation: the model changes when it is applied
        def apply(self, model):
            names = super().apply(model)
            for name in names:
                torch.nn.init.normal_(model.get_submodule(name).lora.B)
            return names

    class Plugin:
        @hookimpl
        def minigpt_register(self, registry):
            registry.add("adapter", "thirdparty.noisy_lora", lambda ctx, p: NoisyLora(p), params=LoraParams,
                         description="LoRA whose B starts random")

    reg = load_registry(extra_plugins=[("noisy", Plugin())])
    results = {r.check: r for r in check_component(reg.get("adapter", "thirdparty.noisy_lora"), registry=reg)}
    assert results["adapter_identity"].status == "fail"
    assert results["adapter_trainable"].status == "pass" and results["adapter_merge"].status == "pass"


# -- checkpoints, resume, export -------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_checkpoint_is_small_and_loads_back_to_identical_logits(tmp_path, base, adapter):
    result = _finetune(tmp_path, base, name=adapter.replace(".", "-"), adapter={"name": adapter, "params": LORA})
    ckpt = result.checkpoint
    full = (base / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < full / 5
    saved = load_file(str(ckpt / "model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == 2 * LORA_PER_BLOCK
    meta = read_meta(ckpt)
    assert meta["finetune"]["base"]["init_from"] == str(base.resolve())
    assert len(meta["finetune"]["base"]["sha256"]) == 64
    # The base with the adapter applied by hand and the saved tensors loaded ...
    spec = load_model(ckpt)[1]
    model, _ = load_model(base)
    apply_finetune(model, spec)
    model.load_state_dict(saved, strict=False)
    idx = _idx()
    with torch.no_grad():
        want = model.eval()(idx)
        rebuilt, _ = restore_finetuned(spec, saved, meta, str(ckpt))
        assert torch.equal(rebuilt.eval()(idx), want)  # ... is what loading rebuilds,
        merged, _ = load_model(ckpt)  # and inference gets it merged into plain weights
        assert type(merged.trf_blocks[0].att.W_query) is torch.nn.Linear
        assert (merged.eval()(idx) - want).abs().max() <= 1e-5
        assert (want - load_model(base)[0].eval()(idx)).abs().max() > 1e-4  # the adapter did train


def test_resuming_an_adapter_run_gives_identical_losses(tmp_path, base):
    result = _finetune(tmp_path, base, steps=4, adapter={"name": "book.lora", "params": {**LORA, "dropout": 0.1}})
    branch = train(None, resume=result.run_dir / "checkpoints" / "step_00000002", progress=False)
    first, again = losses(result.run_dir), losses(branch.run_dir)
    assert {s: again[s] for s in (3, 4)} == {s: first[s] for s in (3, 4)}


def test_export_hf_of_a_lora_model_writes_merged_gpt2_weights(tmp_path, base):
    transformers = pytest.importorskip("transformers")
    result = _finetune(tmp_path, base, adapter={"name": "book.lora", "params": LORA})
    spec = load_model(result.checkpoint)[1]
    ckpt = result.checkpoint
    model, _ = restore_finetuned(spec, load_file(str(ckpt / "model.safetensors")), read_meta(ckpt), str(ckpt))
    from minigpt_core.pretrained import export_hf

    with pytest.warns(UserWarning, match="no tokenizer files"):
        export_hf(model, spec, tmp_path / "hf")
    assert hasattr(model.trf_blocks[0].att.W_query, "lora")  # the live model keeps its adapter
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = _idx()
    with torch.no_grad():
        assert (hf(idx).logits - model.eval()(idx)).abs().max() <= 1e-4


# -- the command line ---------------------------------------------------------------------------------
def test_summary_reports_trainable_counts(tmp_path, capsys, base):
    path = write_spec(tmp_path, init_from=str(base), finetune={"adapter": {"name": "book.lora", "params": LORA}})
    status, out, _ = cli(capsys, "summary", path)
    assert status == 0
    assert f"{2 * LORA_PER_BLOCK:,} trainable" in out and "adapter book.lora on 12 module(s)" in out
    info = count_trainable(parse_spec(tiny_spec_data(tmp_path, finetune={"trainable": "book"})))
    assert info.trainable == BLOCK + FINAL_NORM


@pytest.mark.parametrize("finetune, message", [
    ({"adapter": {"name": "book.loar"}}, "book.lora"),
    ({"adapter": {"name": "book.lora", "params": {"targets": ["trf_blocks.*.attn.*"]}}},
     "'trf_blocks.*.attn.*' matches no nn.Linear"),
    ({"adapter": {"name": "book.lora", "params": {"targets": ["out_head"]}}}, "tied to the token embedding"),
    ({"trainable": ["trf_block.1.*"]}, "'trf_block.1.*' matches no parameter"),
])
def test_bad_finetune_settings_give_one_message_and_no_run_directory(tmp_path, capsys, base, finetune, message):
    path = write_spec(tmp_path, init_from=str(base), finetune=finetune)
    status, out, err = cli(capsys, "train", path)
    assert status == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_lora_checkpoint_is_a_base_for_further_fine_tuning(tmp_path, base):
    lora = _finetune(tmp_path, base, name="lora", adapter={"name": "peft.lora", "params": LORA})
    merged, _ = load_model(lora.checkpoint)
    again = _finetune(tmp_path, lora.checkpoint, name="again", steps=2, trainable=["final_norm.*"])
    assert read_meta(again.checkpoint)["finetune"]["base"]["init_from"] == str(lora.checkpoint.resolve())
    after, _ = load_model(again.checkpoint)  # base (itself base + LoRA) rebuilt, then the final norm
    m, a = merged.state_dict(), after.state_dict()
    assert set(m) == set(a)
    assert all(torch.equal(a[k], m[k]) for k in a if not k.startswith("final_norm."))
    assert not torch.equal(a["final_norm.scale"], m["final_norm.scale"])


def test_a_checkpoint_whose_base_changed_is_refused(tmp_path, base):
    import shutil

    from minigpt_core import CheckpointError

    copy = tmp_path / "base-copy"
    shutil.copytree(base, copy)
    result = _finetune(tmp_path, copy, steps=2, adapter={"name": "book.lora", "params": LORA})
    state = load_file(str(copy / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in state.items()}, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="whose weights changed since"):
        load_model(result.checkpoint)


# What importing peft logged on a CPU machine: torchao's GPU-only extensions and torch's _pytree lines.
PEFT_IMPORT_NOISE = ("Failed to load", "_C_mxfp8", "_pytree", "is an Enum subclass")


def test_a_peft_lora_fine_tune_prints_none_of_the_import_noise_and_other_warnings_still_show(tmp_path, base):
    import subprocess
    import sys

    from training_utils import run_minigpt

    pytest.importorskip("peft")
    spec = write_spec(tmp_path, name="peft-ft", init_from=str(base),
                      finetune={"adapter": {"name": "peft.lora", "params": LORA}},
                      train={"max_steps": 1, "save_every": 0, "eval_every": 0})
    p = run_minigpt("train", spec, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "adapter peft.lora" in p.stdout and not any(n in p.stderr + p.stdout for n in PEFT_IMPORT_NOISE), p.stderr
    # Only during the import: those loggers' later warnings (and everyone else's) still show.
    probe = ("import logging; from minigpt_adapters.peft_lora import _import_peft; _import_peft(); "
             "logging.getLogger('torchao').warning('torchao: a later warning'); "
             "logging.getLogger('torch.utils._pytree').warning('pytree: a later warning')")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert p.returncode == 0 and "Failed to load" not in p.stderr, p.stderr
    assert "torchao: a later warning" in p.stderr and "pytree: a later warning" in p.stderr, p.stderr
