"""Instruction tuning (the book's chapter 7): Alpaca-format examples, a prompt template, response-only loss.

Each example is formatted by the spec's ``template`` component into a prompt (instruction and
input) and a training text (prompt, separator, response), tokenized, and ended with the
end-of-text id. A batch row is ``[tokens, end-of-text, padding up to max_length | number of real
tokens (with the end-of-text) | number of prompt tokens]``: the rows are stored at one width, and
each (micro-)batch is cut to its own longest example, as the book's collate function pads each
batch only to its longest. Targets are the inputs shifted by one; the first end-of-text stays a
target (the model learns to stop), every pad after it is -100, and so are the prompt's tokens
with ``mask_prompt`` (the book's exercise 7.2). Validation and test losses are over response
tokens (and the end-of-text) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base.reading import DATA_LIMIT, read_text_bounded
from ..data.sources import DataError
from ..spec import ExperimentSpec, InstructionSpec
from .base import FinalReport
from .supervised import SPLITS, ExampleData, ExampleSplit, SupervisedTask, base_tokenizer, json_records, over_rows

__all__ = ["InstructionTask", "InstructionSplit", "InstructionData", "read_instructions", "split_indices",
           "pack_instruction_rows", "instruction_targets", "build_template", "end_of_text_id", "instruction_prompt", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # torch's cross_entropy default, the book's


# -- reading ------------------------------------------------------------------------------------
def read_instructions(path_str: str) -> list[dict[str, str]]:
    """The examples of an Alpaca JSON list or JSONL file as {instruction, input, output} (input "" if absent)."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"instruction.path {path_str!r}: no such file (relative paths are resolved from "
                        f"{Path.cwd()}).")
    try:
        text = read_text_bounded(path, "instruction data file", DATA_LIMIT, DataError,
                                 hint="Set instruction.path to a JSON or JSONL file of examples (docs/finetune.md).")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    records = json_records(text, path, list_hint=". An instruction file is a JSON list of objects (the Alpaca "
                                                  "format) or JSONL, one object per line.",
                           line_hint=', e.g. {"instruction": "...", "input": "", "output": "..."}')
    if not records:
        raise DataError(f"{path} holds no examples; instruction tuning needs records with 'instruction' and "
                        f"'output' (and optionally 'input') fields (docs/finetune.md shows the format).")
    out = []
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise DataError(f"{path}, record {n}: a {type(r).__name__}, not an object with 'instruction', "
                            f"'input' and 'output' fields.")
        missing = [f for f in ("instruction", "output") if f not in r]
        if missing:
            raise DataError(f"{path}, record {n}: no {' or '.join(repr(f) for f in missing)} field (it has "
                            f"{sorted(r)}). Every example needs 'instruction' and 'output'; 'input' is optional.")
        wrong = [f for f in ("instruction", "input", "output")
                 if not isinstance(r.get(f), str) and not (f == "input" and r.get(f) is None)]
        if wrong:
            raise DataError(f"{path}, record {n}: the field(s) {wrong} must be text (a JSON string).")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
    return out


def split_indices(n: int, ins: InstructionSpec) -> dict[str, np.ndarray]:
    """Example indices of each split: shuffled with split_seed (or in the file's order), cut by fraction
    into train, test and validation, in that order (the book's)."""
    order = np.random.default_rng(ins.split_seed).permutation(n) if ins.shuffle else np.arange(n)
    n_train = int(n * ins.split[0])
    n_test = int(n * ins.split[2])
    # The book's order: train, test, then validation (the rest): 935 / 110 / 55 of its 1,100 entries.
    return {"train": order[:n_train], "test": order[n_train:n_train + n_test], "val": order[n_train + n_test:]}


def build_template(spec: ExperimentSpec) -> Any:
    """The spec's template component (``[instruction.template]``)."""
    return spec.components["instruction.template"].build(None)


def end_of_text_id(spec: ExperimentSpec, tokenizer) -> int:
    """The id that ends a response: instruction.eot_id, the tokenizer's, or the first id past its vocabulary."""
    ins = spec.instruction
    eot = ins.eot_id if ins.eot_id is not None else \
        tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.n_vocab
    if eot > tokenizer.n_vocab or eot >= spec.model.vocab_size:
        raise DataError(f"the end-of-text id {eot} is outside the model's vocabulary ({spec.model.vocab_size} ids) "
                        f"or past the tokenizer's ({tokenizer.n_vocab} ids, which may add one id of its own). "
                        f"The {tokenizer.name} tokenizer has " + ("no end-of-text token, so the first id past its "
                        "vocabulary ends the responses: the base model needs model.vocab_size > "
                        f"{tokenizer.n_vocab}" if tokenizer.eot_id is None else f"end-of-text id {tokenizer.eot_id}")
                        + "; or set instruction.eot_id.")
    return eot


