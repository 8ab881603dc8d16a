"""The fastest exact recipe (fused kernels) against the book's, the chunked loss, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt_core import build_model, spec_from_preset
from minigpt_core.model.gpt import HeadWorkspace, chunked_head_loss
from minigpt_core.spec import BOOK_COMPONENTS, FAST_COMPONENTS, PRESETS, parse_spec
from minigpt_core.testing import check_component
from minigpt_core.train import train
from training_utils import PATIENCE_S, losses, runs_of, tiny_spec_data

SHAPE = {"vocab_size": 300, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2}
CHAR = {"name": "char"}


def _pair(**model):
    fast = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, **model}, tokenizer=CHAR))
    book = build_model(spec_from_preset("book-gpt2-124m", model={**SHAPE, **model}, tokenizer=CHAR))
    return fast, book


def test_gpt2_presets_use_fused_components_and_book_presets_the_books():
    for name in ("gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        fast, book = spec_from_preset(name).model, spec_from_preset(f"book-{name}").model
        assert {s: getattr(fast, s).name for s in FAST_COMPONENTS} == {s: t["name"] for s, t in FAST_COMPONENTS.items()}
        assert {s: getattr(book, s).name for s in BOOK_COMPONENTS} == {s: t["name"] for s, t in BOOK_COMPONENTS.items()}
        assert (fast.emb_dim, fast.n_layers) == (book.emb_dim, book.n_layers)
    assert PRESETS["tiny"].get("norm") is None  # the tutorials' tiny model keeps the book's classes


def test_fast_recipe_builds_the_same_weights_and_logits_as_the_book_recipe():
    fast, book = _pair()
    # Same parameters created in the same order: a seed gives the same weights (LayerNorm's are named
    # weight/bias instead of scale/shift).
    assert [p.shape for p in fast.parameters()] == [p.shape for p in book.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), book.parameters()))
    idx = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    fast.eval(), book.eval()
    with torch.no_grad():
        assert (fast(idx) - book(idx)).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind,name", [("norm", "torch.layernorm"), ("activation", "torch.gelu_tanh"),
                                       ("attention", "torch.sdpa")])
def test_fast_components_pass_the_equivalence_check(registry, kind, name):
    [result] = check_component(registry.get(kind, name), registry=registry, checks=["equivalence"])
    assert result.status == "pass", result.message


def test_equivalence_check_catches_a_norm_or_activation_computing_something_else(registry):
    # torch.gelu is exact GELU, not GPT-2's tanh approximation: it must not pass as gpt2 (it does not declare it).
    exact = registry.get("activation", "torch.gelu")
    assert not exact.has("gpt2")
    import dataclasses

    pretender = dataclasses.replace(exact, capabilities=frozenset({"gpt2"}))
    [result] = check_component(pretender, registry=registry, checks=["equivalence"])
    assert result.status == "fail", result.message
    rms = [e for e in registry.entries("norm") if "rms" in e.name][0]
    [result] = check_component(dataclasses.replace(rms, capabilities=frozenset({"gpt2"})), registry=registry,
                               checks=["equivalence"])
    assert result.status == "fail", result.message


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_plain_loss_and_gradients(tied):
    model = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, "tie_weights": tied, "drop_rate": 0.0},
                                         tokenizer=CHAR))
    idx = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 7, 32, 1000):  # plain; uneven chunks; one chunk per row... ; one chunk for all
        model.zero_grad(set_to_none=True)
        loss = model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=chunk)
        # an incoming gradient other than 1 (a loss scaled for accumulation or fp16): backward must apply it
        (loss * 3.7).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    plain, plain_grads = results[0]
    reference = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert abs(plain.item() - reference.item()) < 1e-6
    for loss, grads in results[1:]:
        assert abs(loss.item() - plain.item()) < 1e-5
        for n, g in grads.items():
            assert (g - plain_grads[n]).abs().max().item() < 1e-5, n


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    h = torch.randn(2, 40, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (2, 40))
    out = []
    for chunk in (0, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_head_loss(h, w, t, chunk)
        assert loss.dtype == torch.float32
        out.append((loss, *torch.autograd.grad(loss * 2, (h, w))))
    (l0, gh0, gw0), (l1, gh1, gw1) = out
    assert gh1.dtype == h.dtype and gw1.dtype == w.dtype
    assert abs(l0.item() - l1.item()) < 1e-3 * l0.item()
    assert (gh0 - gh1).abs().max() < 1e-2 * gh0.abs().max() and (gw0 - gw1).abs().max() < 1e-2 * gw0.abs().max()
    with torch.no_grad():  # evaluation: the same loss, no gradients kept
        assert abs(chunked_head_loss(h, w, t, 16).item() - chunked_head_loss(h, w, t, 0).item()) < 1e-5


def _bytes_allocated(fn) -> int:
    """Bytes the CPU allocator handed out while ``fn`` ran (torch.profiler's memory events)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_chunked_loss_allocates_no_logits_per_chunk_or_per_step():
    # A chunk of full-vocabulary logits is large (51 MB at GPT-2's vocabulary), so allocating one per
    # chunk made every chunk a fresh mmap in a new process (benchmarks/chunked_head.py). With a kept
    # workspace a whole forward + backward allocates only the two gradients it returns.
    torch.manual_seed(0)
    n, vocab, emb, chunk = 64, 5000, 16, 16
    h = torch.randn(n, emb, requires_grad=True)
    w = torch.randn(vocab, emb, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    workspace = HeadWorkspace()
    chunked_head_loss(h, w, t, chunk, workspace).backward()  # the first call sizes the workspace
    assert workspace.nbytes == vocab * chunk * 4
    gradients = (vocab * emb + n * emb) * 4
    assert _bytes_allocated(lambda: chunked_head_loss(h, w, t, chunk, workspace).backward()) < gradients + 16_384
    # without a kept workspace, one buffer for the call (not one per chunk: 4 chunks here)
    assert _bytes_allocated(lambda: chunked_head_loss(h, w, t, chunk).backward()) < gradients + workspace.nbytes + 16_384


def test_the_model_keeps_one_workspace_across_steps_outside_its_state_dict():
    model = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, "drop_rate": 0.0}, tokenizer=CHAR))
    idx = torch.randint(0, 300, (2, 33))
    model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=24).backward()
    [buffer] = model.head_workspace._buffers.values()
    model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=24).backward()
    [again] = model.head_workspace._buffers.values()
    assert again.data_ptr() == buffer.data_ptr() and buffer.numel() == 300 * 24
    assert not any("workspace" in k for k in model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a buffer per dtype: the matmul's and the fp32 softmax's
        model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=24).backward()
    assert sorted(str(d) for d, _ in model.head_workspace._buffers) == ["torch.bfloat16", "torch.float32"]


