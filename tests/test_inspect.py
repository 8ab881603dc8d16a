"""Seeing inside a model: attention weights (the Python API and `minigpt attention`), per-token loss
(`minigpt eval --per-token`, `--compare`) and attention maps during training (train.log_attention_every)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt_core import build_model, get_registry, parse_spec
from minigpt_core.inspection import AttentionWeightsUnavailable, attention_weights, capture_attention
from training_utils import cli, corpus_text, tiny_spec_data

URL = re.compile(r"https?://", re.IGNORECASE)


# -- attention weights against an explicit softmax(QK^T / sqrt(d)) of the module's own weights ---------
def _model(name: str, **params):
    entry = get_registry().get("attention", name)
    model = {"vocab_size": 64, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
             "attention": {"name": name, "params": params}}
    if entry.has("positions"):
        model["positional"] = {"name": "modern.none"}
    return build_model(parse_spec({"seed": 3, "model": model, "tokenizer": {"name": "char"}}))


def _reference(att, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + causal mask) from the attention module's own projections: (B, H, T, T)."""
    b, t, _ = x.shape
    if hasattr(att, "heads"):  # book.multihead_wrapper: one single-head CausalAttention per head
        return torch.cat([_reference(h, x, 1) for h in att.heads], dim=1)
    if hasattr(att, "canonical_state"):  # fused projections (torch.fused_qkv, torch.mha)
        st = att.canonical_state()
        q = F.linear(x, st["W_query.weight"], st.get("W_query.bias"))
        k = F.linear(x, st["W_key.weight"], st.get("W_key.bias"))
    else:
        q, k = att.W_query(x), att.W_key(x)
    d = q.shape[-1] // n_heads
    q = q.view(b, t, n_heads, d).transpose(1, 2)
    k = k.view(b, t, -1, d).transpose(1, 2)  # grouped-query: fewer key heads
    if getattr(att, "q_norm", None) is not None:
        q, k = att.q_norm(q), att.k_norm(k)
    if getattr(att, "rotary", None) is not None:
        q, k = att.rotary(q, 0), att.rotary(k, 0)
    k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    if getattr(att, "alibi_slopes", None) is not None:
        scores = scores - att.alibi_slopes[None, :, None, None] * dist
    hidden = dist < 0
    if getattr(att, "window", None) is not None:
        hidden = hidden | (dist >= att.window)
    return torch.softmax(scores.masked_fill(hidden, -torch.inf), dim=-1)


WEIGHT_ATTENTIONS = [(e.name, {}) for e in get_registry().entries("attention") if e.has("attn_weights")]
VARIANTS = [("modern.gqa", {"qk_norm": True}), ("modern.sliding_window", {"window": 4}),
            ("modern.rope", {"fraction": 0.5})]


