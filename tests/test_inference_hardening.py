"""sample / eval / export-hf / init_from: verified loads, one checkpoint rule, bad inputs, silent traps."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from minigpt_core import build_model, parse_spec
from minigpt_core.base import toml as _toml
from minigpt_core.checkpoints.checkpoint import save_model
from minigpt_core.assembly import load_model
from minigpt_core.base.errors import CheckpointError
from minigpt_core.model.generate import generate
from minigpt_core.train import train
from training_utils import MINIGPT, PATIENCE_S, ROOT, cli, tiny_spec_data

quiet = dict(progress=False, write=lambda s: None)
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run with a best and a latest checkpoint (never modified by the tests)."""
    tmp = tmp_path_factory.mktemp("inference")
    spec = parse_spec(tiny_spec_data(tmp, train={"max_steps": 12, "eval_every": 6, "save_every": 6}))
    return tmp, train(spec, **quiet)


def _copy_run(result, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(result.run_dir, dst, symlinks=True)
    return dst


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor: safetensors still parses, the weights differ
    path.write_bytes(bytes(data))


# -- every load verifies the recorded sha256 -----------------------------------------------------
def test_a_flipped_byte_stops_sample_eval_export_and_init_from(run, tmp_path, capsys):
    tmp, result = run
    run_dir = _copy_run(result, tmp_path)
    ckpt = run_dir / "checkpoints" / result.checkpoint.name
    _flip_last_byte(ckpt / "model.safetensors")
    for args in (("sample", ckpt, "--max-new-tokens", "3", "--seed", "1"), ("eval", ckpt, "--max-windows", "2"),
                 ("export-hf", ckpt, tmp_path / "hf")):
        status, _, err = cli(capsys, *args)
        assert status == 2, (args[0], err)
        assert f"{ckpt / 'model.safetensors'} is truncated or corrupt" in err and "sha256" in err, err
    assert not (tmp_path / "hf").exists()
    spec = tmp_path / "finetune.toml"
    spec.write_text(_toml.dumps(tiny_spec_data(tmp, init_from=str(ckpt), train={"out_dir": str(tmp_path / "ft")})))
    status, _, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2 and f"{ckpt / 'model.safetensors'} is truncated or corrupt" in err, err


def test_a_checkpoint_without_trainer_json_is_verified_too(tmp_path, registry):
    # import-hf writes such checkpoints (save_model alone): meta.json records the hashes.
    spec = parse_spec({"model": {"vocab_size": 64, "context_length": 16, "emb_dim": 16, "n_heads": 2,
                                 "n_layers": 1}, "tokenizer": {"name": "char"}}, registry=registry)
    save_model(build_model(spec), spec, tmp_path / "ckpt")
    assert set(json.loads((tmp_path / "ckpt" / "meta.json").read_text())["sha256"]) == \
        {"model.safetensors", "spec.toml"}
    load_model(tmp_path / "ckpt", registry)  # intact: loads
    _flip_last_byte(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_model(tmp_path / "ckpt", registry)
    save_model(build_model(spec), spec, tmp_path / "ckpt2")
    spec_file = tmp_path / "ckpt2" / "spec.toml"
    spec_file.write_text(spec_file.read_text().replace("n_layers = 1", "n_layers = 1 "))
    with pytest.raises(CheckpointError, match=r"spec\.toml is truncated or corrupt"):
        load_model(tmp_path / "ckpt2", registry)


# valid JSON, wrong shape: not an object, or a field minigpt reads with the wrong type (issue 22.9)
MALFORMED_META = ["[]", '"a string"', "3", '{"sha256": [1, 2]}', '{"sha256": {"model.safetensors": 5}}',
                  '{"tokenizer": "char"}', '{"quantization": 8}', '{"local_plugins": []}']


@pytest.mark.parametrize("meta", MALFORMED_META)
def test_a_malformed_meta_json_is_a_corrupt_checkpoint_checked_by_its_hash_first(run, tmp_path, capsys, meta):
    tmp, result = run
    ckpt = _copy_run(result, tmp_path) / "checkpoints" / result.checkpoint.name
    (ckpt / "meta.json").write_text(meta)
    for args in (("sample", ckpt, "--max-new-tokens", "3"), ("eval", ckpt, "--max-windows", "1"),
                 ("quantize", ckpt, tmp_path / "int8")):
        status, out, err = cli(capsys, *args)
        assert status == 2 and "Traceback" not in err, (args[0], err)
        # trainer.json records meta.json's sha256: the damage is found before meta.json is read
        assert f"{ckpt / 'meta.json'} is truncated or corrupt" in err and "sha256" in err, (args[0], err)
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("meta", MALFORMED_META)
def test_a_malformed_meta_json_without_trainer_json_is_a_corrupt_checkpoint(tmp_path, capsys, meta):
    # import-hf and quantize write such checkpoints: meta.json is the record itself, so its shape is checked
    spec = parse_spec({"model": {"vocab_size": 64, "context_length": 16, "emb_dim": 16, "n_heads": 2,
                                 "n_layers": 1}, "tokenizer": {"name": "char"}})
    ckpt = save_model(build_model(spec), spec, tmp_path / "ckpt")
    (ckpt / "meta.json").write_text(meta)
    status, _, err = cli(capsys, "sample", ckpt, "--max-new-tokens", "3")
    assert status == 2 and "Traceback" not in err, err
    assert f"{ckpt / 'meta.json'} is corrupt" in err and "Use another checkpoint" in err, err


# -- one rule for which checkpoint, printed everywhere ---------------------------------------------
def test_every_command_uses_the_best_checkpoint_and_says_which(run, tmp_path, capsys):
    tmp, result = run
    # A run whose best checkpoint is not its latest one.
    copy = _copy_run(result, tmp_path)
    root = copy / "checkpoints"
    (root / "best").unlink()
    (root / "best").symlink_to("step_00000006")
    line = f"checkpoint: {(root / 'best').resolve()} (best)"
    status, _, err = cli(capsys, "sample", copy, "--max-new-tokens", "2", "--seed", "1")
    assert status == 0 and line in err, err
    status, out, err = cli(capsys, "eval", copy, "--max-windows", "2", "--no-progress")
    assert status == 0 and line in out, err
    status, out, err = cli(capsys, "export-hf", copy, tmp_path / "hf")
    assert status == 0 and line in out, err  # export-hf used to take the latest
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")["transformer.wte.weight"]
    assert torch.equal(exported, load_file(root / "step_00000006" / "model.safetensors")["tok_emb.weight"])
    status, _, err = cli(capsys, "sample", result.checkpoint, "--max-new-tokens", "2")
    assert status == 0 and f"checkpoint: {result.checkpoint} (as given)" in err
    lines = []
    spec = parse_spec(tiny_spec_data(tmp, init_from=str(copy), train={"out_dir": str(tmp_path / "ft"),
                                                                     "max_steps": 1, "eval_every": 0}))
    train(spec, progress=False, write=lines.append)
    banner = f"init_from: {copy} -> {(root / 'best').resolve()} (best checkpoint of the run)"
    assert any(banner in entry.splitlines() for entry in lines), lines
    # Without a best checkpoint (e.g. no evaluation yet): the latest, and it says so.
    (root / "best").unlink()
    status, _, err = cli(capsys, "sample", copy, "--max-new-tokens", "2")
    assert status == 0 and f"checkpoint: {(root / 'latest').resolve()} (latest)" in err, err


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (("--top-p", "nan"), "top_p must be in (0, 1]"),
    (("--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--top-p", "0"), "top_p must be in (0, 1]"),
    (("--top-k", "0"), "top_k must be >= 1"),
    (("--top-k", "-3"), "top_k must be >= 1"),
    (("--temperature", "nan"), "temperature must be a finite number >= 0"),
    (("--temperature", "inf"), "temperature must be a finite number >= 0"),
    (("--temperature", "-1"), "temperature must be a finite number >= 0"),
    (("--num-samples", "1000000000"), "--num-samples must be between 1 and 1,000"),
    (("--num-samples", "0"), "--num-samples must be between 1 and 1,000"),
    (("--max-new-tokens", "1000000000"), "would run for hours"),
    (("--threads", "0"), "--threads must be >= 1"),
], ids=lambda v: "_".join(v).replace("-", "") if isinstance(v, tuple) else "")
def test_sample_refuses_out_of_range_settings(run, capsys, args, expected):
    _, result = run
    status, out, err = cli(capsys, "sample", result.checkpoint, "--max-new-tokens", "2", *args)
    assert status == 2 and expected in err and "Traceback" not in err, err
    assert out == ""