def test_forward_without_targets_still_returns_logits():
    model = _pair()[0].eval()
    idx = torch.randint(0, 300, (2, 8))
    assert model(idx).shape == (2, 8, 300)
    assert torch.allclose(model.out_head(model.hidden(idx)), model(idx))


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout():
    model = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, "drop_rate": 0.2}, tokenizer=CHAR)).train()
    idx = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks; checkpoint's recomputation must replay them
        loss = model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=16)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6)
    for n in g0:
        assert (g0[n] - g1[n]).abs().max().item() < 1e-6, n


def test_activation_checkpointing_recomputes_blocks():
    model = build_model(spec_from_preset("gpt2-124m", model=SHAPE, tokenizer=CHAR)).train()
    calls = []
    model.trf_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    idx = torch.randint(0, 300, (2, 9))
    for checkpointing, expected in ((False, 1), (True, 2)):
        calls.clear()
        model.activation_checkpointing = checkpointing
        model(idx[:, :-1], targets=idx[:, 1:]).backward()
        assert len(calls) == expected


def test_train_options_validate():
    spec = parse_spec({"train": {"loss_chunk": 0, "activation_checkpointing": "blocks"}})
    assert spec.train.loss_chunk == 0 and spec.train.activation_checkpointing == "blocks"
    assert parse_spec({}).train.loss_chunk > 0  # on by default
    from minigpt_core.base.errors import SpecError

    with pytest.raises(SpecError, match="train.activation_checkpointing"):
        parse_spec({"train": {"activation_checkpointing": "layers"}})


