"""Where metrics go: one small interface, three implementations (jsonl, console, wandb).

The JSONL log in the run directory always receives everything, so nothing is lost when W&B is
unreachable or disabled; W&B gets the same metrics plus the generated samples as a table.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..base.disk import NO_SPACE, disk_full_error, reporting_full_disk
from ..base.errors import MinigptError
from ..spec import WandbSpec

__all__ = ["Logger", "JsonlLogger", "ConsoleLogger", "WandbLogger", "MultiLogger", "RunLog", "open_run_log", "wandb_mode",
           "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


class Logger:
    """Receives metrics (``{"train/loss": 2.1, ...}`` at an optimizer step) and text samples."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        pass

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        """Figures already written to disk (e.g. attention maps): key -> PNG file."""
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """Appends one JSON object per call to ``metrics.jsonl``; flushed at once, so a crash loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._full = False

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._full = True
            raise disk_full_error(self.path, len(line.encode("utf-8")), exc) from None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        # NaN/inf are not JSON: written as null, so the file stays parseable.
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self._write({"step": step, "time": round(time.time(), 3), **clean})

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        self._write({"step": step, "time": round(time.time(), 3), "sample/prompt": prompt, "sample/text": text})

    def event(self, step: int, **fields: Any) -> None:
        """A non-metric record (run started, resumed, interrupted)."""
        self._write({"step": step, "time": round(time.time(), 3), **fields})

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            if not self._full:  # the unwritten line was reported already
                raise


class ConsoleLogger(Logger):
    """Prints evaluation results and samples (the progress bar shows the per-step loss)."""

    def __init__(self, write: Callable[[str], None] = print):
        self.write = write

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if "val/loss" in metrics:
            self.write(f"step {step}: val loss {metrics['val/loss']:.4f}"
                       + (f", perplexity {metrics['val/perplexity']:.2f}" if "val/perplexity" in metrics else "")
                       + (f", train loss {metrics['train/loss']:.4f}" if "train/loss" in metrics else "")
                       + (f", accuracy {metrics['val/accuracy']:.2%}" if "val/accuracy" in metrics else ""))

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        self.write(f"step {step} sample: {(prompt + text)!r}")


_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}


def wandb_mode(spec: WandbSpec) -> str:
    """The spec's mode unless WANDB_MODE is set in the environment."""
    env = os.environ.get("WANDB_MODE")
    if env is None or env == "":
        return spec.mode
    if env not in _MODES:
        raise MinigptError(f"WANDB_MODE={env!r} is not a W&B mode; use online, offline or disabled "
                           f"(or unset it to use wandb.mode from the experiment file).")
    return _MODES[env]


