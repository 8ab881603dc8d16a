"""Experiment specs: Pydantic models, presets, TOML files.

A spec is checked in two passes, both before anything is built:

1. structure (Pydantic): types, ranges, unknown keys, cross-field rules of the model;
2. components (:func:`resolve_components`): every slot names a registered
   component, its ``params`` validate against that component's own schema, and
   the component's own checks against the model section pass.

All problems come back as one :class:`~minigpt_core.base.errors.SpecError` whose
entries carry dotted paths such as ``model.attention.params.window``.

The second pass happens once: a parsed spec keeps its resolved components and the
registry they came from (``spec.components``, ``spec.registry``), and everything that
builds from a spec (model, tokenizer, data, checkpoints) reads them there instead of
taking a registry argument. A spec changed after parsing is resolved again, against
the same registry, the next time its components are asked for.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .base import toml as _toml
from .base.loader import get_registry, load_local_plugins, resolve_plugin_ref
from .base.errors import ComponentBuildError, MinigptError, SpecError
from .base.registry import ComponentEntry, ComponentRegistry

__all__ = [
    "ComponentSlot",
    "ModelSpec",
    "ExperimentSpec",
    "DataSpec",
    "TrainSpec",
    "WandbSpec",
    "FinetuneSpec",
    "ClassificationSpec",
    "InstructionSpec",
    "TASKS",
    "PRESETS",
    "FAST_COMPONENTS",
    "BOOK_COMPONENTS",
    "MODEL_SLOTS",
    "ResolvedComponent",
    "load_spec",
    "parse_spec",
    "spec_from_preset",
    "dump_spec",
    "resolve_components",
    "apply_overrides",
    "slot_field",
    "iter_slots",
    "spec_warnings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class _Resolution:
    registry: ComponentRegistry
    components: dict[str, "ResolvedComponent"]
    fingerprint: str  # the section's JSON when it was resolved: a changed section resolves again


class _Resolvable(_Strict):
    """A section with component slots that remembers, once resolved, its components and their registry."""

    _resolution: _Resolution | None = PrivateAttr(default=None)

    def resolve(self, registry: ComponentRegistry | None = None) -> Any:
        """Look the components up in ``registry`` (default: the process's) and return the spec itself.

        For a spec made in Python rather than parsed: ``build_model(ModelSpec(...).resolve(registry))``.
        """
        resolve_components(self, registry)
        return self

    @property
    def registry(self) -> ComponentRegistry:
        """The registry this spec was resolved against (the process default if it never was)."""
        if self._resolution is not None:
            return self._resolution.registry
        return get_registry()

    @property
    def components(self) -> dict[str, "ResolvedComponent"]:
        """Every slot's registry entry and validated params, keyed like :func:`resolve_components`."""
        r = self._resolution
        if r is None or r.fingerprint != self.model_dump_json():
            return resolve_components(self, self.registry)
        return r.components

    def __eq__(self, other: object) -> bool:
        # Two specs are equal when they say the same thing, resolved or not.
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  (mutable, like every pydantic model)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to worker processes and torchrun ranks without the registry (plugin modules, factories):
        # they resolve again against their own.
        state = super().__getstate__()
        if state.get("__pydantic_private__"):
            state["__pydantic_private__"] = {**state["__pydantic_private__"], "_resolution": None}
        return state

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        if self._resolution is not None:  # a copy shares the registry and entries, never copies them
            memo[id(self._resolution)] = self._resolution
        return super().__deepcopy__(memo)


class ComponentSlot(_Strict):
    """Which registered component fills a slot, and its own parameters."""

    name: str = Field(description="registered component name, e.g. 'book.multihead'")
    params: dict[str, Any] = Field(default_factory=dict, description="validated against the component's schema")


def slot_field(default_name: str, description: str, kind: str | None = None) -> Any:
    """A spec field naming a registered component of ``kind`` (default: the field's own name).

    Every such field, in any section, is looked up and its params validated by
    :func:`resolve_components`, so a new section only has to declare its slots.
    """
    return Field(default_factory=lambda: ComponentSlot(name=default_name), description=description,
                 json_schema_extra={"component_kind": kind} if kind else None)


_slot = slot_field

# Slots of the model section, in the order they are resolved and reported.
MODEL_SLOTS = ("attention", "norm", "activation", "feedforward", "positional", "block", "init")


class ModelSpec(_Resolvable):
    vocab_size: int = Field(50257, gt=0, description="number of token ids the embedding covers")
    context_length: int = Field(1024, gt=0, description="longest sequence the model attends over")
    emb_dim: int = Field(768, gt=0, description="width of the residual stream")
    n_heads: int = Field(12, gt=0, description="attention heads per layer")
    n_layers: int = Field(12, gt=0, description="transformer blocks")
    drop_rate: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after embeddings, on attention weights and residual branches")
    qkv_bias: bool = Field(False, description="bias terms in the query/key/value projections")
    tie_weights: bool = Field(False, description="share the token embedding with the output head")
    attention: ComponentSlot = _slot("book.multihead", "attention component")
    norm: ComponentSlot = _slot("book.layernorm", "normalisation component")
    activation: ComponentSlot = _slot("book.gelu", "activation used inside the feed-forward")
    feedforward: ComponentSlot = _slot("book.feedforward", "position-wise feed-forward component")
    positional: ComponentSlot = _slot("book.learned", "absolute positional embedding")
    block: ComponentSlot = _slot("book.pre_norm", "layout of a transformer block")
    init: ComponentSlot = _slot("book.pytorch_default", "parameter initialisation scheme")

    @model_validator(mode="before")
    @classmethod
    def _default_slot_names(cls, data: Any) -> Any:
        # `[model.norm.params] eps = 1e-6` alone tunes the default component instead of failing.
        if isinstance(data, Mapping):
            data = dict(data)
            for slot in MODEL_SLOTS:
                raw = data.get(slot)
                if isinstance(raw, Mapping) and "name" not in raw:
                    data[slot] = {"name": cls.model_fields[slot].default_factory().name, **raw}
        return data

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelSpec":
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) so every "
                f"head gets the same width; change one of them"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


