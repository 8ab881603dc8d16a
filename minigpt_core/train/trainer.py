"""The training loop: from a spec to a trained, checkpointed, logged model.

One code path for one process and for torchrun: every process builds the same model from the
same seed, reads its share of each global batch (rank-sharded sampler), and only rank 0 logs
and writes files. A global batch of ``train.batch_size`` sequences is split into
``micro_batch_size`` pieces per process; gradients of the pieces are accumulated (without the
all-reduce until the last one) and the loss is their mean, so the same spec gives the same
optimisation with 1, 2 or N processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..base.contracts import ActivationCheckpointingProtocol
from ..base.version import __version__
from ..base.disk import NO_SPACE, DiskFullError, disk_full_error, reporting_full_disk
from ..checkpoints.checkpoint import atomic_write_bytes, load_model_state, plugin_versions
from ..data import BatchSampler, load_training_data
from ..base.errors import CheckpointError, MinigptError, SpecError
from ..model.generate import generate
from ..base.registry import ComponentRegistry
from ..spec import ExperimentSpec, dump_spec, parse_spec
from ..model.summary import summarize
from ..base.device import autocast, make_grad_scaler, select_device, set_deterministic
from ..base.distributed import DistEnv, gradient_sync, init_distributed, shutdown, wrap_model
from .compile import compiled_graphs
from .evaluate import eval_windows, evaluate, lm_loss
from .flops import PRECISION_DTYPES, measure_matmul_peak, mfu
from .loggers import METRICS_FILE, ConsoleLogger, JsonlLogger, Logger, MultiLogger, WandbLogger, wandb_mode
from .optim import build_optimizer, lr_at
from .lock import RunLock
from ..checkpoints.state import (
    CHECKPOINTS_DIR,
    LoadedState,
    begin_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_shard,
)

__all__ = ["TrainResult", "Trainer", "train", "experiment_dir", "unigram_entropy", "run_spec", "BRANCH_FILE",
           "RESUME_SAFE_FIELDS", "CONSOLE_FILE", "label_slug", "append_console"]

BRANCH_FILE = "branch.json"  # in a run that resumed from an earlier checkpoint of another run
CONSOLE_FILE = "console.log"  # what the run printed (every session appends), without the progress bar


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    best_checkpoint: Path | None
    val_loss: float | None
    best_val_loss: float | None
    unigram_entropy: float
    sample: str | None
    wandb_dir: Path | None
    wandb_mode: str
    interrupted: bool = False


def experiment_dir(spec: ExperimentSpec) -> Path:
    """Where the runs of this experiment go: train.out_dir/name (one sub-directory per run)."""
    return Path(spec.train.out_dir).expanduser() / spec.name


def unigram_entropy(parts: list[np.ndarray], n_vocab: int, max_tokens: int = 100_000_000) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    counts = np.zeros(n_vocab, dtype=np.int64)
    seen = 0
    for part in parts:
        take = part[: max_tokens - seen]
        counts += np.bincount(np.asarray(take), minlength=n_vocab)[:n_vocab]
        seen += len(take)
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")


def label_slug(label: str) -> str:
    """The directory suffix of a run's ``--label``: spaces become '-'; the rest must already be slug-safe."""
    slug = re.sub(r"\s+", "-", label.strip())
    if not _LABEL.fullmatch(slug):
        bad = sorted({c for c in slug if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        shown = label if len(label) <= 40 else label[:40] + f"... ({len(label)} characters)"
        why = (f"it holds {', '.join(repr(c) for c in bad)}" if bad else
               "it is empty" if not slug else "it is longer than 60 characters" if len(slug) > 60
               else "it starts with '.', '_' or '-'")
        raise MinigptError(f"--label {shown!r} cannot name a run directory: {why}. A label is 1 to 60 letters, "
                           f"digits, '.', '_', '-' or spaces (which become '-'), starting with a letter or digit, "
                           f"e.g. --label lr-3e-4 or --label 'rope swiglu'.")
    return slug


def append_console(run_dir: str | Path, text: str) -> None:
    """Add lines to the run's console.log (best effort: the terminal and metrics.jsonl have them too)."""
    with contextlib.suppress(OSError), open(Path(run_dir) / CONSOLE_FILE, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def _new_run_dir(spec: ExperimentSpec, base: Path | None = None, label: str | None = None) -> Path:
    """A new, empty run directory under ``base`` (default the experiment's directory), named by its start time."""
    base = experiment_dir(spec) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run = base / ((stamp if n == 1 else f"{stamp}-{n}") + (f"-{label}" if label else ""))
        try:
            run.mkdir()  # atomic: of two processes starting in the same second, one gets -2
        except FileExistsError:
            continue
        return run
    raise MinigptError(f"{base} already holds 10,000 runs started at {stamp}.")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# What a resume may change: the budget, the bookkeeping and where things go, nothing that
# changes the optimisation of the steps already planned (wandb.* is matched as a prefix).
RESUME_SAFE_FIELDS = (
    "train.max_steps", "train.max_tokens", "train.eval_every", "train.sample_every", "train.save_every",
    "train.log_every", "train.keep_last", "train.keep_best", "train.threads", "train.device", "train.compile",
    "train.out_dir", "train.peak_flops", "train.sample_prompt", "train.sample_tokens", "train.sample_temperature",
    "train.sample_top_k", "train.log_attention_every", "train.attention_prompt", "data.cache_dir", "data.workers", "description", "wandb.*",
    "train.meta_init", "train.sharded_checkpoint",  # how the model is built and saved, not what it learns
    "train.loss_chunk", "train.activation_checkpointing",  # memory knobs: the same function
)
_UNSET = object()


def _safe_on_resume(key: str) -> bool:
    return key in RESUME_SAFE_FIELDS or key.split(".")[0] + ".*" in RESUME_SAFE_FIELDS


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _spec_differences(spec: ExperimentSpec, saved: ExperimentSpec) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (the run's value, the new value) where they differ."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(spec.model_dump(mode="json"))
    pairs = {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b))}
    out = {k: (old, new) for k, (old, new) in pairs.items() if old != new}
    if spec.init_from is not None and spec.init_from == saved.init_from:
        # The run's model section was read from the init_from weights; the file's is only a sketch.
        out = {k: v for k, v in out.items() if not k.startswith("model.")}
    for key in ("classification.classes", "classification.max_length",  # a run stores what it read from data
                "instruction.max_length", "instruction.eot_id"):
        if key in out and out[key][1] is None:
            del out[key]
    return out


def _shown(value: Any) -> str:
    return "(unset)" if value is _UNSET or value is None else repr(value)


def _resumed_spec(spec: ExperimentSpec | None, saved: ExperimentSpec, ckpt: Path,
                  write: Callable[[str], None]) -> ExperimentSpec:
    """The run's own spec, with the changes a resume may make; any other change is refused."""
    if spec is None:
        return saved
    diff = _spec_differences(spec, saved)
    unsafe = {k: v for k, v in diff.items() if not _safe_on_resume(k)}
    if unsafe:
        fields = "; ".join(f"{k}: the run has {_shown(old)}, now {_shown(new)}" for k, (old, new) in unsafe.items())
        raise MinigptError(
            f"Cannot resume from {ckpt}: the experiment file / --set values differ from the run's own spec "
            f"({ckpt.parent.parent / 'spec.toml'}) in {len(unsafe)} field(s) that change the training: {fields}. "
            f"Resume with the run's spec: `minigpt train --resume {ckpt}` (no experiment file; --set may change "
            f"only {', '.join(RESUME_SAFE_FIELDS)}); or train a new run with the changed spec, e.g. with "
            f"init_from = \"{ckpt}\" to start from these weights.")
    if not diff:
        return saved
    write("note: resuming with changes to the run's spec: "
          + "; ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in diff.items()))
    data = saved.model_dump(mode="json")
    for key, (_, new) in diff.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if new is _UNSET:
            node.pop(leaf, None)
        else:
            node[leaf] = new
    return parse_spec(data, registry=saved.registry)


def run_spec(path: str | Path, overrides: list[str] | None = None,
             registry: ComponentRegistry | None = None) -> ExperimentSpec:
    """The spec a run (or checkpoint, or experiment directory: its latest run) was trained with, plus ``--set``s."""
    from ..spec import apply_overrides

    ckpt = resolve_checkpoint(path, prefer="latest")
    data = Trainer._saved_spec_data(ckpt)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, source=str(ckpt / "spec.toml"), registry=registry)


def _later_checkpoints(ckpt: Path) -> tuple[list[Path], list[Path]]:
    """The intact and the corrupt checkpoints of ``ckpt``'s run after it."""
    found = list_checkpoints(ckpt.parent)
    mine = [s for s, path in found if path.resolve() == ckpt.resolve()]
    intact: list[Path] = []
    corrupt: list[Path] = []
    for s, path in found:
        if mine and s > mine[0]:
            try:
                verify_checkpoint(path)
                intact.append(path)
            except CheckpointError:
                corrupt.append(path)
    return intact, corrupt


class Trainer:
    """Set up with the constructor, run with :meth:`run`; see :func:`train`."""

    def __init__(self, spec: ExperimentSpec | None, *, resume: str | Path | bool | None = None,
                 progress: bool = True, write: Callable[[str], None] | None = None,
                 loggers: list[Logger] | None = None, label: str | None = None):
        self.label = label
        self._label_slug = label_slug(label) if label is not None else None
        self.progress = progress
        self._lock: RunLock | None = None
        self.parent: Path | None = None  # the checkpoint this run branched from
        ckpt: Path | None = None
        notes: list[str] = []
        if resume is None or resume is False:
            if spec is None:
                raise MinigptError("Nothing to train: give an experiment spec, or a run or checkpoint to resume.")
        else:
            if resume is True and spec is None:
                raise MinigptError("resume=True continues the experiment's latest run, so it needs the experiment "
                                   "spec; or give the run or checkpoint to resume instead.")
            target = experiment_dir(spec) if resume is True else Path(resume)
            ckpt = resolve_checkpoint(target, prefer="latest")
            # The registry is the spec's (chosen when it was parsed), else the process default.
            saved = parse_spec(self._saved_spec_data(ckpt), source=str(ckpt),
                               registry=spec.registry if spec is not None else None)
            spec = _resumed_spec(spec, saved, ckpt, notes.append)
        wandb_mode(spec.wandb)  # a bad WANDB_MODE fails before anything is written
        t = spec.train
        if t.threads:
            torch.set_num_threads(t.threads)
        set_deterministic(t.deterministic)
        self.device = select_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        autocast(self.device, t.precision)  # fp16 without a GPU fails here, before any work
        self.env: DistEnv = init_distributed(self.device.type)
        self._bar = None
        self._out = write or self._print
        self._console: list[str] | Any = []  # lines kept until run() opens RUN/console.log
        self._stop = False
        for note in notes if self.env.is_main else ():
            self.write(note)

        # -- where: a new run directory, the run of the checkpoint we resume, or a branch of it ----
        # Rank 0 decides and holds the run's lock; the others follow (or raise the same error).
        self.loaded: LoadedState | None = None
        created = resume is None or resume is False
        where: tuple[str, str | None, str | None] | MinigptError = ("", None, None)
        exp_dir = experiment_dir(spec)
        missing = [d for d in (exp_dir, *exp_dir.parents) if not d.exists()]  # removed again if we fail
        if self.env.is_main:
            try:
                where = self._claim_run_dir(spec, ckpt)
            except MinigptError as exc:
                where = exc
        where = self.env.broadcast(where)
        if isinstance(where, MinigptError):
            raise where from None
        self.run_dir = Path(where[0])
        self.parent = Path(where[1]) if where[1] else None
        created = created or self.parent is not None
        try:
            if where[2]:
                self.write(where[2])
            if ckpt is not None:
                self.loaded = load_checkpoint(ckpt, rank=self.env.rank, world_size=self.env.world_size)
            self._setup(spec, loggers)
        except BaseException:
            self._release(remove=created)
            if created and self.env.is_main and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run that never started leaves no empty directory behind,
                for d in missing:  # nor the out_dir / experiment directories it made
                    with contextlib.suppress(OSError):
                        d.rmdir()
            raise

    def _claim_run_dir(self, spec: ExperimentSpec, ckpt: Path | None) -> tuple[str, str | None, str | None]:
        """(run directory, parent checkpoint of a branch, a note), with the run's lock held."""
        if ckpt is None:
            run = _new_run_dir(spec, label=self._label_slug)
            self._lock = RunLock(run).acquire()
            return str(run), None, None
        run = ckpt.parent.parent
        later, corrupt = _later_checkpoints(ckpt)
        if not later:
            self._lock = RunLock(run).acquire()
            later, corrupt = _later_checkpoints(ckpt)  # again, now that nobody else can add one
            if later:
                self._release()
        if not later:
            notes = [f"note: {', '.join(p.name for p in corrupt)} after {ckpt.name} fail(s) verification and "
                     f"will be rewritten"] if corrupt else []
            if self.label is not None:
                notes.append(f"note: --label {self.label!r} is not used: the run continues in its own directory "
                             f"{run} (a label names a new run directory: a new run, or a branch)")
                self.label = None
            return str(run), None, "\n".join(notes) or None
        # Resuming from an earlier checkpoint: the later ones stay as they are, the new steps go elsewhere.
        branch = _new_run_dir(spec, base=run.parent, label=self._label_slug)
        self._lock = RunLock(branch).acquire()
        return (str(branch), str(ckpt),
                f"branch: {ckpt} is not the latest checkpoint of {run} (it has {later[-1].name}); training "
                f"continues from it in the new run directory {branch} and leaves {run} as it is")

    def _release(self, remove: bool = False) -> None:
        if self._lock is not None:
            self._lock.release(remove=remove)
            self._lock = None

    def _setup(self, spec: ExperimentSpec, loggers: list[Logger] | None) -> None:
        progress = self.progress
        # -- model ---------------------------------------------------------------------------
        meta_build = self._meta_build(spec)  # FSDP2: built on the meta device, each process fills its shard
        if (spec.init_from is None or self.loaded is not None) and not meta_build:  # refuse what cannot fit
            from ..model.memory import check_model_fits

            check_model_fits(spec.model, training=True, device=self.device)
        from ..finetune import apply_finetune, base_record, finetune_active
        from ..assembly import restore_finetuned
        from ..tasks import build_task_model, get_task

        self.finetune = None  # what [finetune] froze and adapted (minigpt_core.finetune)
        self.task = get_task(spec)  # None: a language model (next-token loss on token windows)
        if meta_build:
            from .meta_init import build_meta_model

            model, recorder = build_meta_model(spec)
        elif self.loaded is None:
            from ..assembly import load_init_from

            model, spec = load_init_from(spec, report=self.write if self.env.is_main else None)
            if self.task is not None:  # the data decides the head (its classes), so it comes first
                self.data = self.task.load_data(spec, tokenizer_state=None, write=self.write)
                model = self.task.attach_head(model)
            if finetune_active(spec):  # after the head: a new head always trains
                self.finetune = apply_finetune(model, spec, base=base_record(spec.init_from))
        elif finetune_active(spec):
            model, self.finetune = restore_finetuned(spec, self.loaded.model_state, self.loaded.meta,
                                                     str(self.loaded.directory))
        else:
            model = build_task_model(spec)
            load_model_state(model, self.loaded.model_state, str(self.loaded.directory))
        self.spec = spec
        t = spec.train
        self.flops_per_token = summarize(model).flops_per_token
        self.n_params = sum(p.numel() for p in model.parameters())

        # -- data ----------------------------------------------------------------------------
        if self.task is None:
            self.data = load_training_data(
                spec, tokenizer_state=self.loaded.meta.get("tokenizer") if self.loaded else None,
                progress=progress and self.env.is_main, writer=self.env.local_rank == 0, barrier=self.env.barrier)
        elif self.loaded is not None:
            self.data = self.task.load_data(spec, tokenizer_state=self.loaded.meta.get("tokenizer"), write=self.write)
        self.tokenizer = self.data.tokenizer
        split = self.data.split
        self.seq_len = split.length - 1

        # -- batch geometry --------------------------------------------------------------------
        world = self.env.world_size
        micro = t.micro_batch_size or t.batch_size // world
        if t.batch_size % (micro * world):
            raise SpecError([("train.batch_size", f"{t.batch_size} sequences cannot be split into micro-batches "
                              f"of {micro} on {world} process(es); make it a multiple of "
                              f"{micro * world} or change train.micro_batch_size")])
        self.micro_batch, self.accum = micro, t.batch_size // (micro * world)
        self.tokens_per_step = t.batch_size * self.seq_len
        budgets = [t.max_steps or math.inf,
                   math.ceil(t.max_tokens / self.tokens_per_step) if t.max_tokens else math.inf]
        self.total_steps = int(min(budgets))

        # -- device, wrapping, optimizer -----------------------------------------------------------
        self.model = model if meta_build else model.to(self.device)  # the plain GPT: checkpoints, evaluation...
        if isinstance(model, ActivationCheckpointingProtocol):  # before wrapping: FSDP2 / DDP hook the blocks as they are
            model.activation_checkpointing = bool(t.activation_checkpointing)
        self.wrapped = wrap_model(model, t.strategy, self.env, self.device)
        self.fsdp = self.env.enabled and t.strategy == "fsdp"
        self.sharded = self.fsdp and t.sharded_checkpoint
        if meta_build:
            from .meta_init import load_local_shards, materialise

            if self.loaded is not None:
                load_local_shards(self.model, self.loaded.model_state, self.device, str(self.loaded.directory))
            else:
                materialise(self.model, recorder, self.device)
        # Only the training forward is compiled: evaluation and sampling use self.model (train/compile.py).
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.compile_seconds: float | None = None  # the first step's time when compiled
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.scaler = make_grad_scaler(self.device, t.precision)
        self.sampler = BatchSampler(len(split.train), t.batch_size, seed=spec.seed, shuffle=spec.data.shuffle,
                                    rank=self.env.rank, world_size=world)
        self.val_idx = eval_windows(len(split.val), t.eval_batches * t.batch_size, world)

        self.step = 0
        self.tokens = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.last_val: float | None = None
        self.last_sample: str | None = None
        self.eval_metrics: dict[str, float] = {}  # a task's metrics of the last evaluation
        self.wandb_run_id: str | None = None
        self.entropy: float | None = None
        # 2 * (first step with a non-finite loss or grad norm) + (1 if the loss itself), 0 while finite
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_finite: tuple[int, float] | None = None
        if self.loaded is not None:
            self._restore(self.loaded)
        else:
            torch.manual_seed(spec.seed + self.env.rank)  # dropout streams differ between ranks
        if self.entropy is None:
            self.entropy = unigram_entropy(self.data.shards.parts, self.tokenizer.n_vocab) if self.task is None \
                else self.task.baseline_loss()
        self.peak_flops = t.peak_flops or self.env.broadcast(
            measure_matmul_peak(self.device, PRECISION_DTYPES[t.precision], seconds=0.2)
            if self.env.is_main else None)
        self.loggers = MultiLogger(loggers if loggers is not None else self._default_loggers())

    # -- set-up helpers ---------------------------------------------------------------------------
    def _meta_build(self, spec: ExperimentSpec) -> bool:
        """Whether the model is built on the meta device and materialised shard by shard: a fresh
        run with train.meta_init, or a resume from a sharded checkpoint (under torchrun, FSDP2)."""
        sharded = self.loaded is not None and bool(self.loaded.trainer.get("sharded"))
        fsdp = self.env.enabled and spec.train.strategy == "fsdp"
        if sharded and not fsdp:
            raise CheckpointError(
                f"{self.loaded.directory} is a sharded checkpoint: resume it under torchrun with "
                f"train.strategy = \"fsdp\" and {self.loaded.trainer['sharded']['world_size']} processes.")
        t = spec.train
        if not fsdp:
            return False
        from ..finetune import finetune_active

        if (sharded or t.meta_init or t.sharded_checkpoint) and (spec.task != "lm" or finetune_active(spec)):
            raise MinigptError(
                "train.meta_init and train.sharded_checkpoint work on a language model built from its spec; this "
                "run fine-tunes ([finetune]) or trains a task head. Drop train.meta_init and "
                "train.sharded_checkpoint for it (FSDP then gathers the full state for each checkpoint).")
        if t.meta_init and spec.init_from is not None and self.loaded is None:
            raise MinigptError(
                f"train.meta_init initialises a new model shard by shard, but this run loads its weights from "
                f"init_from ({spec.init_from}). Drop train.meta_init, or init_from to train from scratch.")
        return sharded or t.meta_init and self.loaded is None

    @staticmethod
    def _saved_spec_data(ckpt: Path) -> dict[str, Any]:
        from ..base import toml as _toml
        from ..checkpoints.checkpoint import SPEC_FILE, check_plugin_files

        data = _toml.loads((ckpt / SPEC_FILE).read_text(encoding="utf-8"))  # hash-verified on load
        return check_plugin_files(ckpt, data)

    def write(self, text: str) -> None:
        """Print a line (through ``write=`` if given) and keep it in the run's console.log."""
        self._out(text)
        if self.env.is_main:
            self._save_console(text)

    def _save_console(self, text: str) -> None:
        if isinstance(self._console, list):
            self._console.append(text)
        elif self._console is not None:
            try:
                self._console.write(text + "\n")
                self._console.flush()
            except OSError as exc:  # the log is a convenience: training goes on (metrics.jsonl has the numbers)
                self._close_console()
                self._out(f"warning: {CONSOLE_FILE} is no longer written ({exc})")

    def _open_console(self) -> None:
        lines, self._console = self._console, None
        try:
            self._console = open(self.run_dir / CONSOLE_FILE, "a", encoding="utf-8")
        except OSError as exc:
            self._out(f"warning: {self.run_dir / CONSOLE_FILE} cannot be written ({exc}); the console output "
                      f"is not saved")
            return
        for line in lines:
            self._save_console(line)

    def _close_console(self) -> None:
        console, self._console = self._console, None
        if console is not None and not isinstance(console, list):
            with contextlib.suppress(OSError):
                console.close()

    def _record_failure(self, exc: BaseException) -> None:
        """A ``failed`` event in metrics.jsonl and the error in console.log; nothing here may hide ``exc``."""
        if not self.env.is_main or isinstance(exc, DiskFullError):  # a line cut short would spoil the next one
            return
        message = str(exc) if isinstance(exc, MinigptError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            if hasattr(self, "jsonl") and not getattr(self, "_diverged", False):
                self.jsonl.event(self.step, event="failed", error=message[:4000], error_type=type(exc).__name__)
        with contextlib.suppress(Exception):
            self._save_console(f"error: {message}")

    def _print(self, text: str) -> None:
        if not self.env.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _restore(self, loaded: LoadedState) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        tr = loaded.trainer
        self.step, self.tokens = tr["step"], tr["tokens"]
        self.best_val, self.best_step = tr.get("best_val_loss"), tr.get("best_step")
        self.last_val, self.wandb_run_id, self.entropy = tr.get("val_loss"), tr.get("wandb_run_id"), \
            tr.get("unigram_entropy")
        if self.parent is not None:
            self.wandb_run_id = None  # a branch is a W&B run of its own: its steps would overwrite the parent's
        try:
            self.sampler.load_state_dict(tr["sampler"])
            osd = loaded.optimizer_state
            if loaded.trainer.get("sharded"):  # local shards (the model was built on meta to match)
                from .meta_init import shard_optimizer_state

                osd = shard_optimizer_state(self.model, osd)
            set_optimizer_state_dict(self.model, self.optimizer, osd,
                                     options=StateDictOptions(full_state_dict=self.fsdp and osd is
                                                              loaded.optimizer_state))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{loaded.directory} does not fit this run: {exc}. Resume with the "
                                  f"experiment file (and --set overrides) the checkpoint was made with.") from None
        if tr.get("scaler"):
            self.scaler.load_state_dict(tr["scaler"])
        mine = loaded.rng_states.get(self.env.rank)
        if tr.get("world_size") == self.env.world_size and mine is not None:
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self.write(f"note: the checkpoint was written by {tr.get('world_size')} process(es), this run has "
                       f"{self.env.world_size}; dropout random streams are re-seeded (the resume is not bitwise)")
            torch.manual_seed(self.spec.seed + 7919 * self.step + self.env.rank)

    def _config(self) -> dict[str, Any]:
        return {**self.spec.model_dump(mode="json"), "plugins": plugin_versions(self.spec.registry),
                "minigpt_version": __version__, "torch_version": torch.__version__,
                "world_size": self.env.world_size, "device": str(self.device), "parameters": self.n_params,
                "tokens_per_step": self.tokens_per_step, "micro_batch_size": self.micro_batch,
                "grad_accumulation": self.accum, "data_source": self.data.source,
                "tokenizer_vocab": self.tokenizer.n_vocab, **(self.spec.wandb.config or {})}

    def _default_loggers(self) -> list[Logger]:
        if not self.env.is_main:
            return []
        self.jsonl = JsonlLogger(self.run_dir / METRICS_FILE)
        out: list[Logger] = [self.jsonl, ConsoleLogger(self.write)]
        if wandb_mode(self.spec.wandb) != "disabled":
            self.wandb = WandbLogger(self.spec.wandb, name=self.spec.name, run_dir=self.run_dir,
                                     config=self._config(), run_id=self.wandb_run_id)
            self.wandb_run_id = self.wandb.run_id
            out.append(self.wandb)
        return out

    # -- one optimizer step -----------------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        idx = self.sampler.next_batch()  # this rank's windows of the global batch
        if self.task is not None:  # a task's rows are ready-made (B_local, W)
            return torch.from_numpy(self.data.split.train[idx]).to(self.device, non_blocking=True)
        windows = self.data.split.corpus.windows(self.data.split.train[idx], self.data.split.length)
        return torch.from_numpy(windows).to(self.device, non_blocking=True)  # (B_local, T + 1)

    def train_step(self) -> dict[str, float]:
        t = self.spec.train
        lr = lr_at(self.step, t, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self._batch()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = None
        for i in range(self.accum):
            piece = batch[i * self.micro_batch:(i + 1) * self.micro_batch]
            with gradient_sync(self.wrapped, t.strategy, sync=i == self.accum - 1):
                with autocast(self.device, t.precision):
                    if self.task is None:  # the model's forward takes the loss: head + CE in chunks
                        loss = self.forward(piece[:, :-1], targets=piece[:, 1:], loss_chunk=t.loss_chunk)
                    else:
                        logits = self.forward(self.task.inputs(piece))  # (B, T, V)
                if self.task is not None:
                    loss = self.task.loss(logits, piece)
                aux = self.model.aux_loss()  # e.g. a mixture-of-experts balance term, else None
                total = loss if aux is None else loss + aux
                self.scaler.scale(total / self.accum).backward()
            loss_sum += loss.detach() / self.accum
            if aux is not None:
                aux_sum = (aux_sum if aux_sum is not None else 0) + aux.detach() / self.accum
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        # fp16: an inf gradient is the scaler's business (it skips the step); only the loss counts.
        loss_ok = torch.isfinite(loss_sum)
        ok = loss_ok if self.scaler.is_enabled() else loss_ok & torch.isfinite(norm)
        code = 2 * (self.step + 1) + (~loss_ok).long()
        self._nonfinite = torch.where((self._nonfinite == 0) & ~ok, code, self._nonfinite)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        out = {"loss": loss_sum, "lr": lr, "grad_norm": norm}
        if aux_sum is not None:
            out["aux_loss"] = aux_sum
        return out

    # -- evaluation, samples, checkpoints -----------------------------------------------------------
    def evaluate(self) -> float:
        split = self.data.split
        if self.task is not None:
            loss, self.eval_metrics = self.task.evaluate(
                self.wrapped if self.fsdp else self.model, "val", micro_batch=self.micro_batch, device=self.device,
                precision=self.spec.train.precision, env=self.env)
            return loss
        return evaluate(self.wrapped if self.fsdp else self.model, split.corpus, split.val[self.val_idx],
                        split.length, micro_batch=self.micro_batch, device=self.device,
                        precision=self.spec.train.precision, env=self.env)

    def sample(self) -> str | None:
        t = self.spec.train
        if t.sample_tokens == 0 or not (self.env.is_main or self.fsdp):  # FSDP: every rank runs the forward
            return None
        text = t.sample_prompt if self.task is None else self.task.sample_prompt()
        if text is None:  # a classifier's head predicts classes, not tokens
            return None
        try:
            prompt = self.tokenizer.encode(text)
        except MinigptError as exc:
            self.write(f"note: no sample: the prompt cannot be encoded ({exc})")
            return None
        if not prompt:
            prompt = [self.tokenizer.eot_id or 0]
        # A task's sample (an instruction's response) ends at its end-of-text id, which may lie just
        # past the tokenizer's vocabulary (a char tokenizer has none of its own).
        eos = None if self.task is None else self.data.split.eot_id
        idx = torch.tensor([prompt[-self.spec.model.context_length:]], device=self.device)
        gen = torch.Generator(self.device).manual_seed(self.spec.seed + self.step)  # training RNG untouched
        model = self.wrapped if self.fsdp else self.model
        with autocast(self.device, t.precision):
            out = generate(model, idx, t.sample_tokens, temperature=t.sample_temperature, top_k=t.sample_top_k,
                           generator=gen, n_vocab=max(self.tokenizer.n_vocab, (eos or 0) + 1), eos_id=eos)
        ids = out[0, idx.shape[1]:].tolist()
        return self.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)

    def log_attention(self) -> None:
        """train.log_attention_every: the prompt's attention maps, into RUN/attention/step-N/ and W&B."""
        if not self.model.supports_attn_weights or not (self.env.is_main or self.fsdp):
            return  # spec_warnings said why when the run started; FSDP: every rank runs the forward
        from ..inspection import log_attention_maps

        paths = log_attention_maps(self.wrapped if self.fsdp else self.model, self.tokenizer,
                                   self.spec.train.attention_prompt or self.spec.train.sample_prompt,
                                   self.run_dir / "attention" / f"step-{self.step}", write=self.env.is_main,
                                   title=f"{self.spec.name} step {self.step}", note=self.write)
        if paths:
            self.loggers.log_images(self.step, {f"attention/layer-{i}": p for i, p in enumerate(paths)})

    def _write_shards(self) -> tuple[Path, dict[str, Any]]:
        """Every rank writes its own shard files into the checkpoint directory rank 0 begins (nothing
        is gathered); returns that directory and the record save_checkpoint completes it with."""
        from .meta_init import local_optimizer_state, local_shards, shard_layout

        root = self.run_dir / CHECKPOINTS_DIR
        try:  # a failure on any rank is raised on every rank (none waits for the others forever)
            tmp = begin_checkpoint(root, self.step) if self.env.is_main else None
        except OSError as exc:
            tmp = exc
        tmp = self.env.broadcast(tmp)
        if isinstance(tmp, OSError):
            raise disk_full_error(root, 0, tmp) if tmp.errno in NO_SPACE else tmp
        local = local_shards(self.model)
        try:
            files, rest = write_shard(tmp, self.env.rank, self.env.world_size, local,
                                      local_optimizer_state(self.model, self.optimizer))
        except OSError as exc:
            files, rest = exc, None
        parts = self.env.gather(files)
        failed = next((p for p in parts if isinstance(p, OSError)), None)
        if failed is not None:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            need = 3 * sum(t.numel() * t.element_size() for t in local.values())  # weights + AdamW moments
            raise disk_full_error(root, need, failed) if failed.errno in NO_SPACE else failed
        shards = {"files": {k: v for part in parts for k, v in part.items()},
                  "optimizer": rest, "world_size": self.env.world_size, "layout": shard_layout(self.model)}
        return tmp, shards

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        self._check_finite()
        # FSDP: every rank takes part in gathering the full tensors; rank 0 writes. Sharded: each
        # rank writes its own shards into the directory rank 0 made, and rank 0 completes it.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if self.fsdp else StateDictOptions()
        shards = tmp = None
        if self.sharded:
            tmp, shards = self._write_shards()
            model_state, optim_state = None, {"state": {}}
        else:
            model_state = get_model_state_dict(self.model, options=options) if self.fsdp else None
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        rng = self.env.gather(_rng_state(self.device))
        path = None
        if self.env.is_main:
            trainer = {
                "tokens": self.tokens, "sampler": self.sampler.state_dict(), "val_loss": self.last_val,
                "best_val_loss": self.best_val, "best_step": self.best_step, "wandb_run_id": self.wandb_run_id,
                "world_size": self.env.world_size, "scaler": self.scaler.state_dict(),
                "unigram_entropy": self.entropy, "total_steps": self.total_steps,
                "schedule": {"lr": lr_at(max(self.step - 1, 0), self.spec.train, self.total_steps),
                             "kind": self.spec.train.schedule, "warmup_steps": self.spec.train.warmup_steps},
            }
            meta = {"tokenizer": self.tokenizer.state(), "step": self.step, "val_loss": self.last_val}
            if self.finetune is not None:
                from ..finetune import META_KEY, trainable_state

                f = self.finetune
                meta[META_KEY] = {"base": f.base if f.partial else None, "total": f.total, "trainable": f.trainable,
                                  "adapter": getattr(f.adapter, "name", None)}
                if f.partial:  # a frozen base named by the checkpoint: only the trainable tensors are saved
                    model_state = trainable_state(self.model, model_state)
            path = save_checkpoint(
                self.run_dir / CHECKPOINTS_DIR, self.step, model=self.model, spec=self.spec, model_state=model_state,
                optimizer_state=optim_state, rng_states=rng, trainer=trainer, meta=meta,
                keep_last=self.spec.train.keep_last, best_step=self.best_step if self.spec.train.keep_best else None,
                tmp=tmp, shards=shards)
        self.env.barrier()
        return path

    # -- divergence ---------------------------------------------------------------------------------
    def _check_finite(self, metrics: dict[str, float] | None = None, val_loss: float | None = None) -> None:
        """Stop the run (nothing saved) if a loss, a grad norm, the weights or ``val_loss`` went NaN/inf."""
        code = int(self._nonfinite.item())  # waits for the device: called only where metrics/saves do anyway
        weights_bad = False
        if code == 0 and val_loss is None and metrics is None:  # before a save: the weights themselves
            local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self.model.parameters()]
            weights_bad = not bool(torch.stack([torch.isfinite(t).all() for t in local]).all())
        val_bad = val_loss is not None and not math.isfinite(val_loss)
        if not self.env.any(code != 0 or weights_bad or val_bad, self.device):
            return
        if metrics:
            self.loggers.log(metrics, step=self.step)
        if code:
            step, what = code // 2, "the training loss" if code % 2 else "the gradient norm"
        elif val_bad:
            step, what = self.step, f"the validation loss ({val_loss})"
        else:
            step, what = self.step, "the weights" if weights_bad else "the loss on another process"
        t = self.spec.train
        last = (f"the last finite training loss was {self._last_finite[1]:.4g} at step {self._last_finite[0]}"
                if self._last_finite else "no finite training loss was logged")
        saved = list_checkpoints(self.run_dir / CHECKPOINTS_DIR)
        kept = (f"Nothing was saved after the divergence: the latest checkpoint {saved[-1][1]} holds finite weights; "
                f"a resume keeps the run's learning rate, so to go on from those weights with a lower one, start "
                f"a new run with `--set init_from={saved[-1][1]}`." if saved
                else "No checkpoint was saved.")
        message = (
            f"Training diverged at step {step}: {what} became NaN or infinite ({last}). {kept} Lower "
            f"train.lr (now {t.lr:g}), raise train.warmup_steps (now {t.warmup_steps}), keep train.grad_clip "
            f"on (now {t.grad_clip:g})"
            + (", or train in bf16 (fp16 overflows more easily)." if t.precision == "fp16" else ".")
        )
        if self.env.is_main and hasattr(self, "jsonl"):
            self.jsonl.event(self.step, event="diverged", diverged_at=step, error=message)
        self._diverged = True  # the diverged event is the run's last word, not a failed one
        raise MinigptError(message)

    # -- the loop ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        def stop(signum, frame):
            if self._stop and signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop = True

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, stop)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    def _due(self, every: int) -> bool:
        return self.step == self.total_steps or (every > 0 and self.step % every == 0)

    def run(self) -> TrainResult:
        t = self.spec.train
        from tqdm.auto import tqdm

        if self.env.is_main:
            with reporting_full_disk(self.run_dir / "spec.toml"):
                atomic_write_bytes(self.run_dir / "spec.toml", dump_spec(self.spec).encode("utf-8"))
            self._open_console()
            if self.parent is not None:
                record = {"parent_checkpoint": str(self.parent.resolve()),
                          "parent_run": str(self.parent.parent.parent.resolve()), "step": self.step}
                atomic_write_bytes(self.run_dir / BRANCH_FILE, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
            self.write(self.describe())
            if hasattr(self, "jsonl"):
                extra = {"total_steps": self.total_steps, **({"label": self.label} if self.label else {})}
                if self.parent is not None:
                    self.jsonl.event(self.step, event="branch", run_dir=str(self.run_dir), parent=str(self.parent),
                                     **extra)
                else:
                    self.jsonl.event(self.step, event="resume" if self.loaded else "start", run_dir=str(self.run_dir),
                                     **extra)
        if self.loaded is None:
            self.loggers.log({"data/unigram_entropy": self.entropy}, step=0)
        previous = self._install_signal_handlers()
        self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                         disable=not (self.progress and self.env.is_main), file=sys.stderr, mininterval=1.0)
        last_saved = self.step if self.loaded and self.parent is None else None
        window_start, window_tokens, paused = time.perf_counter(), 0, 0.0
        compiling = t.compile  # this process's first step compiles the model: timed apart from the speed
        try:
            while self.step < self.total_steps:
                if self.env.any(self._stop, self.device):
                    break
                stats = self.train_step()
                if compiling:
                    compiling = False
                    self._compiled(stats, window_start)
                    window_start, paused = time.perf_counter(), 0.0
                else:
                    window_tokens += self.tokens_per_step
                self._bar.update(1)
                metrics: dict[str, float] = {}
                if self._due(t.log_every):
                    loss = self.env.mean(stats["loss"]).item()  # .item(): waits for the device
                    elapsed = time.perf_counter() - window_start - paused
                    tok_s = window_tokens / max(elapsed, 1e-9)
                    metrics = {"train/loss": loss, "train/lr": stats["lr"], "train/grad_norm": float(stats["grad_norm"]),
                               "train/tokens_per_s": tok_s, "train/tokens": self.tokens,
                               "train/epoch": self.sampler.epoch,
                               "train/mfu": mfu(self.flops_per_token, tok_s, self.peak_flops * self.env.world_size),
                               "train/peak_memory_mb": _peak_memory_mb(self.device)}
                    if not window_tokens:  # only the compiling step since the last log: no steady speed yet
                        del metrics["train/tokens_per_s"], metrics["train/mfu"]
                    if self.compile_seconds is not None and self.step == self._compile_step:
                        metrics["compile/seconds"] = round(self.compile_seconds, 3)
                    if "aux_loss" in stats:
                        metrics["train/aux_loss"] = self.env.mean(stats["aux_loss"]).item()
                    if math.isfinite(loss):
                        self._last_finite = (self.step, loss)
                    self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    window_start, window_tokens, paused = time.perf_counter(), 0, 0.0
                pause_start = time.perf_counter()
                if metrics or any(self._due(e) for e in (t.eval_every, t.sample_every, t.save_every)):
                    self._check_finite(metrics)  # before a NaN model is evaluated, sampled or saved
                improved = False
                if self._due(t.eval_every):
                    self.last_val = self.evaluate()
                    self._check_finite(metrics, val_loss=self.last_val)
                    metrics.update({"val/loss": self.last_val, "val/perplexity": math.exp(min(self.last_val, 50)),
                                    **self.eval_metrics})
                    if self.best_val is None or self.last_val < self.best_val:
                        self.best_val, self.best_step, improved = self.last_val, self.step, True
                if metrics:
                    self.loggers.log(metrics, step=self.step)
                if self._due(t.sample_every):
                    text = self.sample()
                    if text is not None and self.env.is_main:
                        self.last_sample = text
                        self.loggers.log_sample(self.step, t.sample_prompt if self.task is None
                                                else self.task.sample_prompt(), text)
                if t.log_attention_every and self._due(t.log_attention_every):
                    self.log_attention()
                if self._due(t.save_every) or (improved and t.keep_best):
                    self.save()
                    last_saved = self.step
                paused += time.perf_counter() - pause_start
            interrupted = self.step < self.total_steps
            if self.task is not None and not interrupted:
                self.task.finish(self)  # the task's final metrics on every split
            if interrupted and last_saved != self.step:
                self.write(f"interrupted: saving a checkpoint at step {self.step}")
                self.save()
            compiled = self._recompiles_note()
            if self.env.is_main and hasattr(self, "jsonl"):
                if interrupted:
                    self.jsonl.event(self.step, event="interrupted", total_steps=self.total_steps, **compiled)
                else:
                    self.jsonl.event(self.step, event="finished", total_steps=self.total_steps,
                                     val_loss=self.last_val, best_val_loss=self.best_val, **compiled)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                self._record_failure(exc)
                raise
            raise disk_full_error(exc.filename2 or exc.filename or self.run_dir, None, exc) from None
        except Exception as exc:
            self._record_failure(exc)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._bar.close()
            self._bar = None
            try:
                self.loggers.close()
            finally:
                self._close_console()
                self._release()
        return self._result(interrupted)

    # -- torch.compile ------------------------------------------------------------------------------
    def _compiled(self, stats: dict[str, Any], start: float) -> None:
        """After the first (compiling) step: its time is the compile time, reported on its own."""
        float(stats["loss"])  # wait for the device, so the time is the step's
        self.compile_seconds = time.perf_counter() - start
        self._compile_step = self.step
        self._graphs_after_warmup = compiled_graphs()
        self.write(f"compile: the first step took {self.compile_seconds:.1f} s with torch.compile; tokens/s "
                   f"leaves it out")
        if self.env.is_main and hasattr(self, "jsonl"):
            self.jsonl.event(self.step, event="compiled", compile_seconds=round(self.compile_seconds, 3))

    def _recompiles_note(self) -> dict[str, Any]:
        """compile_seconds and the recompilations after the first step, for the run's end event
        (and a warning when there were any: each costs about the first step's time again)."""
        if self.compile_seconds is None:
            return {}
        recompiles = compiled_graphs() - self._graphs_after_warmup
        if recompiles:
            self.write(f"warning: torch.compile recompiled {recompiles} time(s) after the first step; run with "
                       f"TORCH_LOGS=recompiles to see why")
        return {"compile_seconds": round(self.compile_seconds, 3), "recompiles": recompiles}

    def describe(self) -> str:
        from ..spec import describe_components, spec_warnings

        t, m = self.spec.train, self.spec.model
        lines = [
            f"run {self.run_dir} ({self._origin()})",
            f"model: {self.n_params:,} parameters ({m.n_layers} layers, emb {m.emb_dim}, {m.n_heads} heads; "
            f"{describe_components(m)}); tokenizer {self.tokenizer.name} ({self.tokenizer.n_vocab:,} ids)",
            f"data: {self.data.source}: {self.data.split.describe()}",
            f"training: {self.total_steps} steps of {t.batch_size} x {self.seq_len} tokens "
            f"({self.micro_batch} per micro-batch x {self.accum} accumulation x {self.env.world_size} process(es)"
            f"{', ' + t.strategy if self.env.enabled else ''}), "
            f"{self.device} {t.precision}{', compiled' if t.compile else ''}",
            f"unigram entropy of the data: {self.entropy:.3f} nats/token (the loss of a model that ignores context)"
            if self.task is None else self.task.describe_baseline(self.entropy),
        ]
        if self.finetune is not None:
            lines.insert(2, f"fine-tuning: {self.finetune.describe()}")
        from ..model.memory import training_memory_warning

        warns = spec_warnings(self.spec, total_steps=self.total_steps)
        warns.append(training_memory_warning(m, self.n_params, self.micro_batch, self.seq_len, self.device))
        lines += [f"warning: {w}" for w in warns if w]
        return "\n".join(lines)

    def _origin(self) -> str:
        if self.parent is not None:
            return f"a branch of {self.parent}, resumed at step {self.step}"
        return f"resumed at step {self.step}" if self.loaded else "new"

    def _result(self, interrupted: bool) -> TrainResult:
        root = self.run_dir / CHECKPOINTS_DIR
        ckpt = best = None
        if self.env.is_main:
            try:
                ckpt = resolve_checkpoint(self.run_dir, prefer="latest")
                best = resolve_checkpoint(self.run_dir, prefer="best") if (root / "best").exists() else None
            except CheckpointError:
                pass
        wb = getattr(self, "wandb", None)
        return TrainResult(self.run_dir, self.step, ckpt, best, self.last_val, self.best_val, self.entropy or math.nan,
                           self.last_sample, wb.directory if wb else None, wandb_mode(self.spec.wandb), interrupted)


def train(spec: ExperimentSpec | None, *, resume: str | Path | bool | None = None, progress: bool = True,
          write: Callable[[str], None] | None = None, label: str | None = None) -> TrainResult:
    """Train the spec's model; ``resume=True`` continues the experiment's latest run, a path that run or checkpoint.

    The model, data and checkpoints come from the components ``spec`` was resolved to (in the
    registry it was parsed with). On resume, ``spec`` may be None (the run's own spec) or may differ
    from it only in RESUME_SAFE_FIELDS;
    resuming from a checkpoint other than its run's latest starts a branch in a new run directory.
    ``label`` names a new run directory <start time>-<label> (see label_slug).
    """
    trainer = None
    finished = False
    try:
        trainer = Trainer(spec, resume=resume, progress=progress, write=write, label=label)
        result = trainer.run()
        finished = True
        return result
    finally:
        # The wrapped model and optimizer hold the process group: drop them first, so that
        # shutdown() destroys it (joining its threads) instead of interpreter exit.
        del trainer
        shutdown(barrier=finished)
