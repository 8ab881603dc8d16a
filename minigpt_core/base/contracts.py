"""Layer 1 (base): the contracts of components, as protocols and capabilities.

What a factory of each kind returns (a protocol per kind), the optional parts of those contracts
(:class:`AuxLossProtocol`, :class:`CanonicalStateProtocol`, :class:`HFFilesProtocol`,
:class:`ActivationCheckpointingProtocol`: runtime-checkable, tested with ``isinstance``) and the
capabilities a component may declare. ``minigpt_core.plugin`` re-exports all of it; the registry
takes its kinds and capabilities from here. Imports nothing of minigpt_core but the base layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # annotations only: the registry, the loader and `minigpt --help` must not import torch
    from torch import Tensor, nn

__all__ = [
    "Params", "Factory", "Tokenizer",
    "AttentionProtocol", "NormProtocol", "ActivationProtocol", "FeedForwardProtocol", "PositionalProtocol",
    "BlockProtocol", "InitProtocol", "TokenizerProtocol", "DatasetProtocol", "WeightsProtocol",
    "AdapterProtocol", "TemplateProtocol", "KIND_PROTOCOLS", "KINDS",
    "Capability", "CAPABILITY_CONTRACTS", "CAPABILITIES",
    "CanonicalStateProtocol", "CanonicalStateSource", "AuxLossProtocol", "HFFilesProtocol", "ActivationCheckpointingProtocol",
]

_C = TypeVar("_C", covariant=True)


class Params(BaseModel):
    """Base class of a component's params: unknown (misspelt) fields are refused.

    Subclass it and declare fields with defaults and constraints (``pydantic.Field(4, gt=0,
    description=...)``); the descriptions appear in ``minigpt components``. An experiment file's
    ``[model.attention.params]`` table is validated against it before anything is built, and the
    factory receives the validated instance. Any pydantic model with ``extra="forbid"`` will do;
    ``registry.add`` refuses one that would silently drop a misspelt field.
    """

    model_config = ConfigDict(extra="forbid")


class Factory(Protocol[_C]):
    """What ``registry.add(kind, name, factory, ...)`` takes: ``factory(ctx, params) -> component``.

    ``ctx`` is a :class:`BuildContext` for the model kinds (attention, norm, activation,
    feedforward, positional, block, init), a :class:`TokenizerContext` for ``tokenizer`` and a
    :class:`DataContext` for ``dataset``; ``params`` is the validated instance of the entry's
    params model (:class:`Params`; an empty one when the entry declares none). A model part's
    factory runs every time the part is built (each block builds its own attention and norms;
    ``ctx.layer_idx`` says which block), so it must return a new module each call. Refuse a
    combination of settings that cannot work with ``check=`` (see :meth:`Registrar.add`), which
    reports it when the spec is validated, before anything is built.
    """

    def __call__(self, ctx: Any, params: Any, /) -> _C: ...


@runtime_checkable
class Tokenizer(Protocol):
    name: str  # registry name, e.g. "gpt2"
    n_vocab: int  # ids are 0 .. n_vocab - 1
    eot_id: int | None  # <|endoftext|>, or None if the tokenizer has no such token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable; ``tokenizer_from_state(tok.state())`` rebuilds the same tokenizer."""
        ...