class DataSpec(_Strict):
    """Where training tokens come from and how they are cut into samples."""

    source: ComponentSlot = slot_field("python-docs", "registered dataset that provides the text or tokens",
                                       kind="dataset")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of the token stream held out for validation")
    split_block: int = Field(4096, gt=0, description="tokens per block of the train/validation split; "
                             "blocks are assigned to validation evenly spaced, so the split is deterministic")
    max_length: int | None = Field(None, gt=0, description="tokens per training sample (default model.context_length)")
    stride: int | None = Field(None, gt=0, description="tokens between the starts of consecutive samples, as in "
                               "the book's sliding window (default max_length: no overlap)")
    shuffle: bool = Field(True, description="visit the samples of each epoch in a seeded random order")
    cache_dir: str | None = Field(None, description="where tokenized text is cached "
                                  "(default $MINIGPT_CACHE or ~/.cache/minigpt)")
    workers: int = Field(0, ge=0, description="processes that tokenize text in parallel (0: one per CPU)")


class TrainSpec(_Strict):
    """The optimisation loop: budget, batch, optimiser, schedule, precision, evaluation, checkpoints."""

    out_dir: str = Field("runs", description="runs are written to out_dir/<name>")
    max_steps: int | None = Field(1000, gt=0, description="optimizer steps (training stops at max_steps or "
                                  "max_tokens, whichever comes first)")
    max_tokens: int | None = Field(None, gt=0, description="training tokens budget")
    batch_size: int = Field(32, gt=0, description="sequences per optimizer step, over all processes and "
                            "accumulation steps")
    micro_batch_size: int | None = Field(None, gt=0, description="sequences per forward pass on each process "
                                         "(default batch_size / processes: no gradient accumulation)")
    lr: float = Field(6e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    min_lr: float | None = Field(None, ge=0, allow_inf_nan=False,
                                 description="learning rate at the end of the decay (default lr / 10)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of matrices (not biases, norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0: no clipping)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype (fp16 uses a "
                                                       "gradient scaler and needs a GPU)")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    compile: bool = Field(False, description="torch.compile the model")
    loss_chunk: int = Field(256, ge=0, description="tokens whose output-head logits and cross-entropy are "
                            "computed at once in the language-model loss (with their gradients, so the "
                            "full-vocabulary logits of a batch never exist together; 0: all at once)")
    activation_checkpointing: bool | Literal["blocks"] = Field(
        False, description="recompute each transformer block's activations in backward instead of keeping "
        "them (true or \"blocks\"): less memory for about a third more compute")
    deterministic: bool = Field(False, description="deterministic kernels only (bitwise-reproducible on CPU)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with several processes (torchrun): "
                                             "DistributedDataParallel or FSDP2 fully_shard")
    meta_init: bool = Field(False, description="FSDP: build the model on the meta device and initialise only each "
                            "process's shard (the weights of a whole build with the same seed)")
    sharded_checkpoint: bool = Field(False, description="FSDP: each process saves and resumes its own shard of "
                                     "the weights and optimizer state (nothing is gathered on one process)")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    log_every: int = Field(10, gt=0, description="log train metrics every N steps")
    eval_every: int = Field(200, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_batches: int = Field(10, gt=0, description="validation batches (of batch_size sequences) per evaluation")
    sample_every: int = Field(200, ge=0, description="generate a text sample every N steps (0: only at the end)")
    sample_prompt: str = Field("The", description="prompt of the generated samples")
    sample_tokens: int = Field(64, ge=0, description="tokens per generated sample (0: no samples)")
    sample_temperature: float = Field(0.8, ge=0, description="sampling temperature (0: greedy)")
    sample_top_k: int | None = Field(40, gt=0, description="sample among the k most likely tokens")
    log_attention_every: int | None = Field(None, gt=0, description="draw the attention maps of attention_prompt "
                                            "every N steps into RUN/attention/ and W&B (None: never)")
    attention_prompt: str | None = Field(None, description="text whose attention maps log_attention_every draws "
                                         "(default: sample_prompt)")
    save_every: int = Field(500, ge=0, description="write a checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept besides the best one")
    keep_best: bool = Field(True, description="also keep the checkpoint with the lowest validation loss")
    peak_flops: float | None = Field(None, gt=0, description="device peak FLOP/s for MFU (default: measured)")

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "TrainSpec":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}): each optimizer step accumulates whole micro-batches"
            )
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set a training budget: max_steps, max_tokens or both")
        return self

    @model_validator(mode="after")
    def _fsdp_options(self) -> "TrainSpec":
        for name in ("meta_init", "sharded_checkpoint"):
            if getattr(self, name) and self.strategy != "fsdp":
                raise ValueError(f"{name} shards the model with FSDP2: set strategy = \"fsdp\" too (and start "
                                 f"the run with torchrun), or drop {name}")
        return self


