"""Inputs that used to end in a traceback, a run-away allocation or a silent kill: each is refused
with exit status 2, one `error:` paragraph, no traceback, and nothing new on disk."""

from __future__ import annotations

import importlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_plugins import make_distribution
from training_utils import MINIGPT, PATIENCE_S, cli, write_corpus, write_spec


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))  # files and directories: a failed start leaves no empty run directory either


def _shards_with_ids_beyond_vocab(tmp_path: Path) -> Path:
    """Real shards written by the char tokenizer, then one id overwritten past the vocabulary (corruption)."""
    from minigpt_core.data import write_shards
    from minigpt_core.model.tokenizers import build_tokenizer
    from minigpt_core.spec import parse_spec

    text = "hello shards\n\n" * 200
    spec = parse_spec({"tokenizer": {"name": "char"}, "model": {"vocab_size": 128}})
    tok = build_tokenizer(spec, training_text=text)
    shards = write_shards([text], tok, tmp_path / "shards", workers=1, progress=False)
    part = shards.parts[0]
    bad = np.memmap(part.filename, dtype=part.dtype, mode="r+", shape=part.shape)
    bad[5] = 1000
    bad.flush()
    return tmp_path / "shards"


@pytest.fixture
def _fifo(tmp_path):
    """A FIFO. Should a regression open it to read, a writer thread opens it too and closes at once, so the
    read ends (at EOF) instead of blocking forever; the test then fails on what the command did."""
    import threading

    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    unblock = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    unblock.start()  # blocks in open() until someone opens the FIFO to read
    yield fifo
    if unblock.is_alive():  # nobody read it (the fix): be its reader so the thread's open returns
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        unblock.join()