# -- the kinds ------------------------------------------------------------------------------------
# The first line of each protocol's docstring is the kind's one-line summary (KINDS).
class AttentionProtocol(Protocol):
    """nn.Module: (B, T, C) -> (B, T, C); forward(x, kv_cache=None) if it declares kv_cache.

    ``attention`` kind. The factory gets a :class:`BuildContext` (``ctx.emb_dim``, ``ctx.n_heads``,
    ``ctx.head_dim``, ``ctx.context_length``, ``ctx.drop_rate``, ``ctx.qkv_bias``, ``ctx.layer_idx``)
    and returns a new module that mixes information across positions. Keyword arguments beyond
    ``x`` are needed only with the matching capability: ``kv_cache`` with ``kv_cache`` (the block
    passes it only then), ``return_weights`` with ``attn_weights``. Declare ``causal`` if position
    t sees only positions <= t: a language model needs it, and the conformance checks verify it.
    Write the layer that adds its output back to the residual stream with
    :func:`mark_residual_projection` so initialisation schemes can scale it.
    """

    def forward(self, x: Tensor, kv_cache: Any = None,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...


class NormProtocol(Protocol):
    """nn.Module: (..., C) -> (..., C).

    ``norm`` kind. The factory gets a :class:`BuildContext` and normalises over the last
    dimension, ``ctx.emb_dim`` wide. Each block builds its own norms (``ctx.build("norm")``) and the
    model builds one more before the output head; each call must return a new module.
    """

    def forward(self, x: Tensor) -> Tensor: ...


class ActivationProtocol(Protocol):
    """nn.Module applied elementwise.

    ``activation`` kind. The factory gets a :class:`BuildContext`; the module maps a tensor to one
    of the same shape and dtype, element by element. Feed-forwards build it with
    ``ctx.build("activation")``; a gated feed-forward may fix its own gate function instead (say so
    in its description).
    """

    def forward(self, x: Tensor) -> Tensor: ...


class FeedForwardProtocol(Protocol):
    """nn.Module: (B, T, C) -> (B, T, C); builds its activation with ctx.build('activation').

    ``feedforward`` kind. The factory gets a :class:`BuildContext` and returns the position-wise
    network of a block. Mark its output projection with :func:`mark_residual_projection`. A module
    that adds a training loss (a mixture of experts' load balancing) follows
    :class:`AuxLossProtocol`.
    """

    def forward(self, x: Tensor) -> Tensor: ...


class PositionalProtocol(Protocol):
    """nn.Module: positions (T,) -> (T, C) added to token embeddings, or None for no absolute positions.

    ``positional`` kind. The factory gets a :class:`BuildContext` and returns a module called once
    per forward pass with the absolute positions ``torch.arange(start, start + T)`` (``start`` > 0
    while decoding with a KV cache, so row p must not depend on where the call starts), or
    ``None`` when the attention encodes positions itself (declare ``absolute`` on a module that
    adds absolute positions, so the spec warns when it is paired with a ``positions`` attention).
    """

    def forward(self, positions: Tensor) -> Tensor: ...


class BlockProtocol(Protocol):
    """nn.Module: (B, T, C) -> (B, T, C); a transformer layer built from the other slots.

    ``block`` kind. The factory gets a :class:`BuildContext` for its layer (``ctx.layer_idx``) and
    builds its parts with ``ctx.build("attention")``, ``ctx.build("feedforward")`` and
    ``ctx.build("norm")``, in a fixed order (a seed then gives the same weights). ``forward``
    takes ``kv_cache`` (a :class:`LayerKVCache`, or None) and passes it on as
    ``att(h, kv_cache=kv_cache)`` only when it is not None, so attentions without a cache need not
    accept the keyword. :class:`TransformerBlock` (the book's pre-norm block) is the reference;
    subclass it to rearrange its parts.
    """

    def forward(self, x: Tensor, kv_cache: Any = None) -> Tensor: ...


class InitProtocol(Protocol):
    """callable(model) that initialises the parameters of a freshly built model in place.

    ``init`` kind. The factory gets a :class:`BuildContext` and returns a function, which the model
    calls once, after building every part, with torch's random state seeded from ``spec.seed``: it
    must draw from torch's generator only, so the same seed gives the same weights. Find the layers
    that write to the residual stream with :func:`is_residual_projection`.
    """

    def __call__(self, model: nn.Module, /) -> None: ...


@runtime_checkable
class TokenizerProtocol(Tokenizer, Protocol):
    """object with encode(text) -> list[int], decode(ids) -> str, n_vocab, eot_id.

    ``tokenizer`` kind. The factory gets a :class:`TokenizerContext`, whose ``training_text`` is
    the training text (for a tokenizer that learns its vocabulary from it) and whose ``state`` is
    a saved ``state()`` to rebuild exactly the tokenizer a run used; params are the entry's.
    ``name`` is the registry name; ids run over ``0 .. n_vocab - 1``; ``eot_id`` is the
    end-of-text id (or None); ``decode(encode(text)) == text``; ``state()`` is JSON-serialisable,
    holds ``{"name": ..., "params": {...}}`` and whatever else rebuilding needs. Raise
    :class:`TokenizerError` for files that are missing or text that cannot be encoded. A
    ``check=`` should refuse a ``model.vocab_size`` smaller than ``n_vocab``. Optionally,
    ``hf_files(context_length) -> {filename: bytes}`` gives the Hugging Face tokenizer files that
    ``minigpt export-hf`` writes beside the weights (None or absent: the export warns it has none).
    """

    name: str
    n_vocab: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def state(self) -> dict[str, Any]: ...


@runtime_checkable
class DatasetProtocol(Protocol):
    """object that yields text or token streams for training.

    ``dataset`` kind. The factory gets a :class:`DataContext` (``ctx.cache_dir``, for derived
    files) and returns a :class:`TextSource` (documents, which the run tokenizes and caches as
    shards; implement ``fingerprint()``, which must change when the content does, and
    ``documents()``, in a fixed order) or a :class:`TokenSource` (already tokenized shards:
    implement ``open() -> ShardSet``, usually with :func:`open_shards`). Building must be cheap and
    must not read everything: reading happens when the run asks. Raise :class:`DataError` with
    what to fix when the data cannot be read.
    """

    def describe(self) -> str: ...


@runtime_checkable
class WeightsProtocol(Protocol):
    """object that reads and writes another library's checkpoints of a model type (Hugging Face GPT-2).

    ``weights`` kind. The factory gets no context (``None``) and the entry's params. The core does
    the files (a Hugging Face directory: ``config.json`` plus safetensors or a weights-only
    ``pytorch_model.bin``; the Hub download; atomic writes) and the spec; the format does the
    names. ``minigpt import-hf`` and ``init_from = "hf:..."`` pick the format whose ``model_type``
    is the config's; ``minigpt export-hf`` uses ``gpt2.hf`` unless told otherwise.

    - ``model_section(config) -> dict``: the spec's ``[model]`` table for a ``config.json``; raise
      :class:`PretrainedError` saying why a config is not one this format reads;
    - ``check(components, *, export)``: raise :class:`PretrainedError` naming the slot (``model.attention:
      ...``) whose component cannot hold (import) or express (export) these weights; ``components``
      is ``spec.components`` (slot -> resolved entry and params);
    - ``load_state(model, state, source)``: copy a checkpoint's tensors (its own names) into a built
      model; raise :class:`CheckpointError` for tensors that are missing, extra or misshapen;
    - ``state(model) -> dict[str, Tensor]``: the model's weights under the format's names;
    - ``config(model) -> dict``: the ``config.json`` to write beside them;
    - ``transfer(source_model, target_model, where)``: copy the weights of one model into another
      whose attention differs (``init_from`` a checkpoint with another attention), through the
      format's canonical layout.

    Components map their own weights: an attention or block whose parameters are not laid out
    like the book's implements :class:`CanonicalStateProtocol`.
    """

    model_type: str

    def model_section(self, config: Any) -> dict[str, Any]: ...

    def check(self, components: Any, *, export: bool) -> None: ...

    def load_state(self, model: nn.Module, state: Any, source: str) -> None: ...

    def state(self, model: nn.Module) -> dict[str, Tensor]: ...

    def config(self, model: nn.Module) -> dict[str, Any]: ...

    def transfer(self, source_model: nn.Module, target_model: nn.Module, where: str) -> None: ...


@runtime_checkable
class AdapterProtocol(Protocol):
    """object that applies itself to a built model by target-module patterns, and merges into its weights.

    ``adapter`` kind (``[finetune.adapter]`` of an experiment file). The factory gets a
    :class:`BuildContext` of the model section and the entry's params (target patterns among them,
    matched with :func:`match_modules`), and returns a new object each call:

    - ``apply(model) -> list[str]``: wrap the targeted modules of a built GPT in place and return
      their names; the output must not change (a LoRA's B starts at zero). Mark the new modules
      with :func:`mark_trainable`, so they train however ``[finetune] trainable`` freezes the
      base. Raise ValueError (or :class:`MinigptError`) saying what to change when a pattern
      matches nothing or a target cannot be adapted (a head tied to the embedding);
    - ``merge(model)`` / ``unmerge(model)``: fold the adapter into the base weights (the output
      unchanged within 1e-5) and take it out again;
    - ``unload(model)``: merge and remove the adapter for good: the model's state dict then has
      exactly the base model's keys (``export-hf``, ``init_from`` a fine-tuned checkpoint);
    - ``parameter_count(model) -> int``: how many parameters ``apply`` adds to this (unadapted)
      model, from the shapes of its targets (the ``adapter_trainable`` check compares).

    The conformance checks ``adapter_identity``, ``adapter_trainable`` and ``adapter_merge`` hold
    every adapter to this.
    """

    def apply(self, model: nn.Module) -> list[str]: ...

    def merge(self, model: nn.Module) -> None: ...

    def unmerge(self, model: nn.Module) -> None: ...

    def unload(self, model: nn.Module) -> None: ...

    def parameter_count(self, model: nn.Module) -> int: ...


@runtime_checkable
class TemplateProtocol(Protocol):
    """object that formats an instruction (and its input) into a prompt, and a prompt and a response into a text.

    ``template`` kind (``[instruction.template]`` of an experiment file, ``task = "instruction"``).
    The factory gets no context (``None``) and the entry's params. The book's Alpaca format is
    ``book.alpaca``; a chat format (``book.phi3``) is another entry of the same kind.

    - ``prompt(instruction, input) -> str``: what the model reads before the response (``input``
      is ``""`` when an example has none). With ``mask_prompt`` its tokens are not trained on;
    - ``text(prompt, output) -> str``: the training text, which must be ``text(prompt, "") +
      output``: whatever separates the prompt from the response (``"\n\n### Response:\n"``)
      comes between them. ``text(prompt, "")`` is what ``minigpt sample --instruction`` feeds the
      model, so the model writes only the response, which the end-of-text token ends.

    The conformance check ``template_format`` holds every template to this.
    """

    def prompt(self, instruction: str, input: str) -> str: ...

    def text(self, prompt: str, output: str) -> str: ...


KIND_PROTOCOLS: dict[str, type] = {
    "attention": AttentionProtocol,
    "norm": NormProtocol,
    "activation": ActivationProtocol,
    "feedforward": FeedForwardProtocol,
    "positional": PositionalProtocol,
    "block": BlockProtocol,
    "init": InitProtocol,
    "tokenizer": TokenizerProtocol,
    "dataset": DatasetProtocol,
    "weights": WeightsProtocol,
    "adapter": AdapterProtocol,
    "template": TemplateProtocol,
}


def _summary(obj: Any) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0].rstrip(".")