class WandbSpec(_Strict):
    """Weights & Biases run settings; WANDB_MODE in the environment overrides ``mode``."""

    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no account "
                                                           "(upload later with `wandb sync`)")
    project: str = Field("minigpt", description="W&B project")
    entity: str | None = Field(None, description="W&B user or team (default: the account's default)")
    group: str | None = Field(None, description="groups related runs, e.g. an ablation")
    job_type: str = Field("train", description="W&B job type")
    tags: list[str] = Field(default_factory=list, description="W&B tags")
    config: dict[str, Any] | None = Field(None, description="extra entries of the W&B run's config (an ablation "
                                          "records the cell's ablation, variant, seed and overrides here)")


class FinetuneSpec(_Strict):
    """Which parameters train, and an adapter (LoRA) applied to the model (minigpt_core.finetune)."""

    trainable: Literal["all", "none", "book"] | list[str] | None = Field(
        None, description="'all'; 'none' (only adapter and new-head parameters); 'book' (the book's recipe: the "
        "last block and the final norm); or shell-style patterns over parameter names, e.g. "
        "[\"final_norm.*\", \"trf_blocks.*.att.*\"] (default: 'all', or 'none' with an adapter)")
    adapter: ComponentSlot | None = Field(None, description="adapter component applied to the model by "
                                          "target-module patterns, e.g. book.lora or peft.lora (default: none)",
                                          json_schema_extra={"component_kind": "adapter"})

    @field_validator("trainable")
    @classmethod
    def _some_patterns(cls, value: Any) -> Any:
        if isinstance(value, list) and not (value and all(isinstance(p, str) and p.strip() for p in value)):
            raise ValueError("give at least one non-empty pattern, e.g. [\"final_norm.*\", \"trf_blocks.*.att.*\"]")
        return value


# Tasks an experiment can train for; each but "lm" has its own section named like it.
TASKS = ("lm", "classification", "instruction")