class WandbLogger(Logger):
    """A real ``wandb`` run (offline by default: no account needed, `wandb sync` uploads later)."""

    def __init__(self, spec: WandbSpec, *, name: str, run_dir: Path, config: dict[str, Any],
                 run_id: str | None = None):
        import logging

        import wandb

        self.mode = wandb_mode(spec)
        self._disk_error: tuple[str, OSError] | None = None
        quiet, logging.raiseExceptions = logging.raiseExceptions, False  # see _watch_log_errors
        try:
            self.run = wandb.init(
                project=spec.project, entity=spec.entity, name=name, group=spec.group, job_type=spec.job_type,
                tags=list(spec.tags) or None, config=config, dir=str(run_dir), mode=self.mode,
                id=run_id, resume="allow" if run_id else None,
                # console="off": W&B must not wrap stdout/stderr, the progress bar owns the terminal.
                settings=wandb.Settings(console="off", silent=True, save_code=False),
            )
        except Exception as exc:  # wandb raises many types (auth, network, usage)
            hint = (" Log in with `wandb login`, or use wandb.mode = \"offline\"." if self.mode == "online"
                    else "")
            raise MinigptError(f"Weights & Biases could not start a {self.mode} run: {type(exc).__name__}: "
                               f"{exc}.{hint} Metrics are still written to {METRICS_FILE}.") from None
        finally:
            logging.raiseExceptions = quiet
        self._wandb = wandb
        self._samples: list[list[Any]] = []
        try:
            self._watch_log_errors()
        except MinigptError:
            self.close()  # quietly: the disk is full
            raise

    def _watch_log_errors(self) -> None:
        """W&B's debug log on a full disk prints a traceback per line logged: note the error instead."""
        import logging

        for handler in logging.getLogger("wandb").handlers:
            def handle_error(record, handler=handler, original=handler.handleError):
                exc = sys.exc_info()[1]
                if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                    self._disk_error = self._disk_error or (getattr(handler, "baseFilename", "wandb"), exc)
                else:
                    original(record)
            handler.handleError = handle_error
            try:
                handler.flush()  # a line it could not write during wandb.init fails again here
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                self._disk_error = self._disk_error or (getattr(handler, "baseFilename", "wandb"), exc)
        self._check_disk()

    def _check_disk(self) -> None:
        if self._disk_error is not None:
            raise disk_full_error(self._disk_error[0], None, self._disk_error[1])

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def directory(self) -> Path | None:
        """The run's local directory (offline-run-...), where `wandb sync` reads it from."""
        return None if self.mode == "disabled" else Path(self.run.dir).parent

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._check_disk()
        with reporting_full_disk(self.run.dir):
            self.run.log(dict(metrics), step=step)
        self._check_disk()

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        # A table logged again with all rows so far: W&B shows the latest version of it.
        self._samples.append([step, prompt, text])
        with reporting_full_disk(self.run.dir):  # the table is copied into the run directory
            self.run.log({"samples": self._wandb.Table(columns=["step", "prompt", "text"], data=self._samples)},
                         step=step)
        self._check_disk()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        with reporting_full_disk(self.run.dir):  # W&B copies each image into its run directory
            self.run.log({k: self._wandb.Image(str(p)) for k, p in images.items()}, step=step)
        self._check_disk()

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None,
                  summary: Mapping[str, Any] | None = None) -> None:
        """A table (e.g. downstream evaluation results), and ``summary`` values in the run's summary."""
        with reporting_full_disk(self.run.dir):
            self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)
            if summary:
                self.run.summary.update(dict(summary))
        self._check_disk()

    def close(self) -> None:
        try:
            self.run.finish()
        except Exception:
            if self._disk_error is None:  # on a full disk the error was reported already
                raise


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        for logger in self.loggers:
            logger.log_sample(step, prompt, text)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        for logger in self.loggers:
            logger.log_images(step, images)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # one failing sink must not keep the others from closing
                errors.append(exc)
        if errors:
            print(f"warning: a logger failed to close: {errors[0]}", file=sys.stderr)


class RunLog(MultiLogger):
    """A training run's loggers, and the run's own metrics.jsonl for its events (started, finished,
    diverged...). Where the run keeps no metrics.jsonl (other ranks; loggers given by the caller)
    events go nowhere."""

    def __init__(self, loggers: list[Logger], jsonl: JsonlLogger | None = None, wandb: WandbLogger | None = None):
        super().__init__(loggers)
        self.jsonl = jsonl
        self.wandb = wandb

    def event(self, step: int, **fields: Any) -> None:
        if self.jsonl is not None:
            self.jsonl.event(step, **fields)


def open_run_log(spec: Any, run_dir: Path, *, is_main: bool, write: Callable[[str], None],
                 config: Callable[[], dict[str, Any]], run_id: str | None) -> RunLog:
    """Rank 0's loggers: metrics.jsonl, the console and (unless disabled) W&B, which resumes the run
    ``run_id`` if given; ``config()`` is the W&B run's config. Other ranks log nothing."""
    if not is_main:
        return RunLog([])
    jsonl = JsonlLogger(run_dir / METRICS_FILE)
    loggers: list[Logger] = [jsonl, ConsoleLogger(write)]
    wandb = None
    if wandb_mode(spec.wandb) != "disabled":
        wandb = WandbLogger(spec.wandb, name=spec.name, run_dir=run_dir, config=config(), run_id=run_id)
        loggers.append(wandb)
    return RunLog(loggers, jsonl, wandb)