@pytest.fixture
def _bounded_memory():
    """A regression that reads /dev/zero whole fails with MemoryError at a few GiB instead of taking the
    machine's memory: the address space is capped for the test (restored after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + (4 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def inputs(tmp_path, monkeypatch, request, _fifo, _bounded_memory):
    """A tiny valid spec, a binary file, corrupt shards, a FIFO, a sparse 20 MiB file and an ablation file
    whose base is /dev/zero, a classification spec on five examples (too few for a validation split at
    70/10/20) and ablation files; the working directory is tmp_path."""
    from minigpt_core.tasks.classification import FIELD_LIMIT

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path)
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 4)
    shards = _shards_with_ids_beyond_vocab(tmp_path)
    (tmp_path / "five.csv").write_text("label,text\n" + "".join(f"{'ab'[i % 2]},text {i}\n" for i in range(5)))
    cls = write_spec(tmp_path, "cls.toml", task="classification", classification={"path": "five.csv"})
    argv = request.node.callspec.params.get("argv", []) if hasattr(request.node, "callspec") else []
    if any("{long_field}" in a for a in argv):  # 8 MiB: written only for the case that reads it
        (tmp_path / "long_field.csv").write_text("label,text\na,short\nb,\"" + "x" * (FIELD_LIMIT + 1) + "\"\na,c\n")
    # ablations: axis values that make one name; 1,001 cells; two variants for --variants/--seeds
    (tmp_path / "collide.toml").write_text(f'base = "{spec.name}"\n[axes]\n"description" = ["a b", "a_b"]\n')
    lrs = ", ".join(str(0.001 * (i + 1)) for i in range(11))
    (tmp_path / "many.toml").write_text(f'base = "{spec.name}"\nseeds = {list(range(91))}\n[axes]\n'
                                        f'"train.lr" = [{lrs}]\n')
    (tmp_path / "two.toml").write_text(f'base = "{spec.name}"\nseeds = [1, 2]\n[variants.a]\n[variants.b]\n'
                                       f'"train.lr" = 0.002\n')
    (tmp_path / "badstats.toml").write_text(f'base = "{spec.name}"\n[variants.a]\n[report]\n'
                                            f'correction = "sidak"\nalpha = 1.5\n')
    # [scale]: a bad table (problems listed together); sizes that clash with a variant or break the spec
    (tmp_path / "badscale.toml").write_text(f'base = "{spec.name}"\n[variants.a]\n[scale]\nbudget = "fixed"\n'
                                            f'tokens_per_param = 5\npresets = ["tiny", "huge"]\n'
                                            f'sizes = [{{name = "s", "model.emb_dim" = 16}}]\n')
    (tmp_path / "clashscale.toml").write_text(f'base = "{spec.name}"\n[variants.a]\n[variants.b]\n'
                                              f'"model.emb_dim" = 48\n[scale]\nsizes = [{{name = "s", '
                                              f'"model.emb_dim" = 16}}, {{name = "m", "model.emb_dim" = 31}}]\n')
    # [tune]: tuning seeds that are also evaluation seeds; an empty range; a param the search may not set
    for name, tune in (("tune_overlap", 'seeds = [2, 5]\ngrid = [1e-3, 3e-3]'),
                       ("tune_range", 'seeds = [9]\nlow = 1e-2\nhigh = 1e-3\ntrials = 3'),
                       ("tune_both", 'seeds = [9]\ngrid = [1e-3]\nlow = 1e-4\nhigh = 1e-2\ntrials = 3'),
                       ("tune_tpe_grid", 'seeds = [9]\nsampler = "tpe"\ngrid = [1e-3, 3e-3]'),
                       ("tune_field", 'seeds = [9]\nparam = "train.lrate"\ngrid = [1e-3, 3e-3]')):
        (tmp_path / f"{name}.toml").write_text(f'base = "{spec.name}"\nseeds = [1, 2]\n[variants.a]\n'
                                               f'[tune]\n{tune}\n')
    big = tmp_path / "big.toml"
    subprocess.run(["truncate", "-s", "20M", str(big)], check=True)  # sparse: no disk used
    ablation = tmp_path / "zero_base.toml"
    ablation.write_text('base = "/dev/zero"\nseeds = [1]\n\n[axes]\n"train.lr" = [1e-3, 2e-3]\n')
    return {"spec": str(spec), "shards": str(shards), "fifo": str(_fifo), "big": str(big),
            "ablation": str(ablation), "cls": str(cls), "long_field": "long_field.csv"}


# (command and arguments with placeholders for the files of `inputs`, a phrase the message must contain)
BAD_INPUTS = [
    (["train", "{spec}", "--set", "model.n_layers=100000", "--set", "model.emb_dim=768"], "too large"),
    (["train", "{spec}", "--set", "model.emb_dim=10000000"], "too large"),
    (["train", "{spec}", "--set", "model.vocab_size=10000000000000"], "too large"),
    (["sample", "{spec}"], ""),  # not a checkpoint
    (["validate", "binary.toml"], "not a text file"),
    (["validate", "{spec}", "--set", "seed=-1"], "seed"),
    (["validate", "{spec}", "--set", "seed=18446744073709551617"], "seed"),
    (["train", "{spec}", "--set", "seed=18446744073709551617"], "seed"),
    (["validate", "{spec}", "--set", "data.source.params.encoding=no-such-codec"], "unknown text encoding"),
    (["validate", "{spec}", "--set", "data.max_length=64"], "data.max_length"),
    (["train", "{spec}", "--set", "data.source.name=shards", "--set", "data.source.params={{path='{shards}'}}"],
     "hold id 1000"),
    (["validate", "{spec}", "--set", "model.n_layer=3"], "did you mean 'model.n_layers'"),
    # the bpe tokenizer: more ids than the model embeds; fewer than the 256 bytes and <|endoftext|>
    (["train", "{spec}", "--set", "tokenizer.name=bpe"], "set model.vocab_size to at least 4096"),
    (["validate", "{spec}", "--set", "tokenizer.name=bpe", "--set", "tokenizer.params.vocab_size=100"],
     "greater than or equal to 258"),
    (["check", "--device", "nonsense"], "not a device"),
    (["train", "{spec}", "--set", "name=../escape"], "name"),
    (["train", "{spec}", "--set", "name=/tmp/abs"], "name"),
    (["train", "{spec}", "--set", "train.lr=nan"], "train.lr"),
    (["eval", "{spec}", "--batch-size", "0"], "--batch-size"),
    (["sample", "{spec}", "--num-samples", "1000000000"], "--num-samples"),
    (["sample", "{spec}", "--max-new-tokens", "1000000000"], "--max-new-tokens"),
    (["sample", "{spec}", "--top-p", "nan"], "top_p"),
    (["sample", "{spec}", "--top-k", "0"], "top_k"),
    (["sample", "{spec}", "--temperature", "nan"], "temperature"),
    # classification data: a field past the CSV field limit; splits with no validation / training examples
    (["train", "{cls}", "--set", "classification.path={long_field}"], "long_field.csv, line 3: cannot be read"),
    (["train", "{cls}"], "leaves 3 training / 0 validation / 2 test examples: no validation examples"),
    (["train", "{cls}", "--set", "classification.split=[0.1, 0.8, 0.1]"], "no training examples"),
    (["ablate", "collide.toml", "--dry-run"], 'description = "a b"'),
    (["ablate", "many.toml", "--max-cells", "1000", "--dry-run"], "--max-cells 1001"),
    (["ablate", "two.toml", "--variants", "a,c"], "the variants of two.toml are: a, b"),
    (["ablate", "two.toml", "--seeds", "3"], "its seeds are: 1, 2"),
    (["ablate", "two.toml", "--max-cells", "0"], "--max-cells"),
    (["ablate", "badstats.toml", "--dry-run"], "report.correction: Input should be 'holm', 'bonferroni' or 'none'; "
     "report.alpha"),
    (["ablate", "badscale.toml", "--dry-run"], "give either sizes"),
    (["ablate", "clashscale.toml", "--dry-run"], "model.emb_dim: is set by [scale] sizes"),
    (["ablate", "clashscale.toml", "--dry-run"], "variant 'm/a'"),  # and, in the same message, a size's spec
    (["ablate", "tune_overlap.toml"], "[tune] seeds [2] are also evaluation seeds"),
    (["ablate", "tune_range.toml", "--dry-run"], "needs 0 < low < high, got low = 0.01, high = 0.001"),
    (["ablate", "tune_both.toml", "--dry-run"], "either grid = [...] or low, high and trials"),
    (["ablate", "tune_tpe_grid.toml", "--dry-run"], "sampler = \"tpe\" searches a range"),
    (["ablate", "tune_field.toml"], "tuning runs of variant 'a' (train.lrate = 0.001)"),
    # Files read whole: a device, a FIFO or an over-size file is named for what it is, never read (issue 22.4)
    (["validate", "/dev/zero"], "experiment file /dev/zero is a character device"),
    (["validate", "{fifo}"], "is a FIFO"),
    (["validate", "{big}"], "is 20.0 MiB"),
    (["ablate", "{ablation}", "--dry-run"], "/dev/zero is a character device"),
    (["ablate", "{big}", "--dry-run"], "over the limit"),
    (["validate", "{spec}", "--plugin", "/dev/zero"], "plugin file /dev/zero is a character device"),
    (["train", "{spec}", "--set", "task=classification", "--set", "classification.path=/dev/zero", "--set",
      "classification.format=tsv"], "classification data file /dev/zero is a character device"),
    (["train", "{spec}", "--set", "task=instruction", "--set", "instruction.path=/dev/zero"],
     "instruction data file /dev/zero is a character device"),
]


@pytest.mark.parametrize("argv,phrase", BAD_INPUTS, ids=[" ".join(a[:1] + a[2:4]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_paragraph_exit_2_and_writes_nothing(inputs, tmp_path, capsys, argv, phrase):
    args = [a.format(**inputs) for a in argv] + (["--no-progress"] if argv[0] == "train" else [])
    before = _files(tmp_path)
    status, out, err = cli(capsys, *args)
    assert status == 2, (out, err)
    assert "Traceback" not in err + out
    assert err.startswith("error: ") and err.count("error:") == 1 and "\n\n" not in err.strip(), err
    assert phrase in err
    assert _files(tmp_path) == before  # no run files, checkpoints, logs or token caches


def test_memory_refusal_names_parameters_and_memory_before_allocating(inputs, capsys):
    import resource

    status, _, err = cli(capsys, "train", inputs["spec"], "--no-progress", "--set", "model.n_layers=100000",
                         "--set", "model.emb_dim=768")
    assert status == 2
    assert "parameters" in err and "GiB" in err and "available" in err
    # Nothing near the terabytes that model needs was ever allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 2**20  # KiB: under 8 GiB


def test_empty_experiment_file_says_it_is_the_default_124m_experiment(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    status, out, err = cli(capsys, "validate", empty)
    assert status == 0
    assert "12 layers, emb 768" in out
    assert "sets nothing" in err and "gpt2-124m" in err


def test_check_on_a_missing_cuda_device_is_one_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, out, err = cli(capsys, "check", "--device", "cuda")
    assert status == 2
    assert "fail" not in out.lower() and err.startswith("error: ") and "CUDA" in err and "--device cpu" in err


# -- plugins -------------------------------------------------------------------------------------
EXITING = "import sys\nsys.exit('this plugin quits')\n"
RAISING_FACTORY = '''
from minigpt_core import hookimpl

def _factory(ctx, params):
    raise RuntimeError("factory exploded")

@hookimpl
def minigpt_register(registry):
    registry.add("norm", "boom.norm", _factory, description="a norm whose factory raises")
'''


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    from minigpt_core.base.loader import reset_registry

    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "exiting-plugin", "0.1", "exiting_plugin", EXITING, "exiting")
    make_distribution(site, "boom-plugin", "0.2", "boom_plugin", RAISING_FACTORY, "boom")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    reset_registry()
    yield site
    reset_registry()


def test_plugin_calling_sys_exit_at_import_is_a_failed_plugin_not_a_silent_exit(bad_plugins, tmp_path, capsys):
    spec = write_spec(tmp_path)
    status, out, err = cli(capsys, "validate", spec)
    assert status == 0 and "OK" in out
    assert "'exiting'" in err and "exiting-plugin 0.1" in err and "this plugin quits" in err


def test_component_factory_raising_names_component_kind_and_plugin(bad_plugins, tmp_path, capsys):
    spec = write_spec(tmp_path, model={"vocab_size": 128, "context_length": 32, "emb_dim": 32, "n_heads": 2,
                                       "n_layers": 2, "norm": {"name": "boom.norm"}})
    status, out, err = cli(capsys, "summary", spec)
    assert status == 2 and "Traceback" not in err
    assert "norm component 'boom.norm'" in err and "boom" in err and "boom-plugin 0.2" in err
    assert "RuntimeError: factory exploded" in err


@pytest.fixture
def _sigint_restored():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)  # the CLI ignores Ctrl-C once it has reported one


# A plugin that raises KeyboardInterrupt itself (no Ctrl-C was pressed), at import or in its hook (issue 22.11)
KI_AT_IMPORT = "raise KeyboardInterrupt\n"
KI_IN_HOOK = """
from minigpt_core import hookimpl