# kind -> one line (minigpt_core.base.registry.KINDS is this dict).
KINDS: dict[str, str] = {kind: _summary(proto) for kind, proto in KIND_PROTOCOLS.items()}


# -- the capabilities ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Capability:
    """A property a component declares with ``capabilities={...}``, and what declaring it obliges.

    ``summary`` is the one line of ``CAPABILITIES``; ``kinds`` the kinds it is meant for;
    ``obliges`` what the component must implement; ``relied_on_by`` what in minigpt uses it;
    ``checks`` the conformance checks (``minigpt check``) that hold a component declaring it to it.
    Attentions declare ``causal`` and ``kv_cache``; other kinds need not: the ``causality`` check
    runs on every norm, activation, feed-forward and block too (they must not let a position see
    later ones), and the ``kv_cache`` check on every block (it must pass its cache on).
    """

    name: str
    summary: str
    kinds: tuple[str, ...]
    obliges: str
    relied_on_by: str
    checks: tuple[str, ...] = ()


@runtime_checkable
class CanonicalStateSource(Protocol):
    """The read half of :class:`CanonicalStateProtocol`: a module that gives its weights under the canonical names.

    Export and the equivalence check need only this half.
    """

    def canonical_state(self) -> dict[str, Tensor]:
        """Its weights under the canonical names ("W_query.weight", ..., "out_proj.bias")."""
        ...