def pack_instruction_rows(examples: list[tuple[list[int], int]], max_length: int, eot_id: int) -> np.ndarray:
    """(N, max_length + 2) rows from (token ids of the training text, prompt tokens) pairs: the ids and
    the end-of-text id, truncated to max_length and padded with eot_id; then their count; then the
    prompt's length."""
    rows = np.full((len(examples), max_length + 2), eot_id, dtype=np.int64)
    for i, (ids, n_prompt) in enumerate(examples):
        seq = (list(ids) + [eot_id])[:max_length]
        rows[i, :len(seq)] = seq
        rows[i, -2] = len(seq)
        rows[i, -1] = n_prompt
    return rows


def instruction_targets(batch: torch.Tensor, width: int, mask_prompt: bool) -> torch.Tensor:
    """(B, width) next-token targets of a batch of rows: the tokens after each input position, with
    -100 after the first end-of-text (the padding) and, with ``mask_prompt``, on the prompt."""
    targets = batch[:, 1:width + 1]
    pos = torch.arange(width, device=batch.device)[None, :]
    keep = pos < batch[:, -2:-1] - 1  # the last real token (the end-of-text) is the last target
    if mask_prompt:
        keep &= pos >= batch[:, -1:] - 1  # position p - 1 predicts the response's first token
    return targets.masked_fill(~keep, IGNORE_INDEX)


# -- the task -------------------------------------------------------------------------------------
@dataclass
class InstructionSplit(ExampleSplit):  # length: max_length (the trainer reads at most length - 1 tokens)
    eot_id: int
    mask_prompt: bool
    template: str

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} validation / {len(self.test):,} test examples, "
                f"template {self.template}, at most {self.length} tokens each (batches padded to their longest "
                f"with the end-of-text id {self.eot_id}), "
                + ("loss on the responses only" if self.mask_prompt else "loss on prompts and responses"))


@dataclass
class InstructionData(ExampleData):
    split: InstructionSplit
    sample_prompt: str | None = None