@hookimpl
def minigpt_register(registry):
    raise KeyboardInterrupt
"""


def test_installed_plugins_raising_keyboard_interrupt_are_named_failures_not_an_interrupt(tmp_path, monkeypatch,
                                                                                          capsys, _sigint_restored):
    from minigpt_core.base.loader import reset_registry

    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "ki-import", "0.1", "ki_import", KI_AT_IMPORT, "kiimport")
    make_distribution(site, "ki-hook", "0.2", "ki_hook", KI_IN_HOOK, "kihook")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    reset_registry()
    try:
        status, out, err = cli(capsys, "validate", write_spec(tmp_path))
    finally:
        reset_registry()
    assert status == 0 and "OK" in out and "interrupted" not in err, err
    assert "'kiimport' from distribution ki-import 0.1 failed to import" in err
    assert "'kihook' from distribution ki-hook 0.2 raised in its minigpt_register hook" in err
    assert err.count("KeyboardInterrupt (raised by the plugin's own code") == 2, err


@pytest.mark.parametrize("source,stage", [(KI_AT_IMPORT, "failed to import (line 1)"),
                                          (KI_IN_HOOK, "raised in its minigpt_register hook")], ids=["import", "hook"])
def test_a_plugin_file_raising_keyboard_interrupt_is_one_error_naming_it(tmp_path, capsys, source, stage,
                                                                          _sigint_restored):
    plugin = tmp_path / "ki_plugin.py"
    plugin.write_text(source)
    status, _, err = cli(capsys, "validate", write_spec(tmp_path), "--plugin", plugin)
    assert status == 2 and "Traceback" not in err and "interrupted" not in err, err
    assert err.startswith(f"error: The plugin file {plugin} (named by --plugin) {stage}"), err
    assert "KeyboardInterrupt" in err


@pytest.mark.parametrize("swallowed", [False, True])
def test_a_real_ctrl_c_while_a_plugin_loads_still_interrupts(tmp_path, capsys, swallowed, _sigint_restored):
    # The signal itself, sent from inside the plugin's import; a plugin that catches the KeyboardInterrupt
    # does not keep the command running.
    plugin = tmp_path / "slow_plugin.py"
    send = "import signal\nsignal.raise_signal(signal.SIGINT)\n"
    plugin.write_text(f"try:\n    {send.replace(chr(10), chr(10) + '    ').rstrip()}\nexcept KeyboardInterrupt:\n"
                      f"    pass\n" if swallowed else send)
    status, _, err = cli(capsys, "validate", write_spec(tmp_path), "--plugin", plugin)
    assert status == 130 and err.strip() == "interrupted", err


# -- the process: pipes and Ctrl-C ---------------------------------------------------------------
def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # `minigpt schema` builds the whole JSON schema: seconds on a loaded machine
def test_schema_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen([str(MINIGPT), "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    proc.wait(timeout=PATIENCE_S)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""


# Delays after the CLI says its Ctrl-C handler is in place: all well inside start-up (importing torch
# and the plugins takes seconds here, and only longer on a loaded machine), from its first instant on.
@pytest.mark.parametrize("presses,delay", [(1, 0.0), (1, 0.05), (2, 0.05), (1, 0.3), (1, 0.6)])
def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path, presses, delay):
    # Whenever it lands while torch and the plugins load (even inside numpy's C import, which a
    # KeyboardInterrupt leaves half-loaded), the run must stop: never swallowed, never a traceback.
    # Before our handler is installed, Ctrl-C is the interpreter's business: the CLI's test hook
    # (MINIGPT_TEST_READY_FD) says when it is ours, and the signal is never sent before that.
    spec = write_spec(tmp_path)
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen([str(MINIGPT), "train", str(spec), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "MINIGPT_TEST_READY_FD": str(ready_w)},
                            cwd=tmp_path, pass_fds=(ready_w,))
    os.close(ready_w)  # the child holds the only write end: its exit ends the read below
    try:
        with os.fdopen(ready_r, "rb") as ready:
            readable, _, _ = select.select([ready], [], [], PATIENCE_S)
            line = ready.readline() if readable else b""
        assert line == b"ready\n", "the CLI never said that its Ctrl-C handler was installed"
        time.sleep(delay)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "interrupted" and err.count("interrupted") == 1, err
    assert "interrupted at step" not in out  # it landed in start-up, not in the training loop


def test_default_124m_shape_at_a_huge_micro_batch_warns_about_activations():
    """The empty file's 124M shape fits as weights + AdamW (2.6 GB); its activations are what overflow."""
    from minigpt_core.model.memory import training_memory_warning
    from minigpt_core.spec import parse_spec

    model = parse_spec({}).model
    warning = training_memory_warning(model, 163_037_184, 4096, 1024, "cpu")  # ~10 TB of activations
    assert warning is not None and "activations" in warning and "train.micro_batch_size" in warning
    tiny = parse_spec({"tokenizer": {"name": "char"}, "model": {"vocab_size": 128, "context_length": 32,
                                                                 "emb_dim": 32, "n_heads": 2, "n_layers": 2}}).model
    assert training_memory_warning(tiny, 30_000, 8, 32, "cpu") is None