class ClassificationSpec(_Strict):
    """Fine-tuning for sequence classification (the book's chapter 6): labelled texts, a new class head."""

    path: str | None = Field(None, description="CSV, TSV or JSONL file of labelled texts (relative to the "
                             "working directory)")
    hf_dataset: str | None = Field(None, description="instead of path: a Hugging Face dataset name or local "
                                   "directory, read with datasets.load_dataset")
    hf_split: str = Field("train", description="the Hugging Face dataset's split to read (it is then split "
                          "again by `split`)")
    format: Literal["auto", "csv", "tsv", "jsonl"] = Field("auto", description="file format (auto: from the "
                                                           "file's extension: .csv, .tsv/.txt, .jsonl/.json)")
    header: bool = Field(True, description="the CSV/TSV file's first row names the columns; false for files "
                         "like the SMS Spam Collection (label<TAB>text), whose columns are then numbered 0, 1, ...")
    text_column: str | int = Field("text", description="column (name, or 0-based index without a header) "
                                   "holding the text")
    label_column: str | int = Field("label", description="column (name, or 0-based index without a header) "
                                    "holding the label")
    classes: list[str] | None = Field(None, description="the labels, in the order of the head's outputs "
                                      "(default: the sorted distinct labels of the data; a run stores them)")
    balance: Literal["none", "undersample"] = Field("none", description="undersample: keep as many examples of "
                                                    "each class as the rarest has (the book's spam set)")
    pooling: Literal["last", "mean"] = Field("last", description="which positions' outputs classify: the last "
                                             "(the book's) or the mean over the text's tokens")
    split: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="train / validation / test "
                                              "fractions of the shuffled examples (the book's 70/10/20)")
    split_seed: int = Field(123, ge=0, lt=2**32, description="seed of the shuffle before the split and of "
                            "the undersampling")
    max_length: int | None = Field(None, gt=0, description="tokens per example: longer texts are truncated, "
                                   "shorter ones padded (default: the longest training text, at most "
                                   "model.context_length; a run stores it)")
    pad_id: int | None = Field(None, ge=0, description="padding token id (default: the tokenizer's "
                               "end-of-text id, else 0)")
    _classes_from: str | None = PrivateAttr(default=None)  # the init_from classifier that fixed the classes

    @model_validator(mode="after")
    def _consistent(self) -> "ClassificationSpec":
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one data source: path = \"FILE.csv|tsv|jsonl\" or "
                             "hf_dataset = \"NAME_OR_DIR\"")
        if any(f < 0 for f in self.split) or self.split[0] <= 0 or self.split[1] <= 0 \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split {list(self.split)} must be three fractions (train, validation, test) "
                             f"that add up to 1, with train and validation above 0, e.g. [0.7, 0.1, 0.2]")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"classes {self.classes} must name at least 2 distinct labels")
        return self


class InstructionSpec(_Strict):
    """Instruction tuning (the book's chapter 7): Alpaca-format examples, a prompt template, response-only loss."""

    path: str = Field(description="JSON (a list) or JSONL file of examples with 'instruction', 'output' and "
                      "optionally 'input' fields, the Alpaca format (relative to the working directory)")
    template: ComponentSlot = slot_field("book.alpaca", "prompt template (a 'template' component) that formats "
                                         "an example's instruction and input into a prompt", kind="template")
    mask_prompt: bool = Field(True, description="leave the prompt's tokens out of the loss (-100 targets, the "
                              "book's exercise 7.2); false trains on them too (validation loss is on responses "
                              "either way)")
    split: tuple[float, float, float] = Field((0.85, 0.05, 0.1), description="train / validation / test "
                                              "fractions of the examples (the book's 85/5/10)")
    shuffle: bool = Field(True, description="shuffle the examples with split_seed before the split (false: "
                          "the file's order, as the book splits its file)")
    split_seed: int = Field(123, ge=0, lt=2**32, description="seed of the shuffle before the split")
    max_length: int | None = Field(None, gt=0, description="tokens a training example may have (prompt, "
                                   "response and end-of-text; longer ones are truncated); default the longest "
                                   "training example, at most model.context_length; a run stores it")
    eot_id: int | None = Field(None, ge=0, description="the end-of-text id that ends every response and pads "
                               "the batches (default: the tokenizer's; for a tokenizer without one, such as char, "
                               "the first id past its vocabulary, so model.vocab_size must exceed it); a run "
                               "stores it")

    @model_validator(mode="after")
    def _consistent(self) -> "InstructionSpec":
        if any(f < 0 for f in self.split) or self.split[0] <= 0 or self.split[1] <= 0 \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split {list(self.split)} must be three fractions (train, validation, test) "
                             f"that add up to 1, with train and validation above 0, e.g. [0.85, 0.05, 0.1]")
        return self


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