class InstructionTask(SupervisedTask):
    name = "instruction"

    def __init__(self, spec: ExperimentSpec):
        super().__init__(spec)
        self.data: InstructionData | None = None

    @property
    def ins(self) -> InstructionSpec:
        return self.spec.instruction

    def load_data(self, spec, *, tokenizer_state=None, write: Callable[[str], None] = print, env=None,
                  progress: bool = False) -> InstructionData:
        self.spec = spec
        ins = self.ins
        examples = read_instructions(ins.path)
        template = build_template(spec)
        prompts = [template.prompt(e["instruction"], e["input"]) for e in examples]
        texts = [template.text(p, e["output"]) for p, e in zip(prompts, examples)]
        tokenizer = base_tokenizer(spec, tokenizer_state, texts)
        eot = end_of_text_id(spec, tokenizer)
        encoded = []
        for n, (prompt, text) in enumerate(zip(prompts, texts), 1):
            try:
                ids, prompt_ids = tokenizer.encode(text), tokenizer.encode(prompt)
            except DataError:
                raise
            except Exception as exc:  # a character the base model's tokenizer has no id for
                raise DataError(f"{ins.path}, record {n} cannot be tokenized: {exc}") from None
            # Masked: the tokens the training text shares with the prompt alone (all of them, unless
            # a byte-pair merge crosses the boundary).
            same = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
            encoded.append((ids, same))
        parts = split_indices(len(examples), ins)
        context = spec.model.context_length
        longest = max((len(encoded[i][0]) + 1 for i in parts["train"]), default=1)
        max_length = ins.max_length or min(longest, context + 1)
        if max_length > context + 1:
            raise DataError(f"instruction.max_length ({max_length}) is more than model.context_length + 1 "
                            f"({context + 1}): the model reads at most {context} tokens; lower instruction.max_length.")
        # An example cut before its response would train (and validate) nothing.
        dropped = {s: [i for i in parts[s] if encoded[i][1] >= max_length] for s in SPLITS}
        truncated = sum(len(encoded[i][0]) + 1 > max_length for s in SPLITS for i in parts[s])
        if any(dropped.values()):
            parts = {s: np.array([i for i in parts[s] if encoded[i][1] < max_length], dtype=np.int64) for s in SPLITS}
        if not len(parts["train"]) or not len(parts["val"]):
            raise DataError(f"{ins.path}: {len(examples)} example(s) leave no training or validation examples "
                            f"after the split {list(ins.split)}"
                            + (f" and dropping those whose prompt is longer than max_length ({max_length})"
                               if any(dropped.values()) else "") + "; add examples or change instruction.split.")
        if ins.max_length != max_length:
            ins.max_length = max_length  # what a resume and `minigpt sample` must read the same way
        if ins.eot_id != eot:
            ins.eot_id = eot
        rows = {s: pack_instruction_rows([encoded[i] for i in parts[s]], max_length, eot) for s in SPLITS}
        split = InstructionSplit(rows["train"], rows["val"], rows["test"], max_length, eot, ins.mask_prompt,
                                 spec.instruction.template.name)
        n_input = sum(bool(e["input"]) for e in examples)
        source = f"{ins.path}: {len(examples):,} examples ({n_input:,} with an input)"
        if truncated:
            source += f", {truncated} truncated to {max_length} tokens"
        if any(dropped.values()):
            source += f", {sum(map(len, dropped.values()))} dropped (prompt alone over {max_length} tokens)"
        first = examples[int(parts["val"][0])]
        self.data = InstructionData(tokenizer, split, source, template.text(template.prompt(
            first["instruction"], first["input"]), ""))
        return self.data

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        # Per-batch padding: only as wide as this batch's longest example (its real tokens, less the last).
        return batch[:, :int(batch[:, -2].max()) - 1]

    def _loss_sum(self, logits: torch.Tensor, batch: torch.Tensor, mask_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        targets = instruction_targets(batch, logits.shape[1], mask_prompt)
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total, (targets != IGNORE_INDEX).sum()

    def loss(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        total, count = self._loss_sum(logits, batch, self.ins.mask_prompt)
        return total / count.clamp(min=1)

    def baseline_loss(self) -> float:
        """Entropy of the response tokens of the training split (the loss of a model that ignores context)."""
        rows = torch.from_numpy(self.data.split.train)
        targets = instruction_targets(rows, rows.shape[1] - 3, True)
        ids = targets[targets != IGNORE_INDEX].numpy()
        counts = np.bincount(ids)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def describe_baseline(self, value: float) -> str:
        return (f"unigram entropy of the training responses: {value:.3f} nats/token (the loss of a model that "
                f"ignores context)")

    def sample_prompt(self) -> str | None:
        return self.data.sample_prompt if self.data else None

    def sample_eos(self) -> int | None:
        return self.data.split.eot_id

    def response_loss(self, model: nn.Module, rows: np.ndarray, *, micro_batch: int, device: torch.device,
                      precision: str = "fp32", env=None, progress=None) -> tuple[float, int]:
        """(summed loss, token count) over the responses of ``rows``, split evenly over processes."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)

        def consume(logits: torch.Tensor, batch: torch.Tensor) -> None:
            nonlocal total, count
            s, c = self._loss_sum(logits, batch, mask_prompt=True)
            total += s.double()
            count += c.double()

        env = over_rows(model, rows, self.inputs, consume, micro_batch=micro_batch, device=device,
                        precision=precision, env=env, progress=progress)
        return float(env.sum(total)), int(env.sum(count))

    def evaluate(self, model: nn.Module, split: str, **options: Any) -> tuple[float, dict[str, float]]:
        total, count = self.response_loss(model, self.data.split.rows(split), **options)
        return (total / count if count else math.nan), {}

    def split_result(self, model: nn.Module, split: str, rows: np.ndarray,
                     **options: Any) -> tuple[dict[str, float], dict[str, Any]]:
        total, count = self.response_loss(model, rows, **options)
        record = {"examples": len(rows), "response_tokens": count, "loss": total / count}
        # Not SPLIT/loss: train/loss is the last step's batch loss, val/loss the evaluation's.
        return {f"{split}/response_loss": record["loss"]}, record

    def final_report(self, metrics: dict[str, float], results: dict[str, dict[str, Any]]) -> FinalReport:
        lines = ["instruction results (loss on the response tokens and the end-of-text, nats/token)",
                 f"  {'split':<6} {'examples':>8} {'tokens':>8} {'loss':>8} {'perplexity':>10}"]
        for split, r in results.items():
            lines.append(f"  {split:<6} {r['examples']:>8,} {r['response_tokens']:>8,} {r['loss']:>8.4f} "
                         f"{math.exp(min(r['loss'], 50)):>10.2f}")
        return FinalReport(metrics, results, "\n".join(lines))


def instruction_prompt(spec: ExperimentSpec, tokenizer, instruction: str, input: str = "",
                       template: str | None = None) -> tuple[str, int | None]:
    """(the text a model reads before answering ``instruction``, the id that ends its answer or None).

    The template is ``template`` (a registered name), else the run's own, else the book's Alpaca
    format (a base language model asked before instruction tuning); the end-of-text id is the
    one the run trained with, else the tokenizer's.
    """
    registry = spec.registry
    ins = spec.instruction if spec.task == "instruction" else None
    if template is not None:
        built = registry.get("template", template).build(None)  # an unknown name: the registry's message
    elif ins is not None:
        built = build_template(spec)
    else:
        built = registry.get("template", InstructionSpec.model_fields["template"].default_factory().name).build(None)
    eos = ins.eot_id if ins is not None and ins.eot_id is not None else tokenizer.eot_id
    return built.text(built.prompt(instruction, input), ""), eos