@runtime_checkable
class CanonicalStateProtocol(CanonicalStateSource, Protocol):
    """The weight-layout hook of a ``gpt2`` attention that does not store the canonical layout.

    The canonical layout of one attention layer is the book's: ``W_query``, ``W_key``, ``W_value``
    and ``out_proj``, each an ``nn.Linear``-shaped ``.weight`` (C, C) (out, in) and ``.bias`` when
    present (``CANONICAL_ATTENTION_KEYS``). An attention whose state dict already has those names
    needs nothing more; one that stores them differently (a fused QKV matrix,
    ``torch.nn.MultiheadAttention``) implements these two methods, and Hugging Face import/export,
    ``init_from`` and the equivalence check then work with it unchanged.

    A ``gpt2`` block may implement them too, for the whole block, under the names the ``gpt2.hf``
    weights component documents (``help(minigpt_gpt2.hf)``). A block without them is mapped
    through its ``att`` attribute and its own state dict.
    """

    def load_canonical_state(self, state: dict[str, Tensor]) -> None:
        """Copy weights given under the canonical names into its own parameters (in place)."""
        ...


@runtime_checkable
class AuxLossProtocol(Protocol):
    """A module that adds a training loss: sets ``self.aux_loss`` (a scalar tensor, or None) in forward.

    No capability to declare: the model finds every sub-module with an ``aux_loss`` attribute once,
    when it is built, and the trainer adds their sum (``GPT.aux_loss()``) to the language-model
    loss of the same forward pass. Set it to ``None`` in ``__init__`` and to a fresh, weighted
    tensor (with its graph) on every forward; the ``gradients`` and ``trains`` checks include it.
    """

    aux_loss: Tensor | None