@pytest.mark.parametrize("name,params", WEIGHT_ATTENTIONS + VARIANTS, ids=lambda v: str(v) if v else "")
def test_weights_are_the_models_own_softmax(name, params):
    model = _model(name, **params)
    model.train()  # attention_weights evaluates without dropout and gives the mode back
    idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    inputs = []
    handles = [b.att.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.trf_blocks]
    weights = attention_weights(model, idx)
    for h in handles:
        h.remove()
    assert model.training
    assert len(weights) == len(model.trf_blocks) == len(inputs)
    for w, block, x in zip(weights, model.trf_blocks, inputs):
        assert w.shape == (2, w.shape[1], 11, 11) and w.shape[1] in (1, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        assert torch.all(w.triu(1) == 0)
        torch.testing.assert_close(w, _reference(block.att, x, w.shape[1]), atol=2e-6, rtol=1e-5)


def test_capture_leaves_the_forward_pass_unchanged():
    model = _model("book.multihead").eval()
    idx = torch.randint(0, 64, (1, 9))
    plain = model(idx)
    with capture_attention(model) as captured:
        captured_logits = model(idx)
    assert all(w is not None and w.shape == (1, 4, 9, 9) for w in captured)
    torch.testing.assert_close(captured_logits, plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind


NO_WEIGHTS_PLUGIN = '''
from minigpt_core.plugin import SDPAttention, hookimpl


@hookimpl
def minigpt_register(registry):
    registry.add("attention", "local.noweights", lambda ctx, p: SDPAttention(ctx.emb_dim, ctx.n_heads),
                 description="fused attention that returns no weights", capabilities={"causal"})
'''


def test_an_attention_without_attn_weights_names_the_ones_that_have_it(tmp_path, isolated_plugins):
    from minigpt_core.spec import spec_warnings

    plugin = tmp_path / "noweights.py"
    plugin.write_text(NO_WEIGHTS_PLUGIN, encoding="utf-8")
    data = tiny_spec_data(tmp_path, model={"attention": {"name": "local.noweights"}},
                          train={"log_attention_every": 5})
    data["plugins"] = [str(plugin)]
    spec = parse_spec(data)
    with pytest.raises(AttentionWeightsUnavailable, match="'local.noweights' does not declare the attn_weights") as exc:
        attention_weights(build_model(spec), torch.zeros(1, 4, dtype=torch.long))
    assert "book.multihead" in str(exc.value) and "torch.sdpa" in str(exc.value)
    assert any("log_attention_every" in w and "book.multihead" in w for w in spec_warnings(spec))


# -- the commands, on a test-sized trained run ---------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny char model trained 4 steps, checkpoints at steps 2 and 4; and a text file of its kind of prose."""
    from minigpt_core.train import train

    tmp = tmp_path_factory.mktemp("inspect")
    spec = parse_spec(tiny_spec_data(tmp, train={"max_steps": 4, "save_every": 2, "eval_every": 0, "lr": 1e-2,
                                                 "keep_best": False}))
    result = train(spec, progress=False, write=lambda s: None)
    ckpts = sorted((result.run_dir / "checkpoints").glob("step_*"))
    text = tmp / "held_out.txt"
    text.write_text(corpus_text(45_000)[40_000:40_400], encoding="utf-8")
    return result.run_dir, ckpts, text


def _page_data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="minigpt-data">(.*?)</script>', html, re.S)[1])


def test_attention_command_writes_readable_pngs_and_an_offline_page(run, tmp_path, capsys):
    import matplotlib.image as mpimg

    from minigpt_core.checkpoints.checkpoint import read_meta
    from minigpt_core.assembly import load_model
    from minigpt_core.model.tokenizers import tokenizer_from_state

    run_dir, ckpts, _ = run
    text = "The object is created"
    status, out, err = cli(capsys, "attention", run_dir, "--text", text, "--average-heads", "--out", tmp_path / "a")
    assert status == 0, err
    pngs = sorted((tmp_path / "a").glob("layer-*.png"))
    assert [p.name for p in pngs] == ["layer-0.png", "layer-1.png"] and f"wrote {pngs[0]}" in out
    for p in pngs:
        img = mpimg.imread(p)
        assert img.shape[0] > 400 and img.shape[1] > 400  # 2 heads + their mean, 21 labelled tokens
        assert img[..., :3].std() > 0.1  # not blank
    page = (tmp_path / "a" / "attention.html").read_text(encoding="utf-8")
    assert not URL.search(page), "the page must load nothing from the network"
    data = _page_data(page)
    # The page holds the model's own weights.
    model, _ = load_model(ckpts[-1])
    tok = tokenizer_from_state(read_meta(ckpts[-1])["tokenizer"])
    ids = tok.encode(text)
    assert data["T"] == 21 and data["tokens"] == [tok.decode([i]) for i in ids] and data["layers"] == [0, 1]
    weights = attention_weights(model, torch.tensor([ids]))
    for layer, b64 in enumerate(data["w"]):
        stored = np.frombuffer(base64.b64decode(b64), dtype="<u2").reshape(2, 21, 21) / 65535
        np.testing.assert_allclose(stored, weights[layer][0].numpy(), atol=1 / 65535)


def test_attention_command_selects_layer_head_and_window(run, tmp_path, capsys):
    run_dir, _, _ = run
    status, out, err = cli(capsys, "attention", run_dir, "--text", "The object is created", "--layer", "-1",
                           "--head", "1", "--start", "4", "--max-tokens", "8", "--out", tmp_path)
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.html", "layer-1.png"]
    assert "window: tokens 4 to 11 of 21" in out
    data = _page_data((tmp_path / "attention.html").read_text(encoding="utf-8"))
    assert data["layers"] == [1] and data["T"] == 8 and "".join(data["tokens"]) == "object i"
    for args, message in [(("--layer", "2"), "--layer 2 does not exist: the model has 2 layers"),
                          (("--head", "-3"), "--head -3 does not exist"),
                          (("--max-tokens", "33"), "between 1 and the model's context length 32"),
                          (("--start", "99"), "--start 99 is outside the text's 21 tokens")]:
        status, _, err = cli(capsys, "attention", run_dir, "--text", "The object is created", *args,
                             "--out", tmp_path / "x")
        assert status == 2 and message in err and "Traceback" not in err, (args, err)


def test_attention_and_per_token_write_into_the_run_by_default_and_say_where(run, tmp_path, capsys, monkeypatch):
    """Not ./attention and ./per-token (untracked folders in a checkout): RUN/attention/, RUN/per-token/;
    a checkpoint outside any run: its own directory. --out still wins (the other tests)."""
    from minigpt_core.assembly import load_model
    from minigpt_core.checkpoints.checkpoint import read_meta, save_model

    run_dir, (_, step4), _ = run
    monkeypatch.chdir(tmp_path)
    status, out, err = cli(capsys, "attention", run_dir, "--text", "The object is")
    assert status == 0, err
    assert f"writing to {run_dir / 'attention'}/ (in the checkpoint's run" in out, out
    assert sorted(p.name for p in (run_dir / "attention").iterdir()) == ["attention.html", "layer-0.png",
                                                                         "layer-1.png"]
    status, out, err = cli(capsys, "eval", step4, "--per-token", "--max-windows", "2", "--no-progress")
    assert status == 0, err
    assert f"writing to {run_dir / 'per-token'}/ (in the checkpoint's run" in out, out
    assert sorted(p.name for p in (run_dir / "per-token").iterdir()) == ["per-token.html", "per-token.jsonl",
                                                                         "per-token.png"]
    model, spec = load_model(step4)
    alone = save_model(model, spec, tmp_path / "elsewhere" / "ckpt", meta={"tokenizer": read_meta(step4)["tokenizer"]})
    status, out, err = cli(capsys, "attention", alone, "--text", "The object is")
    assert status == 0, err
    assert f"writing to {alone / 'attention'}/ (in the checkpoint's directory" in out
    assert (alone / "attention" / "layer-0.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # nothing in the current directory


def _direct_losses(ckpt: Path, stream: list[int], n_windows: int, per: int) -> np.ndarray:
    from minigpt_core.assembly import load_model

    model, _ = load_model(ckpt)
    model.eval()
    rows = torch.tensor([stream[w * per:w * per + per + 1] for w in range(n_windows)])
    with torch.no_grad():
        logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(n_windows, per).numpy()


def test_eval_per_token_matches_cross_entropy_and_compare_gives_the_difference(run, tmp_path, capsys):
    from minigpt_core.checkpoints.checkpoint import read_meta
    from minigpt_core.model.tokenizers import tokenizer_from_state

    _, (step2, step4), text_file = run
    status, out, err = cli(capsys, "eval", step4, "--data", text_file, "--per-token", "--out", tmp_path / "one",
                           "--no-progress")
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "one" / "per-token.jsonl").read_text().splitlines()]
    per = 32
    n_windows = len(records) // per
    assert n_windows >= 10 and len(records) == n_windows * per
    assert [r["position"] for r in records[:per]] == list(range(per)) and records[-1]["window"] == n_windows - 1
    tok = tokenizer_from_state(read_meta(step4)["tokenizer"])
    text = text_file.read_text(encoding="utf-8")
    stream = tok.encode(text + "\n\n")  # windows tile the file's tokens (the separator follows a document)
    assert [r["token_id"] for r in records] == stream[1:1 + len(records)]
    assert [r["offset"] for r in records] == list(range(1, 1 + len(records)))
    assert "".join(r["token"] for r in records) == tok.decode(stream[1:1 + len(records)])
    direct = _direct_losses(step4, stream, n_windows, per)
    np.testing.assert_allclose([r["loss"] for r in records], direct.ravel(), atol=1e-5, rtol=1e-5)
    mean = float(direct.astype(np.float64).mean())
    assert f"loss {mean:.4f} nats/token" in out
    worst = max(records, key=lambda r: r["loss"])
    assert "highest-loss tokens (nats):" in out and f"{worst['loss']:8.3f}  {json.dumps(worst['token'])}" in out
    import matplotlib.image as mpimg

    picture = mpimg.imread(tmp_path / "one" / "per-token.png")
    assert picture.shape[1] > 500 and picture[..., :3].std() > 0.05
    page = (tmp_path / "one" / "per-token.html").read_text(encoding="utf-8")
    assert not URL.search(page)
    data = _page_data(page)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(data["loss"]), dtype="<f4"), direct.ravel())

    status, out, err = cli(capsys, "eval", step4, "--data", text_file, "--compare", step2, "--out", tmp_path / "two",
                           "--no-progress")
    assert status == 0, err
    both = [json.loads(line) for line in (tmp_path / "two" / "per-token.jsonl").read_text().splitlines()]
    earlier = _direct_losses(step2, stream, n_windows, per).ravel()
    np.testing.assert_allclose([r["loss"] for r in both], direct.ravel(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose([r["other_loss"] for r in both], earlier, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose([r["delta"] for r in both], direct.ravel() - earlier, atol=2e-5)
    run = step4.resolve().parent.parent.name  # both sides are named by experiment, run and step
    assert f"harder for tiny-test/{run}/step_00000004 than for tiny-test/{run}/step_00000002" in out
    assert "easier for" in out
    data = _page_data((tmp_path / "two" / "per-token.html").read_text(encoding="utf-8"))
    assert data["names"] == [f"tiny-test/{run}/step_00000004", f"tiny-test/{run}/step_00000002"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(data["other"]), dtype="<f4"), earlier)


# -- during training ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_log_attention_every_writes_maps_into_the_run_and_wandb(tmp_path):
    import matplotlib.image as mpimg

    from minigpt_core.train import train
    from test_wandb import history

    spec = parse_spec(tiny_spec_data(tmp_path, train={"max_steps": 4, "eval_every": 0, "save_every": 0,
                                                      "log_attention_every": 2, "attention_prompt": "The class"},
                                     wandb={"mode": "offline", "project": "minigpt-tests"}))
    result = train(spec, progress=False, write=lambda s: None)
    for step in (2, 4):
        pngs = sorted((result.run_dir / "attention" / f"step-{step}").glob("*.png"))
        assert [p.name for p in pngs] == ["layer-0.png", "layer-1.png"]
        assert mpimg.imread(pngs[0])[..., :3].std() > 0.1
    (run_file,) = result.wandb_dir.glob("run-*.wandb")
    images = {r["_step"]: r for r in history(run_file) if r.get("attention/layer-0/_type") == "image-file"}
    assert sorted(images) == [2, 4]
    assert (result.wandb_dir / "files" / images[4]["attention/layer-1/path"]).is_file()


def test_compare_refuses_checkpoints_with_different_tokenizers(run, tmp_path, capsys):
    from minigpt_core.checkpoints.checkpoint import read_meta, save_model
    from minigpt_core.assembly import load_model

    _, (step2, step4), text_file = run
    model, spec = load_model(step2)
    state = read_meta(step2)["tokenizer"]
    other = save_model(model, spec, tmp_path / "other", meta={"tokenizer": {**state, "chars": state["chars"][::-1]}})
    status, _, err = cli(capsys, "eval", step4, "--data", text_file, "--compare", other, "--out", tmp_path / "o",
                         "--no-progress")
    assert status == 2 and "use different tokenizers" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
