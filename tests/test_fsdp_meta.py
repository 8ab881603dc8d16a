"""FSDP2 for a model that does not fit one device: meta-device build, per-shard init, sharded checkpoints.

Two gloo ranks under torchrun on the CPU, as in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_core import hookimpl
from training_utils import ROOT, losses, run_minigpt, runs_of, write_spec

TORCHRUN = Path(sys.executable).with_name("torchrun")

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:  # pragma: no cover - torch < 2.6
    pytestmark = pytest.mark.skip(reason="needs FSDP2 (torch >= 2.6)")


def torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# Each rank: the plain build (whole model, same seed) against the meta build sharded over the two
# ranks and materialised shard by shard; every parameter gathered back and compared bitwise.
COMPARE = r'''
import json, sys, torch
from minigpt_core import parse_spec
from minigpt_core.base import toml as _toml
from minigpt_core.model.build import build_model
from minigpt_core.base.distributed import init_distributed, shutdown, wrap_model
from minigpt_core.train.meta_init import build_meta_model, materialise

env = init_distributed("cpu")
report = {}
for i, path in enumerate(sys.argv[1:-1]):
    spec = parse_spec(_toml.loads(open(path).read()))
    plain = build_model(spec)
    model, recorder = build_meta_model(spec)
    assert all(p.is_meta for p in model.parameters())
    model = wrap_model(model, "fsdp", env, torch.device("cpu"))
    materialise(model, recorder, torch.device("cpu"))
    ref = dict(plain.named_parameters())
    got = dict(model.named_parameters())
    assert set(got) == set(ref), (set(got) ^ set(ref))
    locals_ = {n: p.to_local().numel() for n, p in got.items()}
    report[path] = {
        "differ": [n for n, p in got.items() if not torch.equal(p.full_tensor(), ref[n])],
        "buffers_differ": [n for n, b in model.named_buffers() if not torch.equal(b, dict(plain.named_buffers())[n])],
        "tied": model.out_head.weight is model.tok_emb.weight,
        "sharded": all(locals_[n] < ref[n].numel() for n in got if ref[n].shape[0] > 1),
        "logits_equal": torch.equal(model(torch.arange(12)[None] % 100), plain(torch.arange(12)[None] % 100)),
    }
    del model
if env.rank == 1:
    open(sys.argv[-1], "w").write(json.dumps(report))
shutdown(barrier=True)
'''


@pytest.mark.slow
def test_meta_device_fsdp2_build_equals_the_plain_build_on_two_ranks(tmp_path):
    specs = [
        # GPT-2 init, tied head, a vocabulary that two ranks split unevenly, the book's causal-mask buffers
        write_spec(tmp_path, "gpt2.toml", model={"vocab_size": 129}),
        # PyTorch's default init drawn in the constructors, RMSNorm scales made by torch.ones, RoPE tables
        write_spec(tmp_path, "modern.toml", model={
            "tie_weights": False, "init": {"name": "book.pytorch_default"}, "norm": {"name": "modern.rmsnorm"},
            "attention": {"name": "modern.rope"}, "positional": {"name": "modern.none"},
            "feedforward": {"name": "modern.swiglu"}}),
    ]
    script = tmp_path / "compare.py"
    script.write_text(COMPARE, encoding="utf-8")
    out = tmp_path / "report.json"
    done = torchrun(script, *specs, out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for spec in specs:
        r = report[str(spec)]
        assert r["differ"] == [] and r["buffers_differ"] == [], (spec.name, r)
        assert r["sharded"] and r["logits_equal"], (spec.name, r)
    assert report[str(specs[0])]["tied"]


def _shard_files(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if "-shard-" in p.name)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_with_identical_losses_and_no_rank_holds_the_full_state(tmp_path):
    from safetensors.torch import load_file

    from minigpt_core.assembly import load_model
    from minigpt_core.finetune import base_record

    spec = write_spec(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 2, "strategy": "fsdp",
                                       "meta_init": True, "sharded_checkpoint": True, "log_every": 1,
                                       "peak_flops": 1e12})
    full = torchrun("-m", "minigpt", "train", spec, "--no-progress")
    assert full.returncode == 0, full.stderr[-3000:]
    (run,) = runs_of(tmp_path / "runs")
    ckpt = run / "checkpoints" / "step_00000002"
    assert _shard_files(ckpt) == ["model-shard-00000-of-00002.safetensors", "model-shard-00001-of-00002.safetensors",
                                  "optimizer-shard-00000-of-00002.safetensors",
                                  "optimizer-shard-00001-of-00002.safetensors"]
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.safetensors").exists()
    trainer = json.loads((ckpt / "trainer.json").read_text())
    layout = trainer["sharded"]["layout"]
    assert trainer["sharded"]["world_size"] == 2
    # each rank wrote only its slice of every split tensor; the slices add up to the full tensor
    for kind in ("model", "optimizer"):
        parts = [load_file(str(ckpt / f"{kind}-shard-0000{r}-of-00002.safetensors")) for r in (0, 1)]
        assert set(parts[0]) == set(parts[1])
        for key in parts[0]:
            name = key.rpartition("/")[0] if kind == "optimizer" else key
            if kind == "optimizer" and parts[0][key].dim() == 0:
                continue  # AdamW's step count
            if layout[name]["sharded"]:
                full_rows = layout[name]["shape"][0]
                rows = [p[key].shape[0] for p in parts]
                assert sum(rows) == full_rows and max(rows) < full_rows, (key, rows)

    resumed = torchrun("-m", "minigpt", "train", spec, "--resume", ckpt, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    branch = next(r for r in runs_of(tmp_path / "runs") if r != run)  # resuming an earlier step branches
    a, b = losses(run), losses(branch)
    assert [3, 4] == [s for s in b if s > 2]
    for step in (3, 4):
        assert a[step] == b[step], (step, a[step], b[step])
    assert losses(run, "val/loss")[4] == losses(branch, "val/loss")[4]

    # sample / eval / init_from load a sharded checkpoint whole in one process, from its shards
    model, _ = load_model(run / "checkpoints" / "step_00000004")
    assert model.tok_emb.weight.shape == (128, 32) and model.out_head.weight is model.tok_emb.weight
    assert len(base_record(str(run / "checkpoints" / "step_00000004"))["sha256"]) == 64  # a fine-tune's base

    # another number of processes: a clear error, nothing written
    one = run_minigpt("train", spec, "--resume", run, "--no-progress")
    assert one.returncode == 2, one.stderr
    assert "2 shards" in one.stderr and "1 process(es)" in one.stderr and "Traceback" not in one.stderr
    assert "--nproc_per_node 2" in one.stderr
    assert len(runs_of(tmp_path / "runs")) == 2


MODELS = {
    "gpt2-tied": {},
    "modern": {"tie_weights": False, "init": {"name": "book.pytorch_default"}, "norm": {"name": "modern.rmsnorm"},
               "attention": {"name": "modern.rope"}, "positional": {"name": "modern.none"},
               "feedforward": {"name": "modern.swiglu"}},
    "alibi-dyt-parallel": {"attention": {"name": "modern.alibi"}, "positional": {"name": "modern.none"},
                           "norm": {"name": "modern.dyt"}, "block": {"name": "modern.parallel"}},
    "moe-sinusoidal": {"feedforward": {"name": "modern.moe", "params": {"n_experts": 2, "top_k": 1}},
                       "positional": {"name": "modern.sinusoidal"}, "init": {"name": "book.pytorch_default"}},
    "torch-mha": {"attention": {"name": "torch.mha"}, "norm": {"name": "torch.layernorm"}},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recorded_build_replays_to_the_plain_build(tmp_path, name):
    # One process (no sharding): the replay alone, over many components' constructors and inits.
    import torch

    from minigpt_core import parse_spec
    from minigpt_core.model.build import build_model
    from minigpt_core.train.meta_init import build_meta_model, materialise
    from training_utils import tiny_spec_data

    spec = parse_spec(tiny_spec_data(tmp_path, model=MODELS[name]))
    plain = build_model(spec)
    after_plain = torch.rand(4)
    model, recorder = build_meta_model(spec)
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(torch.rand(4), after_plain)  # the generator advanced as the plain build advances it
    materialise(model, recorder, torch.device("cpu"))
    ref, got = plain.state_dict(), model.state_dict()
    assert list(got) == list(ref)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []
    buffers = dict(plain.named_buffers())  # also the tables kept out of the state dict (RoPE, sinusoidal)
    assert [k for k, b in model.named_buffers() if not torch.equal(b, buffers[k])] == []
    assert (model.out_head.weight is model.tok_emb.weight) == spec.model.tie_weights


def _partial_init(model, n_heads: int) -> None:
    """An init scheme that writes parts of tensors, as per-head or per-slice schemes do."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                w.normal_(0.0, 0.02)
                if w.shape[0] % n_heads == 0:
                    for h, rows in enumerate(w.unflatten(0, (n_heads, -1))):  # one view per head
                        rows.normal_(0.0, 0.02 * (h + 1))
                w[:, ::3].mul_(0.5)  # a strided view
                if module.bias is not None:
                    module.bias.zero_()
                    module.bias[:2].fill_(0.1)
            elif isinstance(module, nn.Embedding):  # the first rows drawn again, the rest as built
                module.weight[: module.weight.shape[0] // 3].normal_(0.0, 0.02)


class _PartialInitPlugin:
    @hookimpl
    def minigpt_register(self, registry):
        registry.add("init", "partial.per_head", lambda ctx, p: (lambda model: _partial_init(model, ctx.n_heads)),
                     description="per-head normal init with slices (test)")


def test_recorded_build_replays_init_ops_on_views_of_a_parameter(tmp_path):
    # Each op must be replayed on the view it wrote (a head's rows, a slice, strided columns), not on
    # the whole parameter: the replayed build equals the plain one bit for bit.
    import torch

    from minigpt_core import load_registry, parse_spec
    from minigpt_core.model.build import build_model
    from minigpt_core.train.meta_init import build_meta_model, materialise
    from training_utils import tiny_spec_data

    reg = load_registry(extra_plugins=[("partial", _PartialInitPlugin())])
    spec = parse_spec(tiny_spec_data(tmp_path, model={"init": {"name": "partial.per_head"}, "qkv_bias": True,
                                                      "tie_weights": False}), registry=reg)
    plain = build_model(spec)
    emb = plain.tok_emb.weight
    assert emb[:42].std() < 0.1 < emb[42:].std()  # the partial writes took effect in the plain build
    model, recorder = build_meta_model(spec)
    materialise(model, recorder, torch.device("cpu"))
    ref, got = plain.state_dict(), model.state_dict()
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


def test_meta_init_refuses_what_it_cannot_replay_and_needs_fsdp(tmp_path):
    import torch
    from torch import nn

    from minigpt_core import parse_spec
    from minigpt_core.base.errors import MinigptError
    from minigpt_core.train.meta_init import record_meta_build
    from training_utils import tiny_spec_data

    with pytest.raises(MinigptError, match="trunc_normal_"):
        with record_meta_build():
            nn.init.trunc_normal_(nn.Linear(4, 4).weight)
    with pytest.raises(MinigptError, match="reads another tensor"):
        with record_meta_build():
            lin = nn.Linear(4, 4)
            with torch.no_grad():
                lin.weight.copy_(torch.ones(4, 4))
    assert nn.Module.register_parameter.__qualname__ == "Module.register_parameter"  # restored
    for option in ("meta_init", "sharded_checkpoint"):
        with pytest.raises(MinigptError, match=f'{option} shards the model with FSDP2: set strategy = "fsdp"'):
            parse_spec(tiny_spec_data(tmp_path, train={option: True}))