class ExperimentSpec(_Resolvable):
    name: str = Field("experiment", description="run name (also the W&B run name and the directory "
                      "train.out_dir/<name>): letters, digits, '.', '_' and '-', at most 100 characters")
    description: str = Field("", description="free text")
    preset: str | None = Field(None, description="preset this spec started from (informative once resolved)")
    # Below 2**63: torch and numpy take unsigned 64-bit seeds, and runs add ranks and steps to it.
    seed: int = Field(123, ge=0, lt=2**63, description="torch.manual_seed before the model is built")
    plugins: list[str] = Field(default_factory=list, description="plugins to load besides the installed ones: "
                               ".py files (relative to the experiment file; stored absolute in a run's spec) "
                               "or importable module names, e.g. [\"./my_attention.py\"]")
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: ComponentSlot = slot_field("gpt2", "tokenizer that turns text into token ids", kind="tokenizer")
    init_from: str | None = Field(None, description="start from these weights instead of the init scheme: "
                                  "'hf:PATH_OR_HUB_ID' (Hugging Face GPT-2) or a minigpt checkpoint directory")
    data: DataSpec = Field(default_factory=DataSpec)
    task: Literal["lm", "classification", "instruction"] = Field(
        "lm", description="what the model is trained for: lm (next token), classification (a [classification] "
        "section) or instruction (an [instruction] section)")
    classification: ClassificationSpec | None = Field(None, description="the classification task's data and head")
    instruction: InstructionSpec | None = Field(None, description="the instruction task's data and template")
    train: TrainSpec = Field(default_factory=TrainSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        # The name is a directory under train.out_dir: no separators, no '..', nothing hidden.
        if not _NAME.fullmatch(name):
            shown = name if len(name) <= 40 else name[:40] + f"... ({len(name)} characters)"
            raise ValueError(f"{shown!r} is not a valid experiment name: use 1 to 100 letters, digits, '.', '_' "
                             f"or '-', not starting with '.' (it names the directory train.out_dir/<name>)")
        return name


_GPT2_BOOK = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}

# GPT-2's function on PyTorch's fused kernels (F.layer_norm, tanh GELU, scaled_dot_product_attention):
# the same parameters, created in the same order, so a seed gives the same weights as the book's classes.
FAST_COMPONENTS: dict[str, dict[str, Any]] = {
    "attention": {"name": "torch.sdpa"}, "norm": {"name": "torch.layernorm"}, "activation": {"name": "torch.gelu_tanh"},
}
# The book's own classes for the same slots (book-* presets, `minigpt import-hf --book`).
BOOK_COMPONENTS: dict[str, dict[str, Any]] = {
    "attention": {"name": "book.multihead"}, "norm": {"name": "book.layernorm"}, "activation": {"name": "book.gelu"},
}
_GPT2_SHAPES = {
    "gpt2-124m": {"emb_dim": 768, "n_heads": 12, "n_layers": 12},
    "gpt2-medium": {"emb_dim": 1024, "n_heads": 16, "n_layers": 24},
    "gpt2-large": {"emb_dim": 1280, "n_heads": 20, "n_layers": 36},
    "gpt2-xl": {"emb_dim": 1600, "n_heads": 25, "n_layers": 48},
}

# Model sections of the presets; a file's [model] table overrides them field by field.
# gpt2-*: the fastest exact recipe; book-gpt2-*: the book's classes (its parity and tutorials).
PRESETS: dict[str, dict[str, Any]] = {
    **{name: {**_GPT2_BOOK, **shape, **FAST_COMPONENTS} for name, shape in _GPT2_SHAPES.items()},
    **{f"book-{name}": {**_GPT2_BOOK, **shape} for name, shape in _GPT2_SHAPES.items()},
    # Trains in minutes on a laptop CPU; the vocabulary is GPT-2's so the gpt2 tokenizer works.
    # Tied weights need GPT-2's small-std init: PyTorch's N(0, 1) embedding as the output head
    # starts the loss near 80 nats instead of ln(vocab) ~ 10.8. The book's components: the
    # tutorials' and tests' model (experiments/quickstart.toml picks the fast ones).
    "tiny": {**_GPT2_BOOK, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
             "drop_rate": 0.0, "tie_weights": True, "init": {"name": "gpt2.normal"}},
}