def test_tiny_training_with_chunked_loss_and_checkpointing_matches_plain(tmp_path, monkeypatch):
    import minigpt_core.model.gpt as model_module

    calls = {"chunked": 0, "checkpoint": 0}  # spies around the real functions: the trainer must reach them

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(model_module, "chunked_head_loss", spy("chunked", model_module.chunked_head_loss))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy("checkpoint", torch.utils.checkpoint.checkpoint))
    model = {"attention": {"name": "torch.sdpa"}, "norm": {"name": "torch.layernorm"},
             "activation": {"name": "torch.gelu_tanh"}, "drop_rate": 0.1}
    curves = []
    for label, extra in (("plain", {"loss_chunk": 0}), ("memory", {"loss_chunk": 24, "activation_checkpointing": True})):
        data = tiny_spec_data(tmp_path, model=model, train={"max_steps": 4, "eval_every": 0, "save_every": 0,
                                                             **extra})
        data["train"]["out_dir"] = str(tmp_path / label)
        train(parse_spec(data), progress=False)
        [run] = runs_of(tmp_path / label)
        curves.append(losses(run))
        if label == "plain":
            assert calls == {"chunked": 0, "checkpoint": 0}
    assert calls == {"chunked": 4, "checkpoint": 4 * 2}  # 4 steps; 2 blocks each
    assert len(curves[0]) == 4
    for step, loss in curves[0].items():
        assert curves[1][step] == pytest.approx(loss, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # FSDP2: hooks inside the checkpointed blocks, the head in the root
def test_two_gloo_ranks_with_chunked_loss_and_checkpointing_log_the_losses_of_one_process(tmp_path, capsys, strategy):
    import os
    import subprocess
    import sys

    from training_utils import ROOT, cli, write_spec

    spec = write_spec(tmp_path, model={"drop_rate": 0.0}, train={
        "max_steps": 3, "batch_size": 4, "strategy": strategy, "eval_every": 0, "save_every": 0,
        "log_every": 1, "loss_chunk": 24, "activation_checkpointing": True})
    # the one-process reference in this process (no start-up); the two ranks are processes
    status, _, err = cli(capsys, "train", spec, "--no-progress", "--set", f"train.out_dir={tmp_path / 'one'}")
    assert status == 0, err
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "minigpt", "train", str(spec),
         "--no-progress", "--set", f"train.out_dir={tmp_path / 'two'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=PATIENCE_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    (run_one,), (run_two,) = runs_of(tmp_path / "one"), runs_of(tmp_path / "two")
    a, b = losses(run_one), losses(run_two)
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_a_head_with_forward_hooks_takes_the_plain_loss():
    # Adapters such as book.lora add their output through a forward hook on out_head: the chunked
    # path reads the weight directly and would skip it, so such a head takes the plain path.
    model = build_model(spec_from_preset("gpt2-124m", model={**SHAPE, "drop_rate": 0.0}, tokenizer=CHAR))
    model.out_head.register_forward_hook(lambda module, args, out: out + 0.5 * args[0][..., :1])
    idx = torch.randint(0, 300, (2, 17))
    want = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert model(idx[:, :-1], targets=idx[:, 1:], loss_chunk=8).item() == pytest.approx(want.item(), abs=1e-6)


def test_import_hf_builds_the_fast_recipe_and_book_on_request_with_transformers_logits(tmp_path, registry):
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt_core.cli.app import main
    from minigpt_core.assembly import load_model
    from minigpt_core.pretrained import import_hf

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                    initializer_range=0.2, bos_token_id=None, eos_token_id=None)).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        want = hf(idx).logits
    fast, fast_spec = import_hf(tmp_path / "hf", registry)
    book, book_spec = import_hf(tmp_path / "hf", registry, components=BOOK_COMPONENTS)
    assert {s: getattr(fast_spec.model, s).name for s in FAST_COMPONENTS} == \
        {s: t["name"] for s, t in FAST_COMPONENTS.items()}
    assert {s: getattr(book_spec.model, s).name for s in BOOK_COMPONENTS} == \
        {s: t["name"] for s, t in BOOK_COMPONENTS.items()}
    assert book_spec.model.norm.params == fast_spec.model.norm.params == {"eps": 1e-5}  # the config's eps kept
    with torch.no_grad():
        for model in (fast.eval(), book.eval()):
            assert (model(idx) - want).abs().max().item() < 1e-4
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "book"), "--book"]) == 0
    assert load_model(tmp_path / "book")[1].model.norm.name == "book.layernorm"
