"""What the two fine-tuning tasks (classification, instruction) share: examples read from a JSON or
JSONL file, split three ways and packed into rows of one width; the base model's tokenizer;
passes over a whole split shared out over processes; the report at the end of a run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..checkpoints.checkpoint import read_meta
from ..data.sources import DataError
from ..spec import ExperimentSpec
from ..model.tokenizers import TokenizerError, build_tokenizer, tokenizer_from_state
from ..base.device import autocast
from ..base.progress import progress_bar
from ..base.distributed import DistEnv
from ..checkpoints.state import pick_checkpoint
from .base import FinalReport, Task

__all__ = ["SPLITS", "ExampleSplit", "ExampleData", "SupervisedTask", "base_tokenizer", "json_records", "over_rows"]

SPLITS = ("train", "val", "test")


@dataclass
class ExampleSplit:
    """The rows of each split; ``length`` is the trainer's "window" length."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    length: int

    def rows(self, split: str) -> np.ndarray:
        return getattr(self, split)


@dataclass
class ExampleData:
    tokenizer: Any
    split: Any  # an ExampleSplit
    source: str


def json_records(text: str, path: Path, list_hint: str = "", line_hint: str = "") -> Any:
    """The records of a JSON list or a JSONL file (one object a line); a DataError names the bad line."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}{list_hint}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {n}: not valid JSON ({exc}); a JSONL file holds one "
                                f"object per line{line_hint}.") from None
    return records


def base_tokenizer(spec: ExperimentSpec, state: dict[str, Any] | None, texts: list[str]):
    """The tokenizer of the weights fine-tuned (a resumed run's, else init_from's), else the spec's
    (one that learns its vocabulary, like char, from ``texts``)."""
    if state is None and spec.init_from is not None and not spec.init_from.startswith("hf:"):
        state = read_meta(pick_checkpoint(spec.init_from)[0]).get("tokenizer")  # the ids the weights know
    if state is not None:
        return tokenizer_from_state(state, spec.registry)
    try:
        return build_tokenizer(spec)
    except TokenizerError:  # a tokenizer that learns its vocabulary (char): from these texts
        return build_tokenizer(spec, training_text="\n".join(texts))


@torch.no_grad()
def over_rows(model: nn.Module, rows: np.ndarray, inputs: Callable[[torch.Tensor], torch.Tensor],
              consume: Callable[[torch.Tensor, torch.Tensor], None], *, micro_batch: int, device: torch.device,
              precision: str = "fp32", env: DistEnv | None = None,
              progress: Callable[[int], None] | None = None) -> DistEnv:
    """Run the model over ``rows`` in eval mode, split evenly over processes, calling ``consume(logits,
    batch)`` for each micro-batch; returns the processes' DistEnv (to sum the results over).
    ``progress`` is called with the number of this process's rows each forward pass covered."""
    env = env or DistEnv()
    mine = rows[env.rank::env.world_size]
    # Every process runs the same number of forward passes (FSDP needs all of them in each).
    n_batches = math.ceil(math.ceil(len(rows) / env.world_size) / micro_batch)
    was_training = model.training
    model.eval()
    try:
        for b in range(n_batches):
            chunk = mine[b * micro_batch:(b + 1) * micro_batch]
            real = len(chunk)
            batch = torch.from_numpy(chunk if real else rows[:1]).to(device)
            with autocast(device, precision):
                logits = model(inputs(batch))
            if real:
                consume(logits, batch)
                if progress is not None:
                    progress(real)
    finally:
        model.train(was_training)
    return env


class SupervisedTask(Task):
    """A fine-tuning task on labelled examples: its final report covers every non-empty split."""

    def split_result(self, model: nn.Module, split: str, rows: np.ndarray,
                     **options: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics to log, the split's record in the report) at the end of a run."""
        raise NotImplementedError

    def final_report(self, metrics: dict[str, float], results: dict[str, dict[str, Any]]) -> FinalReport:
        raise NotImplementedError

    def finish(self, model: nn.Module, *, progress: bool = False, **options: Any) -> FinalReport:
        metrics: dict[str, float] = {}
        results: dict[str, dict[str, Any]] = {}
        env = options.get("env") or DistEnv()
        splits = [(s, self.data.split.rows(s)) for s in SPLITS if len(self.data.split.rows(s))]
        # Every split again, the training split included: minutes on a CPU, so a bar says how far it is.
        mine = sum(len(rows[env.rank::env.world_size]) for _, rows in splits)
        with progress_bar(mine, desc="final evaluation", unit="example", enabled=progress and env.is_main) as bar:
            for split, rows in splits:
                bar.set_description(f"final evaluation: {split}")  # three redraws in all
                m, results[split] = self.split_result(model, split, rows, progress=bar.update, **options)
                metrics.update(m)
        return self.final_report(metrics, results)
