"""The public API for writing minigpt plugins: everything a plugin imports comes from here.

This module only re-exports (docs/architecture.md): the contracts live in
:mod:`minigpt_core.base.contracts`, the rest in the layer each part belongs to.

A plugin is a module with a ``@hookimpl``-marked ``minigpt_register(registry)`` function that adds
components to the :class:`Registrar` it receives, exposed in the ``minigpt`` entry-point group of
an installed distribution. docs/plugins.md is the guide; this module is the reference. Plugins,
the first-party ones included, import only from here (and from their own package): the rest of
``minigpt_core`` is internal and may change.

Registering
    ``hookimpl``                the marker of the ``minigpt_register(registry)`` hook
    :class:`Registrar`          what the hook receives: ``add(kind, name, factory, ...)``, ``unavailable(...)``
    :class:`Params`             base class of a component's params (refuses unknown fields)
    :class:`Factory`            the signature of a factory: ``factory(ctx, params) -> component``

The kinds (``KINDS``: kind -> one line; ``KIND_PROTOCOLS``: kind -> its protocol)
    :class:`AttentionProtocol`, :class:`NormProtocol`, :class:`ActivationProtocol`,
    :class:`FeedForwardProtocol`, :class:`PositionalProtocol`, :class:`BlockProtocol`,
    :class:`InitProtocol` (model parts, whose factories get a :class:`BuildContext`),
    :class:`AdapterProtocol` (fine-tuning adapters such as LoRA; also a :class:`BuildContext`),
    :class:`TemplateProtocol` (instruction-tuning prompt formats; no context),
    :class:`TokenizerProtocol` (gets a :class:`TokenizerContext`), :class:`DatasetProtocol`
    (gets a :class:`DataContext`), :class:`WeightsProtocol` (another library's checkpoint layout;
    its factory gets no context).

The capabilities (``CAPABILITIES``: name -> one line; ``CAPABILITY_CONTRACTS``: name -> :class:`Capability`)
    ``causal``, ``kv_cache``, ``attn_weights``, ``gpt2``, ``multihead``, ``positions``, ``absolute``:
    each :class:`Capability` says what declaring it obliges the component to implement, what in
    minigpt relies on it and which conformance checks hold the component to it.
    :class:`CanonicalStateProtocol` (its read half :class:`CanonicalStateSource`) is the weight-layout hook of ``gpt2`` attentions and blocks;
    :class:`AuxLossProtocol` the convention for modules that add a training loss;
    :class:`HFFilesProtocol` a tokenizer's Hugging Face files; :class:`ActivationCheckpointingProtocol`
    a model that recomputes activations. These optional parts are runtime-checkable: the core tests
    them with ``isinstance``.

Building model parts
    :class:`BuildContext`, :class:`KVCache`, :class:`LayerKVCache`, :func:`mark_residual_projection`,
    :func:`is_residual_projection`, ``CANONICAL_ATTENTION_KEYS``; shared layers a plugin may build
    on: :class:`GELU`, :class:`FeedForward`, :class:`TransformerBlock` (the book's),
    :func:`attention_bias`, :func:`causal_attention`, :class:`SDPAttention`.

Fine-tuning (for ``adapter`` components and new task heads)
    :func:`mark_trainable`, :func:`is_marked_trainable` (modules that train whatever ``[finetune]
    trainable`` freezes), :func:`match_modules` (target patterns over module names).

Moving weights (for ``weights`` components)
    :func:`model_weights`, :func:`attention_canonical_state`, :func:`load_attention_canonical_state`.

Tokenizers and data
    :class:`TokenizerContext`, :class:`TokenizerError`, :class:`DataContext`, :class:`DataError`,
    :class:`TextSource`, :class:`TokenSource`, :class:`ShardSet`, :func:`open_shards`;
    :func:`read_bytes_bounded` / :func:`read_text_bounded` to read a whole file a user names (a device,
    FIFO or over-size file is a clear error, never a read without end), with ``TOKENIZER_LIMIT`` or
    ``DATA_LIMIT``.

Errors
    :class:`MinigptError`: subclass it for a user error; the CLI prints its message, no traceback.
    :class:`CheckpointError` (weights that are missing, corrupt or do not fit) and
    :class:`PretrainedError` (a model another library's layout cannot express) are two of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base.contracts import (
    CAPABILITIES,
    CAPABILITY_CONTRACTS,
    KIND_PROTOCOLS,
    KINDS,
    ActivationCheckpointingProtocol,
    ActivationProtocol,
    AdapterProtocol,
    AttentionProtocol,
    AuxLossProtocol,
    BlockProtocol,
    CanonicalStateProtocol,
    CanonicalStateSource,
    Capability,
    DatasetProtocol,
    Factory,
    FeedForwardProtocol,
    HFFilesProtocol,
    InitProtocol,
    NormProtocol,
    Params,
    PositionalProtocol,
    TemplateProtocol,
    Tokenizer,  # noqa: F401  (TokenizerProtocol's base; importable from here at a7c99bc, not in __all__)
    TokenizerProtocol,
    WeightsProtocol,
)
from .base.errors import CheckpointError, MinigptError, PretrainedError
from .base.hookspecs import hookimpl
from .base.loader import PluginRegistrar as Registrar
from .base.reading import DATA_LIMIT, TOKENIZER_LIMIT, read_bytes_bounded, read_text_bounded
from .model.tokenizers import TokenizerContext, TokenizerError

# The names that need torch (or the data pipeline) are imported on first use, so that registering
# a plugin whose modules do not need them yet, and `import minigpt_core`, stay light. Static tools
# and import-linter read them here.
if TYPE_CHECKING:
    from torch import Tensor  # noqa: F401  (importable from here at a7c99bc, though not in __all__)

    from .data.shards import ShardSet, open_shards
    from .data.sources import DataContext, DataError, TextSource, TokenSource
    from .model.gpt import BuildContext, KVCache, LayerKVCache, is_residual_projection, mark_residual_projection
    from .model.interop import CANONICAL_ATTENTION_KEYS, attention_canonical_state, load_attention_canonical_state
    from .model.layers import GELU, FeedForward, SDPAttention, TransformerBlock, attention_bias, causal_attention
    from .model.trainable import is_marked_trainable, mark_trainable, match_modules
    from .model.weights import model_weights

_LAZY = {
    **dict.fromkeys(["Tensor"], "torch"),
    **dict.fromkeys(["ShardSet", "open_shards"], ".data.shards"),
    **dict.fromkeys(["DataContext", "DataError", "TextSource", "TokenSource"], ".data.sources"),
    **dict.fromkeys(["BuildContext", "KVCache", "LayerKVCache", "is_residual_projection",
                     "mark_residual_projection"], ".model.gpt"),
    **dict.fromkeys(["CANONICAL_ATTENTION_KEYS", "attention_canonical_state",
                     "load_attention_canonical_state"], ".model.interop"),
    **dict.fromkeys(["GELU", "FeedForward", "SDPAttention", "TransformerBlock", "attention_bias",
                     "causal_attention"], ".model.layers"),
    **dict.fromkeys(["is_marked_trainable", "mark_trainable", "match_modules"], ".model.trainable"),
    **dict.fromkeys(["model_weights"], ".model.weights"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], "minigpt_core"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # registering
    "hookimpl",
    "Registrar",
    "Params",
    "Factory",
    # the kinds
    "KINDS",
    "KIND_PROTOCOLS",
    "AttentionProtocol",
    "NormProtocol",
    "ActivationProtocol",
    "FeedForwardProtocol",
    "PositionalProtocol",
    "BlockProtocol",
    "InitProtocol",
    "TokenizerProtocol",
    "DatasetProtocol",
    "WeightsProtocol",
    "AdapterProtocol",
    "TemplateProtocol",
    # the capabilities
    "CAPABILITIES",
    "CAPABILITY_CONTRACTS",
    "Capability",
    "CanonicalStateProtocol",
    "CanonicalStateSource",
    "AuxLossProtocol",
    "HFFilesProtocol",
    "ActivationCheckpointingProtocol",
    # building model parts
    "BuildContext",
    "KVCache",
    "LayerKVCache",
    "mark_residual_projection",
    "is_residual_projection",
    "CANONICAL_ATTENTION_KEYS",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "attention_bias",
    "causal_attention",
    "SDPAttention",
    # fine-tuning
    "mark_trainable",
    "is_marked_trainable",
    "match_modules",
    # moving weights
    "model_weights",
    "attention_canonical_state",
    "load_attention_canonical_state",
    # tokenizers and data
    "TokenizerContext",
    "TokenizerError",
    "DataContext",
    "DataError",
    "TextSource",
    "TokenSource",
    "ShardSet",
    "open_shards",
    "read_bytes_bounded",
    "read_text_bounded",
    "TOKENIZER_LIMIT",
    "DATA_LIMIT",
    # errors
    "MinigptError",
    "CheckpointError",
    "PretrainedError",
]
