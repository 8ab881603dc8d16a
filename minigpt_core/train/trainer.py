"""The training loop: from a spec to a trained, checkpointed, logged model.

One code path for one process and for torchrun: every process builds the same model from the
same seed, reads its share of each global batch (rank-sharded sampler), and only rank 0 logs
and writes files. :meth:`Trainer.run` is the loop; each thing it does lives in its own module:

    run_dir.py        where the run lives: new, resumed, or a branch; its lock
    resume.py         what a resume may change in the run's spec
    build.py          the model, the task's data, batch geometry, wrapping, optimizer
    step.py           one optimizer step (accumulation, clipping, the scaler)
    samples.py        text samples and attention maps during training
    checkpointing.py  what a save writes and a resume restores (checkpoints/state.py: the files)
    divergence.py     stopping on a NaN/inf loss, gradient, weight or validation loss
    metrics.py        the logged training metrics: speed, MFU, memory, compile time
    console.py        the terminal, the progress bar and console.log
    loggers.py        metrics.jsonl, W&B and the run's events
    signals.py        Ctrl-C / SIGTERM: stop after this step and save

The task (language model, classification, instruction) is a strategy from minigpt_core.tasks,
which also evaluates: the validation loss over token windows is tasks/evaluate.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..base.disk import NO_SPACE, disk_full_error
from ..base.errors import CheckpointError, MinigptError
from ..model.memory import training_memory_warning
from ..spec import ExperimentSpec, describe_components, spec_warnings
from ..tasks import training_task
from .build import build_run, run_config
from .checkpointing import RunProgress, restore_run, save_run
from .console import CONSOLE_FILE, Console, append_console, failure_message
from ..base.device import autocast, select_device, set_deterministic
from ..base.distributed import init_distributed, shutdown
from .divergence import DivergenceWatch
from ..tasks.evaluate import unigram_entropy
from .flops import PRECISION_DTYPES, measure_matmul_peak
from .loggers import Logger, RunLog, open_run_log, wandb_mode
from .metrics import Speedometer, train_metrics
from .resume import RESUME_SAFE_FIELDS, resume_target, run_spec
from .resume import flatten as _flatten  # noqa: F401  (importable here, as before)
from .run_dir import BRANCH_FILE, experiment_dir, label_slug, place_run, remove_unstarted, report_run_dir
from .run_dir import new_run_dir as _new_run_dir  # noqa: F401  (tests read it here)
from .samples import attention_maps, sample_text
from .signals import StopRequest
from ..checkpoints.state import CHECKPOINTS_DIR, load_checkpoint, resolve_checkpoint
from .step import train_step

__all__ = ["TrainResult", "Trainer", "train", "experiment_dir", "unigram_entropy", "run_spec", "BRANCH_FILE",
           "RESUME_SAFE_FIELDS", "CONSOLE_FILE", "label_slug", "append_console"]


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


class Trainer:
    """Set up with the constructor, run with :meth:`run`; see :func:`train`."""

    def __init__(self, spec: ExperimentSpec | None, *, resume: str | Path | bool | None = None,
                 progress: bool = True, write: Callable[[str], None] | None = None,
                 loggers: list[Logger] | None = None, label: str | None = None,
                 run_dir_file: str | Path | None = None):
        if label is not None:
            label_slug(label)  # a bad --label fails before anything else
        notes: list[str] = []
        spec, ckpt = resume_target(spec, resume, notes)
        wandb_mode(spec.wandb)  # a bad WANDB_MODE fails before anything is written
        t = spec.train
        if t.threads:
            torch.set_num_threads(t.threads)
        set_deterministic(t.deterministic)
        self.device = select_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        autocast(self.device, t.precision)  # fp16 without a GPU fails here, before any work
        self.env = init_distributed(self.device.type)
        self.console = Console(write, self.env.is_main, progress_bar=progress)
        for note in notes if self.env.is_main else ():
            self.write(note)
        exp_dir = experiment_dir(spec)
        missing = [d for d in (exp_dir, *exp_dir.parents) if not d.exists()]  # removed again if we fail
        self.place = place_run(spec, ckpt, label, self.env)
        created = ckpt is None or self.place.parent is not None
        try:
            if run_dir_file is not None and self.env.is_main:
                report_run_dir(self.place, run_dir_file)
            if self.place.note:
                self.write(self.place.note)
            loaded = None if ckpt is None else load_checkpoint(ckpt, rank=self.env.rank,
                                                                world_size=self.env.world_size)
            self.resumed = loaded is not None
            self._setup(spec, loaded, loggers, progress)
        except BaseException:
            remove_unstarted(self.place, created, missing, self.env)
            raise

    def _setup(self, spec: ExperimentSpec, loaded: Any, loggers: list[Logger] | None, progress: bool) -> None:
        self.task = training_task(spec)
        self.spec, self.engine, self.batching, flops_per_token = build_run(
            spec, self.task, loaded, self.env, self.device, self.write, progress)
        self.progress = RunProgress()
        self.watch = DivergenceWatch(self.device, self.env)
        if loaded is not None:
            restore_run(loaded, self.engine, self.progress, branch=self.place.parent is not None,
                        seed=self.spec.seed, env=self.env, device=self.device, write=self.write)
        else:
            torch.manual_seed(self.spec.seed + self.env.rank)  # dropout streams differ between ranks
        if self.progress.entropy is None:
            self.progress.entropy = self.task.baseline_loss()
        t = self.spec.train
        peak_flops = t.peak_flops or self.env.broadcast(
            measure_matmul_peak(self.device, PRECISION_DTYPES[t.precision], seconds=0.2)
            if self.env.is_main else None)
        self.speed = Speedometer(t.compile, flops_per_token, peak_flops)
        self.log = RunLog(loggers) if loggers is not None else open_run_log(
            self.spec, self.run_dir, is_main=self.env.is_main, write=self.write, run_id=self.progress.wandb_run_id,
            config=lambda: run_config(self.spec, self.engine, self.batching, self.data, self.env, self.device))
        if self.log.wandb is not None:
            self.progress.wandb_run_id = self.log.wandb.run_id

    # -- what callers look at ---------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.place.run_dir

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def best_step(self) -> int | None:
        return self.progress.best_step

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    @property
    def data(self) -> Any:
        return self.task.data

    def write(self, text: str) -> None:
        """Print a line (through ``write=`` if given) and keep it in the run's console.log."""
        self.console.write(text)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, p = self.spec.train, self.progress
        if self.env.is_main:
            self._start()
        if not self.resumed:
            self.log.log({"data/unigram_entropy": p.entropy}, step=0)
        stop = StopRequest().install()
        bar = self.console.open_bar(self.batching.total_steps, p.step)
        last_saved = p.step if self.resumed and self.place.parent is None else None
        self.speed.restart()
        try:
            while p.step < self.batching.total_steps:
                if self.env.any(stop.requested, self.device):
                    break
                stats = self.train_step()
                self._timed(stats)
                bar.update(1)
                metrics = self._train_metrics(stats) if self._due(t.log_every) else {}
                paused_at = self.speed.pause()
                if metrics or any(self._due(e) for e in (t.eval_every, t.sample_every, t.save_every)):
                    self._check_finite(metrics)  # before a NaN model is evaluated, sampled or saved
                improved = self._due(t.eval_every) and self._validate(metrics)
                if metrics:
                    self.log.log(metrics, step=p.step)
                if self._due(t.sample_every):
                    self.sample()
                if t.log_attention_every and self._due(t.log_attention_every):
                    self.log_attention()
                if self._due(t.save_every) or (improved and t.keep_best):
                    self.save()
                    last_saved = p.step
                self.speed.resume(paused_at)
            interrupted = p.step < self.batching.total_steps
            self._end(interrupted, last_saved)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                self._record_failure(exc)
                raise
            raise disk_full_error(exc.filename2 or exc.filename or self.run_dir, None, exc) from None
        except Exception as exc:
            self._record_failure(exc)
            raise
        finally:
            stop.uninstall()
            self.console.close_bar()
            try:
                self.log.close()
            finally:
                self.console.close()
                self.place.release()
        return self._result(interrupted)

    def _due(self, every: int) -> bool:
        return self.step == self.batching.total_steps or (every > 0 and self.step % every == 0)

    # -- what the loop calls, in its order ----------------------------------------------------------
    def _start(self) -> None:
        """Rank 0: spec.toml, console.log, branch.json, the run's description and its first event."""
        self.place.write_spec(self.spec)
        self.console.open(self.run_dir)
        self.place.write_branch(self.step)
        self.write(self.describe())
        extra = {"total_steps": self.batching.total_steps, **({"label": self.place.label} if self.place.label else {}),
                 **({"init_from": self.engine.init_from} if self.engine.init_from else {})}
        if self.place.parent is not None:
            self.log.event(self.step, event="branch", run_dir=str(self.run_dir), parent=str(self.place.parent),
                           **extra)
        else:
            self.log.event(self.step, event="resume" if self.resumed else "start", run_dir=str(self.run_dir), **extra)

    def train_step(self) -> dict[str, Any]:
        stats = train_step(self.engine, self.task, self.batching, self.spec.train, self.device, self.watch, self.step)
        self.progress.step += 1
        self.progress.tokens += self.batching.tokens_per_step
        return stats

    def _timed(self, stats: dict[str, Any]) -> None:
        """After a step; the first step of a compiled model is the compile time, reported on its own."""
        seconds = self.speed.stepped(self.batching.tokens_per_step, self.step, stats["loss"])
        if seconds is None:
            return
        self.write(f"compile: the first step took {seconds:.1f} s with torch.compile; tokens/s leaves it out")
        if self.env.is_main:
            self.log.event(self.step, event="compiled", compile_seconds=round(seconds, 3))
        self.speed.restart()

    def _train_metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        loss = self.env.mean(stats["loss"]).item()  # .item(): waits for the device
        tok_s = self.speed.tokens_per_s()
        metrics = train_metrics(stats, loss, tok_s, self.speed.steady, tokens=self.progress.tokens,
                                epoch=self.engine.sampler.epoch, flops_per_token=self.speed.flops_per_token,
                                peak_flops=self.speed.peak_flops, device=self.device, env=self.env)
        if self.speed.compile_seconds is not None and self.step == self.speed.compile_step:
            metrics["compile/seconds"] = round(self.speed.compile_seconds, 3)
        if "aux_loss" in stats:
            metrics["train/aux_loss"] = self.env.mean(stats["aux_loss"]).item()
        self.watch.logged(self.step, loss)
        self.console.postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
        self.speed.restart()
        return metrics

    def _check_finite(self, metrics: dict[str, float] | None = None, val_loss: float | None = None) -> None:
        """Stop the run (nothing saved) if a loss, a grad norm, the weights or ``val_loss`` went NaN/inf."""
        found = self.watch.check(self.step, self.engine.model, metrics=metrics, val_loss=val_loss)
        if found is None:
            return
        if metrics:
            self.log.log(metrics, step=self.step)
        message = self.watch.message(found, self.spec.train, self.run_dir / CHECKPOINTS_DIR)
        if self.env.is_main:
            self.log.event(self.step, event="diverged", diverged_at=found.at, error=message)
        self.watch.diverged = True  # the diverged event is the run's last word, not a failed one
        raise MinigptError(message)

    def _eval_options(self) -> dict[str, Any]:
        return dict(micro_batch=self.batching.micro_batch, device=self.device, precision=self.spec.train.precision,
                    env=self.env)

    def evaluate(self) -> float:
        """The validation loss (the task's metrics of it go to ``progress.eval_metrics``)."""
        loss, self.progress.eval_metrics = self.task.evaluate(self.engine.eval_model, "val", **self._eval_options())
        return loss

    def _validate(self, metrics: dict[str, float]) -> bool:
        """Evaluate into ``metrics``; whether the validation loss is the run's best so far."""
        p = self.progress
        p.last_val = self.evaluate()
        self._check_finite(metrics, val_loss=p.last_val)
        metrics["val/loss"] = p.last_val
        if getattr(self.task, "per_token_loss", True):
            metrics["val/perplexity"] = math.exp(min(p.last_val, 50))
        metrics.update(p.eval_metrics)
        if p.best_val is None or p.last_val < p.best_val:
            p.best_val, p.best_step = p.last_val, self.step
            return True
        return False

    def sample(self) -> str | None:
        """A text sample of the model (rank 0 logs it); None where the task writes no text."""
        if self.spec.train.sample_tokens == 0 or not (self.env.is_main or self.engine.fsdp):
            return None  # FSDP: every rank runs the forward
        text = sample_text(self.engine.eval_model, self.data.tokenizer, self.task, self.spec, self.step, self.device,
                           self.write)
        if text is not None and self.env.is_main:
            self.progress.last_sample = text
            self.log.log_sample(self.step, self.task.sample_prompt(), text)
        return text

    def log_attention(self) -> None:
        """train.log_attention_every: the prompt's attention maps, into RUN/attention/step-N/ and W&B."""
        if not self.engine.model.supports_attn_weights or not (self.env.is_main or self.engine.fsdp):
            return  # spec_warnings said why when the run started; FSDP: every rank runs the forward
        images = attention_maps(self.engine.eval_model, self.data.tokenizer, self.spec, self.step, self.run_dir,
                                is_main=self.env.is_main, write=self.write)
        if images:
            self.log.log_images(self.step, images)

    def save(self) -> Path | None:
        self._check_finite()
        return save_run(self.run_dir, self.spec, self.engine, self.progress, self.data.tokenizer,
                        self.batching.total_steps, self.env, self.device)

    def _end(self, interrupted: bool, last_saved: int | None) -> None:
        """The task's final report, a checkpoint of an interrupted run, and the run's last event."""
        if not interrupted:
            report = self.task.finish(self.engine.eval_model, progress=self.console.shows_bar,
                                      **self._eval_options())  # on every split
            if report is not None and self.env.is_main:
                self.log.log(report.metrics, step=self.step)
                self.log.event(self.step, event=self.task.name, **report.fields)
                self.write(report.text)
        if interrupted and last_saved != self.step:
            self.write(f"interrupted: saving a checkpoint at step {self.step}")
            self.save()
        compiled = self._recompiles_note()
        if self.env.is_main:
            if interrupted:
                self.log.event(self.step, event="interrupted", total_steps=self.batching.total_steps, **compiled)
            else:
                self.log.event(self.step, event="finished", total_steps=self.batching.total_steps,
                               val_loss=self.progress.last_val, best_val_loss=self.progress.best_val, **compiled)

    def _recompiles_note(self) -> dict[str, Any]:
        """compile_seconds and the recompilations after the first step, for the run's end event
        (and a warning when there were any: each costs about the first step's time again)."""
        if self.speed.compile_seconds is None:
            return {}
        recompiles = self.speed.recompiles()
        if recompiles:
            self.write(f"warning: torch.compile recompiled {recompiles} time(s) after the first step; run with "
                       f"TORCH_LOGS=recompiles to see why")
        return {"compile_seconds": round(self.speed.compile_seconds, 3), "recompiles": recompiles}

    def _record_failure(self, exc: BaseException) -> None:
        """A ``failed`` event in metrics.jsonl and the error in console.log; nothing here may hide ``exc``."""
        message = failure_message(exc)
        if not self.env.is_main or message is None:
            return
        with contextlib.suppress(Exception):
            if not self.watch.diverged:
                self.log.event(self.step, event="failed", error=message[:4000], error_type=type(exc).__name__)
        with contextlib.suppress(Exception):
            self.console.keep(f"error: {message}")

    def describe(self) -> str:
        t, m, b, data = self.spec.train, self.spec.model, self.batching, self.data
        n_params = self.engine.n_params
        lines = [
            f"run {self.run_dir} ({self.place.origin(self.step, self.resumed)})",
            f"model: {n_params:,} parameters ({m.n_layers} layers, emb {m.emb_dim}, {m.n_heads} heads; "
            f"{describe_components(m)}); tokenizer {data.tokenizer.name} ({data.tokenizer.n_vocab:,} ids)",
            f"data: {data.source}: {data.split.describe()}",
            f"training: {b.total_steps} steps of {t.batch_size} x {b.seq_len} tokens "
            f"({b.micro_batch} per micro-batch x {b.accum} accumulation x {self.env.world_size} process(es)"
            f"{', ' + t.strategy if self.env.enabled else ''}), "
            f"{self.device} {t.precision}{', compiled' if t.compile else ''}",
            self.task.describe_baseline(self.progress.entropy),
        ]
        if self.engine.finetune is not None:
            lines.insert(2, f"fine-tuning: {self.engine.finetune.describe()}")
        if self.engine.init_from:  # a directory of runs follows its latest: say which weights these are
            r = self.engine.init_from
            lines.insert(1, f"init_from: {r['given']} -> {r['checkpoint']} ({r['which']})")
        warns = spec_warnings(self.spec, total_steps=b.total_steps)
        warns.append(training_memory_warning(m, n_params, b.micro_batch, b.seq_len, self.device))
        lines += [f"warning: {w}" for w in warns if w]
        return "\n".join(lines)

    def _result(self, interrupted: bool) -> TrainResult:
        root = self.run_dir / CHECKPOINTS_DIR
        ckpt = best = None
        if self.env.is_main:
            try:
                ckpt = resolve_checkpoint(self.run_dir, prefer="latest")
                best = resolve_checkpoint(self.run_dir, prefer="best") if (root / "best").exists() else None
            except CheckpointError:
                pass
        p, wb = self.progress, self.log.wandb
        return TrainResult(self.run_dir, self.step, ckpt, best, p.last_val, p.best_val, p.entropy or math.nan,
                           p.last_sample, wb.directory if wb else None, wandb_mode(self.spec.wandb), interrupted)


def train(spec: ExperimentSpec | None, *, resume: str | Path | bool | None = None, progress: bool = True,
          write: Callable[[str], None] | None = None, label: str | None = None,
          run_dir_file: str | Path | None = None) -> TrainResult:
    """Train the spec's model; ``resume=True`` continues the experiment's latest run, a path that run or checkpoint.

    The model, data and checkpoints come from the components ``spec`` was resolved to (in the
    registry it was parsed with). On resume, ``spec`` may be None (the run's own spec) or may differ
    from it only in RESUME_SAFE_FIELDS;
    resuming from a checkpoint other than its run's latest starts a branch in a new run directory.
    ``label`` names a new run directory <start time>-<label> (see label_slug). ``run_dir_file``: a file
    that receives the run directory's path as soon as it is chosen (how `minigpt ablate` learns its cell's run).
    """
    trainer = None
    finished = False
    try:
        trainer = Trainer(spec, resume=resume, progress=progress, write=write, label=label, run_dir_file=run_dir_file)
        result = trainer.run()
        finished = True
        return result
    finally:
        # The wrapped model and optimizer hold the process group: drop them first, so that
        # shutdown() destroys it (joining its threads) instead of interpreter exit.
        del trainer
        shutdown(barrier=finished)