# -- an ablation's manifest.json: checked, not trusted ---------------------------------------------
def _other_run(tmp: Path) -> str:
    """A run directory of another ablation, which a hand-edited manifest must never make us resume."""
    run = tmp / "runs" / "other" / "only" / "seed-1" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    return str(run)


def _symlinked_run(tmp: Path) -> str:
    link = tmp / "runs" / "abl" / "only" / "seed-1" / "20260101-000000"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(_other_run(tmp), target_is_directory=True)
    return str(link)


def _set(path: str, value):
    """A change to the manifest (in place): ``path`` like "cells.0.status"; ``value`` a function of
    tmp_path, or _DROP to delete the field."""
    def change(manifest: dict, tmp: Path) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = manifest
        for p in parents:
            node = node[p]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value(tmp) if callable(value) else value
    return change


_DROP = object()

# (id, a change to a valid manifest (or what replaces it), a phrase the message must contain)
BAD_MANIFESTS = [
    ("cells not a list", _set("cells", {"only/seed-1": {}}), "cells: must be a list"),
    ("cells of numbers", _set("cells", [1, 2]), "cells[0]: must be an object"),
    ("cell without status", _set("cells.0.status", _DROP), "cells[0].status: missing"),
    ("unknown status", _set("cells.0.status", "exploded"), "cells[0].status: must be one of"),
    ("no ablation", _set("ablation", _DROP), "ablation: missing"),
    ("variants a string", _set("variants", "only"), "variants: must be a table"),
    ("seed a string", _set("cells.0.seed", "1"), "cells[0].seed"),
    ("run_dir a number", _set("cells.0.run_dir", 7), "cells[0].run_dir"),
    ("id of another cell", _set("cells.0.id", "other/seed-1"), "cells[0]: id 'other/seed-1'"),
    ("variant a path", _set("cells.0.variant", ".."), "cells[0].variant"),
    ("description a number", _set("settings.description", 3), "settings.description"),
    ("steps a float", _set("cells.0.steps", 2.5), "cells[0].steps"),
    ("manifest a list", lambda m, tmp: [], "is not an ablation manifest"),
    ("run_dir in another ablation", _set("cells.0.run_dir", _other_run), "not inside the cell's own directory"),
    ("run_dir with ..", _set("cells.0.run_dir",
                             lambda tmp: str(tmp / "runs" / "abl" / "only" / "seed-1" / ".." / ".." / ".." / "other"
                                             / "only" / "seed-1" / Path(_other_run(tmp)).name)),
     "not inside the cell's own directory"),
    ("run_dir a symlink out", _set("cells.0.run_dir", _symlinked_run), "not inside the cell's own directory"),
]


