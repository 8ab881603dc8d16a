"""Tokenizers: what the registry's ``tokenizer`` kind provides, and how a run gets one.

A spec names its tokenizer in the ``tokenizer`` slot (``gpt2`` by default). Factories are
called as ``factory(ctx, params)`` with a :class:`TokenizerContext`: the training text for
tokenizers that learn their vocabulary from it (``char``), or a saved :meth:`Tokenizer.state`
to rebuild exactly the tokenizer a run used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import ValidationError

from ..base.contracts import Tokenizer
from ..base.errors import MinigptError
from ..base.loader import get_registry
from ..base.registry import ComponentRegistry
from ..spec import ExperimentSpec, parse_spec

__all__ = ["Tokenizer", "TokenizerContext", "TokenizerError", "build_tokenizer", "tokenizer_from_state"]


class TokenizerError(MinigptError):
    """A tokenizer cannot be built (missing or corrupt files, no network) or cannot encode a text."""


@dataclass(frozen=True)
class TokenizerContext:
    """What a tokenizer factory sees (instead of the model's BuildContext)."""

    training_text: str | None = None  # for tokenizers that learn a vocabulary from the data
    state: Mapping[str, Any] | None = None  # a saved Tokenizer.state() to rebuild from


def build_tokenizer(spec: ExperimentSpec | str, training_text: str | None = None, *,
                    registry: ComponentRegistry | None = None) -> Tokenizer:
    """The tokenizer the spec's ``tokenizer`` slot names, checked against ``model.vocab_size``.

    ``spec`` may also be a registered tokenizer name (``"gpt2"``, ``"char"``), built with its
    default params and no vocabulary check (looked up in ``registry``, default the process's).
    """
    if isinstance(spec, str):
        # The model section only has to admit the tokenizer's vocabulary; nothing is built.
        spec = parse_spec({"tokenizer": {"name": spec}, "model": {"vocab_size": 1 << 30}}, registry=registry)
    elif not isinstance(spec, ExperimentSpec):
        raise TokenizerError(
            f"build_tokenizer takes an ExperimentSpec (e.g. load_spec('experiments/tiny.toml')) or a "
            f"tokenizer name such as 'gpt2' or 'char'; got {type(spec).__name__} {spec!r:.80}."
        )
    slot = spec.components["tokenizer"]
    tok = slot.entry.factory(TokenizerContext(training_text=training_text), slot.params)
    # Entries check vocab sizes they know up front; this catches ones learnt from the text (char).
    if tok.n_vocab > spec.model.vocab_size:
        raise TokenizerError(
            f"The {tok.name} tokenizer has {tok.n_vocab} token ids but model.vocab_size is "
            f"{spec.model.vocab_size}, so some ids would have no embedding. Set model.vocab_size "
            f"to at least {tok.n_vocab} (e.g. --set model.vocab_size={tok.n_vocab})."
        )
    return tok


def tokenizer_from_state(state: Mapping[str, Any], registry: ComponentRegistry | None = None) -> Tokenizer:
    """Rebuild a tokenizer from what its ``state()`` returned (e.g. read back from a run's files)."""
    registry = registry or get_registry()
    name = state.get("name") if isinstance(state, Mapping) else None
    if not isinstance(name, str):
        raise TokenizerError(f"A saved tokenizer state must be a mapping with a 'name'; got {state!r:.200}.")
    entry = registry.get("tokenizer", name)
    try:
        params = entry.make_params(state.get("params"))
    except ValidationError as exc:
        raise TokenizerError(f"The saved {name} tokenizer state has invalid params: {exc}") from None
    return entry.factory(TokenizerContext(state=state), params)