def test_generate_refuses_nan_settings_from_python_too(registry):
    from minigpt_core.model.generate import SamplingError

    model = build_model(parse_spec({"model": {"vocab_size": 64, "context_length": 16, "emb_dim": 16,
                                              "n_heads": 2, "n_layers": 1}, "tokenizer": {"name": "char"}},
                                  registry=registry))
    with pytest.raises(SamplingError, match="top_p"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=1.0, top_p=float("nan"))


@pytest.mark.parametrize("args, expected", [(("--batch-size", "0"), "--batch-size must be >= 1"),
                                            (("--max-windows", "-1"), "--max-windows must be >= 1"),
                                            (("--threads", "0"), "--threads must be >= 1")])
def test_eval_refuses_bad_sizes(run, capsys, args, expected):
    _, result = run
    status, _, err = cli(capsys, "eval", result.checkpoint, *args)
    assert status == 2 and expected in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_long_sample_is_printed_as_it_comes(run):
    """No silent hours: the first characters arrive while the rest is still being generated."""
    _, result = run
    proc = subprocess.Popen([str(MINIGPT), "sample", str(result.checkpoint), "--prompt", "The ", "--seed", "1",
                             "--max-new-tokens", "100000", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + PATIENCE_S
            while len(got) < 10 and time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(proc.stdout.fileno(), 10 - len(got))
                    if not chunk:
                        break
                    got += chunk
        assert got.startswith(b"The ") and len(got) == 10, got
        assert proc.poll() is None  # still generating
    finally:
        proc.kill()
        proc.communicate()


def test_sample_and_eval_take_threads(run, capsys):
    _, result = run
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        status, _, err = cli(capsys, "sample", result.checkpoint, "--max-new-tokens", "2", "--threads", "1")
        assert status == 0 and torch.get_num_threads() == 1, err
        torch.set_num_threads(2)
        status, _, err = cli(capsys, "eval", result.checkpoint, "--max-windows", "2", "--threads", "1")
        assert status == 0 and torch.get_num_threads() == 1, err
    finally:
        torch.set_num_threads(before)


def test_several_samples_are_seeded_and_separated(run, capsys):
    _, result = run
    args = ("sample", result.checkpoint, "--prompt", "The ", "--max-new-tokens", "5", "--num-samples", "3",
            "--seed", "4", "--no-progress")
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    samples = out.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("The ") and len(s.rstrip("\n")) == 9 for s in samples)
    assert cli(capsys, *args)[1] == out


# -- eval says what it averaged, with a progress bar ----------------------------------------------
def test_eval_says_how_many_windows_against_the_training_log(run, capsys):
    _, result = run
    status, out, err = cli(capsys, "eval", result.checkpoint)
    assert status == 0, err
    # tiny spec: eval_batches 2 x batch_size 8 = 16 windows in the log, more in the split
    m = re.search(r": ([\d,]+) windows of 32 tokens: all of the split \(the training log's val/loss: "
                  r"16 of them, eval_batches x batch_size = 2 x 8, so it differs a little\)", out)
    assert m and int(m.group(1).replace(",", "")) > 16, out
    assert "eval:" not in err  # the tqdm bar is drawn on a terminal only (tests/test_progress.py draws it)
    status, out, err = cli(capsys, "eval", result.checkpoint, "--max-windows", "3", "--no-progress")
    assert status == 0 and "3 windows of 32 tokens: 3 of its" in out and "--max-windows" in out
    assert "eval:" not in err


# -- generation past the context length -------------------------------------------------------------
def test_generation_past_the_context_says_so_once(registry):
    model = build_model(parse_spec({"model": {"vocab_size": 64, "context_length": 8, "emb_dim": 16,
                                              "n_heads": 2, "n_layers": 1}, "tokenizer": {"name": "char"}},
                                  registry=registry))
    prompt = torch.tensor([[1, 2, 3, 4]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, prompt, 4)  # 8 tokens: fits the context, no warning
        assert out.shape == (1, 8) and not caught
        out = generate(model, prompt, 12)
    assert out.shape == (1, 16)
    said = [w for w in caught if "context length (8 tokens)" in str(w.message)]
    assert len(said) == 1 and "sliding window" in str(said[0].message)
    idx = prompt  # the same as recomputing every step over the last 8 tokens
    model.eval()
    with torch.no_grad():
        for _ in range(12):
            idx = torch.cat([idx, model(idx[:, -8:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


# -- export-hf: torch.layernorm and the char tokenizer ---------------------------------------------
def test_torch_layernorm_exports_as_gpt2_layernorm(tmp_path, registry):
    transformers = pytest.importorskip("transformers")
    from minigpt_core.pretrained import export_hf

    chars = "".join(chr(32 + i) for i in range(64))
    for bias in (True, False):
        spec = parse_spec({"model": {"vocab_size": 64, "context_length": 16, "emb_dim": 16, "n_heads": 2,
                                     "n_layers": 2, "qkv_bias": True,
                                     "norm": {"name": "torch.layernorm", "params": {"bias": bias}}},
                           "tokenizer": {"name": "char"}}, registry=registry)
        model = build_model(spec).eval()
        with torch.no_grad():  # gains and biases that are not the initial ones and zeros
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        out = export_hf(model, spec, tmp_path / f"hf-{bias}",
                        tokenizer_state={"name": "char", "chars": chars})
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        idx = torch.randint(0, 64, (2, 10))
        with torch.no_grad():
            assert (hf(idx).logits - model(idx)).abs().max() <= 1e-5
    with pytest.warns(UserWarning, match="has no tokenizer files.*'char' tokenizer.*not GPT-2's"):
        export_hf(model, spec, tmp_path / "no-state")  # a char tokenizer without its vocabulary


def test_char_tokenizer_export_loads_with_transformers(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, result = run
    status, out, err = cli(capsys, "export-hf", result.checkpoint, tmp_path / "hf")
    assert status == 0 and "no tokenizer" not in err, err
    from minigpt_core.model.tokenizers import tokenizer_from_state

    ours = tokenizer_from_state(json.loads((result.checkpoint / "meta.json").read_text())["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The value of x\n  is (1, 2)."
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text


# -- the README's Python snippets run as written -----------------------------------------------------
def _python_blocks() -> list[str]:
    # The README and the reference pages it sends newcomers to first (the plugin guide has its own test).
    pages = [README, ROOT / "docs" / "training.md", ROOT / "docs" / "gpt2.md"]
    return [b for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


def _undefined_names(code: str) -> set[str]:
    import ast
    import builtins

    tree = ast.parse(code)
    defined, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
    return used - defined


def test_readme_python_snippets_define_what_they_use():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for code in blocks:
        assert not _undefined_names(code), (_undefined_names(code), code)


def test_readme_python_snippets_run(registry, monkeypatch):
    monkeypatch.chdir(ROOT)  # they name files such as experiments/tiny.toml
    heavy = ("train(", '"gpt2-124m"')  # a training run, a 124M-parameter model: checked above, not run here
    ran = 0
    for code in _python_blocks():
        if any(h in code for h in heavy):
            continue
        namespace: dict = {"__name__": "readme_snippet"}
        exec(compile(code, "README.md", "exec"), namespace)
        ran += 1
        if "minigpt_register" in namespace:  # the plugin example: register it and build a model with it
            from minigpt_core import load_registry

            own = load_registry()  # not the session's registry: the example's component stays in this test
            before = {(e.kind, e.name) for e in own.entries()}
            namespace["minigpt_register"](own)
            ((kind, name),) = {(e.kind, e.name) for e in own.entries()} - before
            spec = parse_spec({"preset": "tiny", "model": {kind: {"name": name}}}, registry=own)
            assert build_model(spec)(torch.zeros(1, 8, dtype=torch.long)).shape[:2] == (1, 8)
    assert ran >= 3