@pytest.mark.parametrize("command", ["ablate", "report"])
@pytest.mark.parametrize("change,phrase", [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_is_one_error_paragraph_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, command,
                                                                       change, phrase):
    import json

    from ablation_utils import write_ablation
    from minigpt_core.ablation import load_plan
    from minigpt_core.ablation.runner import reconcile, write_manifest

    monkeypatch.chdir(tmp_path)
    path = write_ablation(tmp_path, 'name = "abl"\nbase = "base.toml"\nseeds = [1]\n[variants.only]\n', max_steps=2)
    plan = load_plan(path, probe=False)
    manifest = reconcile(plan, None, force=False)
    manifest["cells"][0].update(status="running", attempts=1)  # a cell the next ablate would resume
    replaced = change(manifest, tmp_path)
    write_manifest(plan.root, manifest if replaced is None else replaced)
    before = _files(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in before if p.is_file()}
    status, out, err = cli(capsys, *(["ablate", path] if command == "ablate" else ["report", plan.root, "--no-wandb"]))
    assert status == 2, (out, err)
    assert "Traceback" not in err + out
    assert err.startswith("error: ") and err.count("error:") == 1 and "\n\n" not in err.strip(), err
    assert phrase in err and "manifest.json" in err, err
    assert _files(tmp_path) == before  # no lock, report, cell files or runs
    assert {p: p.stat().st_mtime_ns for p in before if p.is_file()} == stamp  # the other run is not appended to
    assert json.loads((plan.root / "manifest.json").read_text()) is not None