_CAPABILITY_LIST = (
    Capability(
        "causal", "output at position t depends only on inputs at positions <= t", ("attention",),
        obliges="no information flows from later positions to earlier ones (a causal mask), at any "
                "sequence length up to ctx.context_length",
        relied_on_by="language models: without it a model learns to copy the next token; attentions "
                     "that lack it must say so with not_for_lm=",
        checks=("causality",)),
    Capability(
        "kv_cache", "forward(x, kv_cache=cache) decodes incrementally with a key/value cache", ("attention",),
        obliges="forward(x, kv_cache=None, ...): with a LayerKVCache, x holds only the new positions; "
                "cache.length before the call is the absolute position of x[:, 0]; call "
                "k, v = cache.append(k, v) once with the new (B, H_kv, T_new, D) keys and values and "
                "attend over the returned keys/values of every position so far; sub-modules with "
                "caches of their own use cache.child(i). The outputs must equal the full forward pass's",
        relied_on_by="GPT.new_kv_cache and generation (minigpt sample, generate()), which without it "
                     "recomputes the whole prefix for every new token",
        checks=("kv_cache", "generate_cached")),
    Capability(
        "attn_weights", "forward(x, return_weights=True) also returns (B, H, T, T) attention weights",
        ("attention",),
        obliges="forward(x, return_weights=True) returns (output, weights): the same output and the "
                "(B, H, T, T_keys) softmax weights, rows summing to 1, zero above the diagonal if causal",
        relied_on_by="attention visualisation and analysis code",
        checks=("attention_weights",)),
    Capability(
        "gpt2", "weights map one-to-one onto Hugging Face GPT-2 (import/export)",
        ("attention", "norm", "activation", "feedforward", "positional", "block", "tokenizer"),
        obliges="the component computes what GPT-2's does, in the book's weight layout: attention in "
                "the canonical layout (CanonicalStateProtocol), GPT-2's math (no extra scaling); norm "
                "a LayerNorm with scale/shift (or nn.LayerNorm's weight/bias); activation GELU's tanh "
                "approximation; feedforward layers.0 = Linear(C, 4C), layers.2 = Linear(4C, C); "
                "positional a learned table with .weight (context_length, C); block the pre-norm "
                "layout with att, ff, norm1, norm2; tokenizer GPT-2's byte-pair ids",
        relied_on_by="minigpt export-hf (every model slot but init must declare it), and "
                     "minigpt import-hf and init_from = \"hf:...\" (the attention must)",
        checks=("equivalence",)),
    Capability(
        "multihead", "splits the embedding into n_heads heads", ("attention",),
        obliges="ctx.n_heads heads of ctx.head_dim features each; where its weights can be copied "
                "into book.multihead (a gpt2 attention, or one whose canonical_state() maps its weights "
                "onto the canonical layout, like book.multihead_wrapper) it must compute the same function",
        relied_on_by="the equivalence check against book.multihead (skipped where no weights can be copied)",
        checks=("equivalence",)),
    Capability(
        "positions", "attention that encodes token positions itself (RoPE, ALiBi): no absolute positions needed",
        ("attention",),
        obliges="the attention encodes positions itself (using cache.length as the offset while "
                "decoding); pair it with positional 'modern.none'",
        relied_on_by="the spec warning for a model that would get positions twice"),
    Capability(
        "absolute", "positional embedding that adds absolute positions to the token embeddings", ("positional",),
        obliges="the module returns one embedding per absolute position",
        relied_on_by="the spec warning for a model that would get positions twice"),
)

# capability -> its contract; CAPABILITIES (minigpt_core.base.registry.CAPABILITIES) -> one line each.
CAPABILITY_CONTRACTS: dict[str, Capability] = {c.name: c for c in _CAPABILITY_LIST}
CAPABILITIES: dict[str, str] = {c.name: c.summary for c in _CAPABILITY_LIST}


# -- optional parts of a component's contract ------------------------------------------------------
# Checked with isinstance (these are runtime_checkable), never by probing attributes by name.
@runtime_checkable
class HFFilesProtocol(Protocol):
    """A tokenizer that can write its Hugging Face files: ``hf_files(context_length) -> {filename: bytes}``.

    ``minigpt export-hf`` writes them beside the weights; a tokenizer without the method (or one
    returning None) gets a warning that the export has no tokenizer files.
    """

    def hf_files(self, context_length: int) -> dict[str, bytes] | None: ...


@runtime_checkable
class ActivationCheckpointingProtocol(Protocol):
    """A model that can recompute its blocks' activations in backward (``train.activation_checkpointing``).

    The trainer sets ``activation_checkpointing`` before wrapping the model; :class:`GPT` has it.
    """

    activation_checkpointing: bool