@dataclass(frozen=True)
class ResolvedComponent:
    """A slot after lookup: the registry entry and its validated params."""

    slot: str
    entry: ComponentEntry
    params: BaseModel

    def build(self, ctx: Any) -> Any:
        try:
            return self.entry.factory(ctx, self.params)
        except (MinigptError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a plugin's factory failed: name it instead of a raw traceback
            e = self.entry
            raise ComponentBuildError(
                f"The {e.kind} component '{e.name}' (plugin {e.source}) raised while building the "
                f"model: {type(exc).__name__}: {exc}. Its params were {self.params.model_dump()}; check them "
                f"against `minigpt components {e.kind} {e.name}`, or report it to the plugin's authors."
            ) from exc


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at ``loc`` (the parent of an unknown key), or [] if not a spec section."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _problems(err: ValidationError, prefix: tuple[Any, ...] = (),
              model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    import difflib

    out = []
    for e in err.errors():
        reason = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            loc = tuple(e["loc"])
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(model, loc[:-1]), n=1) if model else []
            hint = f"did you mean '{_path(prefix + loc[:-1] + (close[0],))}'? " if close else "misspelt? "
            reason = f"unknown field ({hint}`minigpt schema` lists every field)"
        out.append((_path(prefix + tuple(e["loc"])), reason))
    return out


def _cross_section_problems(spec: "ExperimentSpec") -> list[tuple[str, str]]:
    """Rules between sections, checked at validation so `validate` catches what `train` would refuse."""
    problems = []
    d, m = spec.data, spec.model
    # Each task with a section of its own: the section is needed by that task and read by no other.
    for task, needs in (("classification", "a [classification] section naming the labelled data, e.g. "
                                           "path = \"data.tsv\""),
                        ("instruction", "an [instruction] section naming the examples, e.g. path = \"alpaca.json\"")):
        section = getattr(spec, task)
        if spec.task == task and section is None:
            problems.append((task, f"task = \"{task}\" needs {needs} (docs/finetune.md)"))
        if spec.task != task and section is not None:
            problems.append(("task", f"the [{task}] section is only read with task = \"{task}\" "
                             f"(now {spec.task!r}): set the task or remove the section"))
    if d.max_length is not None and d.max_length > m.context_length and spec.init_from is None:
        problems.append(("data.max_length", f"{d.max_length} exceeds model.context_length ({m.context_length}); "
                         f"the model cannot attend over longer samples: lower data.max_length or raise "
                         f"model.context_length"))
    return problems


def attention_weights_message(attention: str, registry=None) -> str:
    """Why ``attention`` gives no weights, and which registered attentions can."""
    registry = registry or get_registry()
    able = [e.name for e in registry.entries("attention") if e.has("attn_weights")]
    return (f"attention '{attention}' does not declare the attn_weights capability, so it cannot return its "
            f"attention weights (fused kernels compute none). Attentions that can: {', '.join(able) or 'none'}. "
            f"Train or load a model with one of them (`minigpt components attention` lists them).")


def describe_components(model) -> str:
    """Every component slot of a model section, for the one-line descriptions of validate and train."""
    return ", ".join(f"{slot} {getattr(model, slot).name}" for slot in MODEL_SLOTS)


def spec_warnings(spec: "ExperimentSpec", total_steps: int | None = None) -> list[str]:
    """Settings that are valid but almost certainly not what was meant (printed by validate and train)."""
    out = []
    t = spec.train
    steps = total_steps if total_steps is not None else t.max_steps
    if steps is not None and t.warmup_steps > steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) is longer than the run ({steps} steps): the learning "
                   f"rate never reaches its peak train.lr ({t.lr:g}); lower train.warmup_steps")
    components = spec.model.components
    att, pos = components["attention"].entry, components["positional"].entry
    if t.log_attention_every and not att.has("attn_weights"):
        out.append(f"train.log_attention_every is set, but no attention maps will be drawn: "
                   f"{attention_weights_message(att.name, spec.registry)}")
    if att.has("positions") and pos.has("absolute"):
        out.append(f"attention '{att.name}' encodes positions itself, and positional '{pos.name}' adds "
                   f"absolute position embeddings on top: the model gets positions twice. Set "
                   f"[model.positional] name = \"modern.none\" unless that is the experiment")
    return out


