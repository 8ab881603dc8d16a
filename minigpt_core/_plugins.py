"""Plugin discovery: entry points -> pluggy -> a fresh ComponentRegistry.

Each plugin's hook runs on its own, against a staging view, so a plugin that
fails to import or raises in its hook is reported (naming the plugin, its
distribution and the error) and skipped, and never leaves half its components
behind. Nothing here is global: :func:`load_registry` builds a new registry on
every call; :func:`get_registry` caches one for the CLI and can be reset.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from ._hookspecs import PROJECT_NAME, MinigptHookSpecs
from .errors import DuplicateComponentError, PluginLoadWarning
from .registry import ComponentEntry, ComponentRegistry, UnavailableComponent, make_entry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV_VAR",
    "PluginInfo",
    "PluginFailure",
    "load_registry",
    "get_registry",
    "reset_registry",
]

ENTRY_POINT_GROUP = "minigpt"
PLUGINS_ENV_VAR = "MINIGPT_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    module: str
    components: int = 0

    @property
    def source(self) -> str:
        return f"{self.name} ({self.distribution} {self.version})" if self.distribution else self.name


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str | None
    version: str | None
    stage: str  # "import" or "register"
    error: str

    def message(self) -> str:
        dist = f" from distribution {self.distribution} {self.version}" if self.distribution else ""
        what = "failed to import" if self.stage == "import" else "raised in its minigpt_register hook"
        return (
            f"minigpt plugin '{self.name}'{dist} {what} and was skipped: {self.error}. "
            f"The other plugins are loaded as usual; fix or uninstall it, or leave it out with "
            f"{PLUGINS_ENV_VAR}=<comma list of the plugins you want>."
        )


class PluginRegistrar:
    """The ``registry`` object a plugin's hook receives: stamps entries with the plugin's origin.

    Exported as ``minigpt_core.plugin.Registrar``. What a hook adds is staged and enters the
    registry only if the whole hook succeeds, so a hook that raises leaves nothing behind.
    """

    def __init__(self, registry: ComponentRegistry, plugin: PluginInfo):
        self._registry = registry
        self._plugin = plugin
        self.staged: list[ComponentEntry] = []
        self.staged_unavailable: list[UnavailableComponent] = []

    def add(self, kind: str, name: str, factory: Any, **declared: Any) -> ComponentEntry:
        """Register ``factory`` as the ``kind`` component ``name``; mistakes raise ValueError here.

        ``kind`` is one of ``minigpt_core.plugin.KINDS``; ``name`` is lowercase and namespaced by
        the plugin (``myplugin.my_attention``); ``factory(ctx, params)`` returns the component (see
        the kind's protocol in ``minigpt_core.plugin.KIND_PROTOCOLS``). Keywords:
        ``description`` (required, one line), ``params`` (a pydantic model with
        ``extra="forbid"``, e.g. a ``Params`` subclass; default none), ``capabilities`` (names
        from ``CAPABILITIES``: promises the core relies on and the conformance checks verify),
        ``check(model_spec, params)`` (raise ValueError for a combination that cannot work; it
        runs when a spec is validated, before anything is built), ``not_for_lm`` (why a language
        model must not use it: a spec naming it is refused) and ``expected_failures``
        (``{check name: reason}``: conformance checks it is known to fail; they still run, and
        one that starts passing is reported).
        """
        entry = make_entry(
            kind, name, factory, plugin=self._plugin.name,
            distribution=self._plugin.distribution, version=self._plugin.version,
            params=declared.pop("params", None), **declared,
        )
        self.staged.append(entry)
        return entry

    def unavailable(self, kind: str, name: str, reason: str) -> None:
        """Declare a component this plugin cannot provide here, and why (shown by the CLI).

        Use it instead of ``add`` when a dependency or the hardware is missing: ``minigpt
        components`` lists it as UNAVAILABLE with ``reason``, and a spec naming it fails with
        the reason instead of "unknown component". ``reason`` says what to install or change.
        """
        self.staged_unavailable.append(UnavailableComponent(kind, name, reason, self._plugin.name))

    def names(self, kind: str) -> list[str]:
        """Names of the ``kind`` components registered so far by the plugins loaded before this one."""
        return self._registry.names(kind)


def _requested_plugins(plugins: Iterable[str] | None) -> set[str] | None:
    if plugins is not None:
        return set(plugins)
    raw = os.environ.get(PLUGINS_ENV_VAR)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def load_registry(
    plugins: Iterable[str] | None = None,
    *,
    extra_plugins: Iterable[tuple[str, Any]] = (),
    entry_points: bool = True,
) -> ComponentRegistry:
    """Discover plugins and return a new registry holding their components.

    ``plugins`` restricts entry-point loading to those names (default: the
    ``MINIGPT_PLUGINS`` environment variable, a comma list; unset loads all, empty loads
    none). ``extra_plugins`` are ``(name, module_or_object)`` pairs registered directly,
    e.g. from a test or a notebook.
    """
    wanted = _requested_plugins(plugins)
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(MinigptHookSpecs)
    registry = ComponentRegistry()
    infos: dict[str, PluginInfo] = {}

    def fail(info: PluginInfo, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(info.name, info.distribution, info.version, stage,
                                f"{type(exc).__name__}: {exc}")
        registry.failures.append(failure)
        warnings.warn(failure.message(), PluginLoadWarning, stacklevel=3)

    candidates: list[tuple[PluginInfo, Any]] = []
    if entry_points:
        seen: set[str] = set()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if wanted is not None and ep.name not in wanted:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, ep.value)
            if ep.name in seen:  # importlib.metadata can list one dist twice (e.g. two sys.path entries)
                continue
            seen.add(ep.name)
            try:
                candidates.append((info, ep.load()))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not break the tool
                fail(info, "import", exc)
        if wanted is not None:
            found = {i.name for i, _ in candidates} | {f.name for f in registry.failures}
            for missing in sorted(wanted - found - {n for n, _ in extra_plugins}):
                warnings.warn(
                    f"{PLUGINS_ENV_VAR} names plugin '{missing}', but no installed distribution "
                    f"provides a '{ENTRY_POINT_GROUP}' entry point of that name. Installed: "
                    f"{', '.join(sorted(e.name for e in md.entry_points(group=ENTRY_POINT_GROUP))) or 'none'}.",
                    PluginLoadWarning, stacklevel=2,
                )
    for name, obj in extra_plugins:
        candidates.append((PluginInfo(name, None, None, getattr(obj, "__name__", repr(obj))), obj))

    for info, obj in candidates:
        try:
            pm.register(obj, name=info.name)
        except Exception as exc:  # e.g. a hookimpl with a misspelt hook name or argument
            fail(info, "register", exc)
            continue
        infos[info.name] = info

    for impl in pm.hook.minigpt_register.get_hookimpls():  # registration order
        info = infos[impl.plugin_name]
        registrar = PluginRegistrar(registry, info)
        try:
            impl.function(registry=registrar)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit included
            fail(info, "register", exc)
            continue
        for entry in registrar.staged:
            registry._insert(entry)  # DuplicateComponentError is fatal by design: it names both
        registry.unavailable += registrar.staged_unavailable
        registry.plugins.append(
            PluginInfo(info.name, info.distribution, info.version, info.module, len(registrar.staged))
        )
    return registry


_default: ComponentRegistry | None = None


def get_registry() -> ComponentRegistry:
    """The process-wide registry, loaded on first use. Tests should call load_registry()."""
    global _default
    if _default is None:
        _default = load_registry()
    return _default


def reset_registry() -> None:
    global _default
    _default = None


# Re-exported for type hints in plugins.
__all__ += ["PluginRegistrar", "DuplicateComponentError"]
