"""Component slots and their resolution, the second pass of checking a spec.

A :class:`ComponentSlot` names a registered component and its params. :func:`resolve_components`
looks every slot of a section up in the registry, validates its params against the component's
own schema, runs the component's checks against the model section, and remembers the result on
the section (``spec.components``, ``spec.registry``). Pydantic's validation errors become the
spec's dotted-path problems here (:func:`validation_problems`).

The sections themselves (``spec.schema``) build on these classes; this module imports only the
base layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ..base.errors import ComponentBuildError, MinigptError, SpecError
from ..base.loader import get_registry
from ..base.registry import ComponentEntry, ComponentRegistry


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

    def _model_section(self) -> "_Resolvable":
        """The model section the components' own checks read: this section, or the one it holds."""
        raise NotImplementedError

    def _compiles(self) -> bool:
        """Whether this section asks for torch.compile, which components that declare not_compilable refuse."""
        return False

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


def validation_problems(err: ValidationError, prefix: tuple[Any, ...] = (),
                        model: type[BaseModel] | None = None, component: str | None = None) -> list[tuple[str, str]]:
    """Pydantic's errors as (dotted path, reason) problems; an unknown key suggests the field it resembles.

    ``component`` (e.g. "norm 'torch.layernorm'"): ``model`` is that component's Params, and an unknown
    param lists the valid ones (`minigpt schema` does not show a component's params)."""
    import difflib

    out = []
    for e in err.errors():
        reason = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            loc = tuple(e["loc"])
            known = _known_fields(model, loc[:-1]) if model else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{_path(prefix + loc[:-1] + (close[0],))}'? " if close else "misspelt? "
            if component is not None and not loc[:-1]:
                takes = f"{hint}the {component} takes: {', '.join(known)}" if known else \
                    f"the {component} takes no params"
                reason = f"unknown param ({takes})"
            else:
                reason = f"unknown field ({hint}`minigpt schema` lists every field)"
        out.append((_path(prefix + tuple(e["loc"])), reason))
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


def resolve_components(spec: _Resolvable, registry: ComponentRegistry | None = None,
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
    model = spec._model_section()
    is_model = model is spec
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
            problems += validation_problems(err, path + ("params",), entry.params, f"{entry.kind} '{entry.name}'")
            continue
        if entry.not_for_lm and for_lm:
            problems.append((_path(path + ("name",)),
                             f"'{entry.name}' cannot be used in a language model: {entry.not_for_lm}"))
            continue
        if entry.not_compilable and spec._compiles():
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
        model._resolution = _Resolution(registry, own, model.model_dump_json())
    return resolved