def parse_spec(data: Mapping[str, Any], source: str | None = None,
               registry: ComponentRegistry | None = None) -> ExperimentSpec:
    """Validate a raw mapping (a parsed TOML file) into a spec, applying its preset first."""
    data = dict(data)
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise SpecError([("preset", f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")], source)
        model = data.get("model", {})
        if not isinstance(model, Mapping):
            raise SpecError([("model", "must be a table")], source)
        data["model"] = _deep_merge(PRESETS[preset], model)
    if data.get("plugins"):  # before validation: the components the spec names may come from them
        data["plugins"] = _load_spec_plugins(data["plugins"], source, registry)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems(err, model=ExperimentSpec), source) from None
    problems = _cross_section_problems(spec)
    if problems:
        raise SpecError(problems, source)
    resolved = resolve_components(spec, registry, source=source)
    if _record_local_plugins(spec, resolved):
        spec._resolution = replace(spec._resolution, fingerprint=spec.model_dump_json())
    return spec


def _load_spec_plugins(refs: Any, source: str | None, registry: ComponentRegistry | None) -> list[str]:
    if not (isinstance(refs, list) and all(isinstance(r, str) and r.strip() for r in refs)):
        raise SpecError([("plugins", "must be a list of plugin .py file paths or module names, e.g. "
                          "plugins = [\"./my_attention.py\", \"my_package.plugin\"]")], source)
    # A file's relative paths were made absolute by load_spec; elsewhere they are relative to the cwd.
    refs = list(dict.fromkeys(resolve_plugin_ref(r) for r in refs))
    load_local_plugins(refs, registry, where=f"plugins in {source}" if source else "the spec's plugins")
    return refs


def _record_local_plugins(spec: ExperimentSpec, resolved: Mapping[str, ResolvedComponent]) -> bool:
    """List in the spec the local plugins (--plugin, MINIGPT_PLUGIN_PATH) its components come from,
    so a run's spec.toml alone finds them again (`minigpt sample RUN` from any directory)."""
    local = {p.name: p.local_ref for p in spec.registry.plugins if p.local_ref}
    needed = [local[r.entry.plugin] for r in resolved.values() if r.entry.plugin in local]
    missing = [r for r in dict.fromkeys(needed) if r not in spec.plugins]
    if missing:
        spec.plugins = [*spec.plugins, *missing]
    return bool(missing)


def load_spec(path: str | Path, registry: ComponentRegistry | None = None,
              overrides: list[str] | None = None) -> ExperimentSpec:
    """Read, merge (preset, then ``--set key=value`` overrides) and fully validate a TOML spec."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("<file>", f"no such experiment file: {path}")]) from None
    except IsADirectoryError:
        raise SpecError([("<file>", f"{path} is a directory; give the experiment's TOML file")]) from None
    except OSError as exc:
        raise SpecError([("<file>", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([("<file>", f"{path} is not a text file (byte {exc.start} is not UTF-8); an experiment "
                          f"file is TOML text, e.g. experiments/tiny.toml")]) from None
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise SpecError([("<file>", f"not valid TOML: {exc}")], str(path)) from None
    if overrides:
        data = apply_overrides(data, overrides)
    if isinstance(data.get("plugins"), list):  # relative to the experiment file, wherever it is run from
        data["plugins"] = [resolve_plugin_ref(r, path.parent) if isinstance(r, str) else r
                           for r in data["plugins"]]
    if not data:
        import warnings

        warnings.warn(f"{path} sets nothing: it is the default experiment (the gpt2-124m shape, 163M "
                      f"parameters, on the python-docs dataset); start from experiments/tiny.toml for a "
                      f"model that trains in minutes", stacklevel=2)
    return parse_spec(data, source=str(path), registry=registry)


def spec_from_preset(preset: str, registry: ComponentRegistry | None = None, **sections: Any) -> ExperimentSpec:
    """Python counterpart of a TOML file: ``spec_from_preset("tiny", model={"n_layers": 2})``."""
    return parse_spec({"preset": preset, "name": preset, **sections}, registry=registry)


def dump_spec(spec: ExperimentSpec) -> str:
    """The resolved spec as TOML; ``parse_spec(loads(dump_spec(s))) == s``."""
    data = spec.model_dump(mode="json", exclude_none=True)
    if not data.get("plugins"):
        data.pop("plugins", None)  # specs without local plugins stay as they were
    if not data.get("finetune"):
        data.pop("finetune", None)  # nor do specs that fine-tune nothing
    if data.get("task") == "lm":
        data.pop("task")  # language-model runs' spec.toml stay as they were
    return _toml.dumps(data)


def _parse_scalar(text: str) -> Any:
    try:
        return _toml.loads(f"v = {text}")["v"]
    except _toml.TOMLDecodeError:
        return text  # a bare word is a string: --set model.attention.name=book.multihead


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as TOML, else as strings)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError([(item, "an override must look like section.field=value, e.g. model.n_layers=4")])
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError([(key, f"'{p}' is a value, not a table")])
        node[parts[-1]] = _parse_scalar(raw.strip())
    return out


def iter_slots(node: BaseModel, prefix: tuple[str, ...] = ()):
    """Yield (path, kind, slot) for every ComponentSlot field in a spec, depth first."""
    for fname, finfo in type(node).model_fields.items():
        value = getattr(node, fname)
        if isinstance(value, ComponentSlot):
            extra = finfo.json_schema_extra if isinstance(finfo.json_schema_extra, dict) else {}
            yield prefix + (fname,), extra.get("component_kind") or fname, value
        elif isinstance(value, BaseModel):
            yield from iter_slots(value, prefix + (fname,))


def compile_refusal(entry: ComponentEntry) -> str:
    """Why a spec with train.compile = true cannot use ``entry`` (which declares ``not_compilable``)."""
    return (f"'{entry.name}' cannot be compiled with torch.compile: {entry.not_compilable}. Set "
            f"train.compile = false, or choose another {entry.kind} component")


def resolve_components(spec: ExperimentSpec | ModelSpec, registry: ComponentRegistry | None = None,
                       source: str | None = None, *, entries: Mapping[tuple[str, str], ComponentEntry] | None = None,
                       for_lm: bool = True) -> dict[str, ResolvedComponent]:
    """Look up every slot of the spec and validate its params; raise one SpecError with all problems.

    Returns the resolved slots keyed by dotted path without the ``model.`` prefix
    (``attention``, ``norm``, ... ``tokenizer``, ``data.source``) and stores them on the spec
    (``spec.components``, ``spec.registry``). A bare model section resolves only its own slots,
    so it needs no tokenizer or dataset plugin. ``entries`` stand in for registry lookups (the
    conformance checks' component under test); ``for_lm=False`` lets through components that
    declare they cannot serve in a language model.
    """
    registry = registry or get_registry()
    is_model = isinstance(spec, ModelSpec)
    model = spec if is_model else spec.model
    problems: list[tuple[str, str]] = []
    resolved: dict[str, ResolvedComponent] = {}
    for path, kind, chosen in iter_slots(spec, ("model",) if is_model else ()):
        key = ".".join(path[1:] if path[0] == "model" else path)
        entry = (entries or {}).get((kind, chosen.name))
        if entry is None:
            if (kind, chosen.name) not in registry:
                problems.append((_path(path + ("name",)), registry.unknown_message(kind, chosen.name)))
                continue
            entry = registry.get(kind, chosen.name)
        try:
            params = entry.make_params(chosen.params)
        except ValidationError as err:
            problems += _problems(err, path + ("params",))
            continue
        if entry.not_for_lm and for_lm:
            problems.append((_path(path + ("name",)),
                             f"'{entry.name}' cannot be used in a language model: {entry.not_for_lm}"))
            continue
        if entry.not_compilable and not is_model and spec.train.compile:
            problems.append((_path(path + ("name",)), compile_refusal(entry)))
            continue
        if entry.check is not None:
            try:
                entry.check(model, params)
            except ValueError as exc:
                problems.append((_path(path), f"{entry.name}: {exc}"))
                continue
        resolved[key] = ResolvedComponent(key, entry, params)
    if problems:
        raise SpecError(problems, source)
    spec._resolution = _Resolution(registry, resolved, spec.model_dump_json())
    if not is_model:  # the model section alone (build_model(spec.model)) reuses the same lookups
        own = {k: v for k, v in resolved.items() if k in MODEL_SLOTS}
        spec.model._resolution = _Resolution(registry, own, spec.model.model_dump_json())
    return resolved
