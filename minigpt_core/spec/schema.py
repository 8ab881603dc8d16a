"""The sections of an experiment spec: their fields, defaults, ranges and rules within a section.

This is the first pass of checking a spec (Pydantic); ``minigpt schema`` prints these models.
A new section declares its component slots with :func:`slot_field`; ``spec.resolution`` looks
them up.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping

from pydantic import Field, PrivateAttr, field_validator, model_validator

from .resolution import MODEL_SLOTS, ComponentSlot, _Resolvable, _Strict, slot_field


_slot = slot_field


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

    def _model_section(self) -> "ModelSpec":
        return self


class DataSpec(_Strict):
    """Where training tokens come from and how they are cut into samples."""

    source: ComponentSlot = slot_field("python-docs", "registered dataset that provides the text or tokens",
                                       kind="dataset")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of the token stream (split = \"documents\": of the documents) held out for validation")
    split_block: int = Field(4096, gt=0, description="tokens per block of the train/validation split; "
                             "blocks are assigned to validation evenly spaced, so the split is deterministic")
    split: Literal["blocks", "documents"] = Field(
        "blocks", description="how validation is held out: \"blocks\" (evenly spaced split_block-token blocks of "
        "the token stream) or \"documents\" (whole documents, chosen by a hash of their text and split_seed "
        "before tokenizing, so a tokenizer learnt from the text (char, bpe) never sees validation text)")
    split_seed: int = Field(0, ge=0, lt=2**32, description="split = \"documents\": seed of the hash that "
                            "chooses the validation documents (another seed, another validation set)")
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

    def _model_section(self) -> ModelSpec:
        return self.model

    def _compiles(self) -> bool:
        return self.train.compile
