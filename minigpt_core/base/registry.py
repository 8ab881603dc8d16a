"""Component registries: one table per kind of transformer part.

An entry binds a namespaced name (``book.multihead``) to a factory, the Pydantic
model of that component's own parameters, a one-line description, declared
capabilities and the plugin/distribution that provided it. Specs name entries;
:func:`minigpt_core.build.build_model` looks them up once, at build time.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from .contracts import CAPABILITIES, KINDS
from .errors import DuplicateComponentError, UnknownComponentError

__all__ = [
    "KINDS",
    "CAPABILITIES",
    "NoParams",
    "ComponentEntry",
    "UnavailableComponent",
    "ComponentRegistry",
]

# KINDS and CAPABILITIES (kind/capability -> one line) come from the contracts (base.contracts).


# Namespaced names (plugin.component) are the convention; a few first-party data sources and
# tokenizers use plain names the issues and docs call them by (gpt2, char, python-docs).
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*(\.[a-z0-9][a-z0-9_\-]*)*$")


class NoParams(BaseModel):
    """Params model for components that take none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ComponentEntry:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    description: str
    plugin: str
    distribution: str | None = None
    version: str | None = None
    capabilities: frozenset[str] = frozenset()
    # Cross-field check against the model section: check(model_spec, params) raises ValueError.
    check: Callable[[Any, BaseModel], None] | None = None
    # Why a language model must not use this component (teaching variants); None when it may.
    not_for_lm: str | None = None
    # Conformance checks this component is known to fail: check name -> reason.
    expected_failures: Mapping[str, str] = field(default_factory=dict)
    # Why torch.compile cannot compile it (train.compile is then refused); None when it can.
    not_compilable: str | None = None

    @property
    def source(self) -> str:
        if self.distribution:
            return f"{self.plugin} ({self.distribution} {self.version or '?'})"
        return self.plugin

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def make_params(self, raw: Mapping[str, Any] | BaseModel | None = None) -> BaseModel:
        """Validate raw params against this entry's schema (raises pydantic.ValidationError)."""
        if isinstance(raw, self.params):
            return raw
        return self.params.model_validate(dict(raw or {}))

    def build(self, ctx: Any, raw_params: Mapping[str, Any] | None = None) -> Any:
        return self.factory(ctx, self.make_params(raw_params))


@dataclass(frozen=True)
class UnavailableComponent:
    """A component a plugin knows about but cannot provide here (e.g. needs a newer torch)."""

    kind: str
    name: str
    reason: str
    plugin: str


class ComponentRegistry:
    """All registered components, by kind. Built by :func:`minigpt_core.load_registry`."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, ComponentEntry]] = {k: {} for k in KINDS}
        self.unavailable: list[UnavailableComponent] = []
        # Filled by the plugin loader: loaded plugins and the ones that failed.
        self.plugins: list[Any] = []
        self.failures: list[Any] = []

    # -- registration -------------------------------------------------------------------
    def add(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        *,
        params: type[BaseModel] | None = None,
        description: str,
        capabilities: Iterable[str] = (),
        check: Callable[[Any, BaseModel], None] | None = None,
        not_for_lm: str | None = None,
        expected_failures: Mapping[str, str] | None = None,
        not_compilable: str | None = None,
        plugin: str = "<local>",
        distribution: str | None = None,
        version: str | None = None,
    ) -> ComponentEntry:
        """Register a component directly (plugins go through their hook instead)."""
        entry = make_entry(
            kind, name, factory, params=params, description=description, capabilities=capabilities,
            check=check, not_for_lm=not_for_lm, expected_failures=expected_failures,
            not_compilable=not_compilable, plugin=plugin, distribution=distribution, version=version,
        )
        self._insert(entry)
        return entry

    def _insert(self, entry: ComponentEntry) -> None:
        existing = self._entries[entry.kind].get(entry.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"Two plugins register the {entry.kind} component '{entry.name}': "
                f"{existing.source} and {entry.source}. Component names must be unique; uninstall "
                f"one of them or restrict loading with MINIGPT_PLUGINS=<comma list of plugin names>."
            )
        self._entries[entry.kind][entry.name] = entry

    # -- lookup ----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> ComponentEntry:
        self._check_kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._entries.get(kind, {})

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None, pattern: str = "*") -> list[ComponentEntry]:
        """Entries of one kind (or all kinds) whose name matches a shell-style pattern."""
        kinds = [kind] if kind else list(KINDS)
        out = []
        for k in kinds:
            self._check_kind(k)
            out += [e for n, e in sorted(self._entries[k].items()) if fnmatch.fnmatchcase(n, pattern)]
        return out

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        absent = [u for u in self.unavailable if u.kind == kind and u.name == name]
        why = f" It exists but is unavailable here: {absent[0].reason}." if absent else ""
        listing = ", ".join(available) if available else "(none: no plugin registers this kind)"
        return (
            f"Unknown {kind} component '{name}'.{why}{hint} Available {kind} components: {listing}. "
            f"Run `minigpt plugins` to see which plugins loaded (or failed to) and "
            f"`minigpt components {kind}` for descriptions."
        )

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(
                f"Unknown component kind '{kind}'. Kinds are: {', '.join(KINDS)}."
            )


def make_entry(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    *,
    params: type[BaseModel] | None,
    description: str,
    capabilities: Iterable[str] = (),
    check: Callable[[Any, BaseModel], None] | None = None,
    not_for_lm: str | None = None,
    expected_failures: Mapping[str, str] | None = None,
    not_compilable: str | None = None,
    plugin: str,
    distribution: str | None = None,
    version: str | None = None,
) -> ComponentEntry:
    """Validate what a plugin declares, so mistakes surface at registration, naming the plugin."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"component name {name!r} must be lowercase and namespaced by convention, like 'myplugin.my_attention'"
        )
    if not callable(factory):
        raise ValueError(f"factory for {name!r} is not callable")
    params = params or NoParams
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise ValueError(f"params for {name!r} must be a pydantic BaseModel subclass")
    if params.model_config.get("extra") != "forbid":
        raise ValueError(
            f"params model {params.__name__} of {name!r} must set model_config = "
            f"ConfigDict(extra='forbid') so misspelt parameters are rejected"
        )
    description = " ".join(description.split())
    if not description:
        raise ValueError(f"component {name!r} needs a one-line description")
    if not_compilable is not None and not str(not_compilable).strip():
        raise ValueError(f"not_compilable for {name!r} must say why torch.compile cannot compile it")
    return ComponentEntry(
        kind=kind, name=name, factory=factory, params=params, description=description,
        plugin=plugin, distribution=distribution, version=version,
        capabilities=frozenset(capabilities), check=check, not_for_lm=not_for_lm,
        expected_failures=dict(expected_failures or {}), not_compilable=not_compilable,
    )
