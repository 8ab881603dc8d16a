"""Plugin discovery: entry points -> pluggy -> a fresh ComponentRegistry.

Each plugin's hook runs on its own, against a staging view, so a plugin that
fails to import or raises in its hook is reported (naming the plugin, its
distribution and the error) and skipped, and never leaves half its components
behind. Nothing here is global: :func:`load_registry` builds a new registry on
every call; :func:`get_registry` caches one for the CLI and can be reset.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import pluggy

from .hookspecs import PROJECT_NAME, MinigptHookSpecs
from .errors import DuplicateComponentError, PluginLoadError, PluginLoadWarning
from .reading import SPEC_LIMIT, read_bytes_bounded
from .registry import ComponentEntry, ComponentRegistry, UnavailableComponent, make_entry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV_VAR",
    "PLUGIN_PATH_ENV_VAR",
    "PluginInfo",
    "PluginFailure",
    "load_registry",
    "get_registry",
    "reset_registry",
    "load_local_plugins",
    "resolve_plugin_ref",
    "is_plugin_file",
]

ENTRY_POINT_GROUP = "minigpt"
PLUGINS_ENV_VAR = "MINIGPT_PLUGINS"
# More plugins without packaging: .py files or importable module names, os.pathsep-separated.
PLUGIN_PATH_ENV_VAR = "MINIGPT_PLUGIN_PATH"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    module: str
    components: int = 0
    # A local plugin (a .py file or a module named by --plugin, MINIGPT_PLUGIN_PATH or a spec's
    # `plugins`): the reference a spec stores (absolute path or module name), and a file's sha256.
    local_ref: str | None = None
    sha256: str | None = None

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
        model must not use it: a spec naming it is refused), ``not_compilable`` (why
        ``torch.compile`` cannot compile it: a spec with ``train.compile = true`` is refused with
        that reason; the ``compiles`` check verifies either way) and ``expected_failures``
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


class _CtrlC:
    """Whether a KeyboardInterrupt out of plugin code came from a real Ctrl-C (SIGINT) or was raised by the
    plugin itself: the first must stop the command, the second is the plugin failing like any other error.
    While watching, SIGINT goes through a handler that notes it and raises KeyboardInterrupt as Python's
    own does."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> "_CtrlC":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.default_int_handler:  # anyone else's handler is left alone
                self._previous = previous
                signal.signal(signal.SIGINT, self._handler)
            elif previous in (signal.SIG_IGN, signal.SIG_DFL, None) or not callable(previous):
                self._previous = False  # Ctrl-C raises nothing now: any KeyboardInterrupt is the plugin's
        return self

    def _handler(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._previous:
            import signal

            signal.signal(signal.SIGINT, self._previous)
        if self.pressed and exc_type is None:  # the plugin caught our KeyboardInterrupt: Ctrl-C still stops
            raise KeyboardInterrupt

    def real(self) -> bool:
        """A KeyboardInterrupt just caught: a real Ctrl-C (or one we cannot tell from one)?"""
        if self._previous is None:  # someone else's handler: it may raise KeyboardInterrupt itself
            return True
        return self.pressed


def _plugin_raised(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt (raised by the plugin's own code: no Ctrl-C was pressed)"
    return f"{type(exc).__name__}: {exc}"


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
    local_plugins: Iterable[str] | None = None,
) -> ComponentRegistry:
    """Discover plugins and return a new registry holding their components.

    ``plugins`` restricts entry-point loading to those names (default: the
    ``MINIGPT_PLUGINS`` environment variable, a comma list; unset loads all, empty loads
    none). ``extra_plugins`` are ``(name, module_or_object)`` pairs registered directly,
    e.g. from a test or a notebook. ``local_plugins`` are plugin files or module names loaded
    last (default: the ``MINIGPT_PLUGIN_PATH`` environment variable); see :func:`load_local_plugins`.
    """
    wanted = _requested_plugins(plugins)
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(MinigptHookSpecs)
    registry = ComponentRegistry()
    infos: dict[str, PluginInfo] = {}

    def fail(info: PluginInfo, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(info.name, info.distribution, info.version, stage, _plugin_raised(exc))
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
            with _CtrlC() as ctrl_c:
                try:
                    candidates.append((info, ep.load()))
                except KeyboardInterrupt as exc:
                    if ctrl_c.real():
                        raise
                    fail(info, "import", exc)
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
        with _CtrlC() as ctrl_c:
            try:
                impl.function(registry=registrar)
                failed = None
            except KeyboardInterrupt as exc:
                if ctrl_c.real():
                    raise
                failed = exc
            except BaseException as exc:  # SystemExit included
                failed = exc
        if failed is not None:
            fail(info, "register", failed)
            continue
        for entry in registrar.staged:
            registry._insert(entry)  # DuplicateComponentError is fatal by design: it names both
        registry.unavailable += registrar.staged_unavailable
        registry.plugins.append(
            PluginInfo(info.name, info.distribution, info.version, info.module, len(registrar.staged))
        )
    if local_plugins is None:
        local_plugins = _env_plugin_refs()
        where = PLUGIN_PATH_ENV_VAR
    else:
        where = "load_registry(local_plugins=...)"
    load_local_plugins(local_plugins, registry, where=where)
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


# -- local plugins: a .py file or a module, no packaging -----------------------------------------
def _env_plugin_refs() -> list[str]:
    return [r.strip() for r in os.environ.get(PLUGIN_PATH_ENV_VAR, "").split(os.pathsep) if r.strip()]


def is_plugin_file(ref: str) -> bool:
    """A path to a .py file (as opposed to a dotted module name)."""
    return ref.endswith(".py") or "/" in ref or os.sep in ref


def resolve_plugin_ref(ref: str | os.PathLike, base: str | Path | None = None) -> str:
    """A file reference made absolute (relative to ``base``, default the working directory); a module name as is."""
    is_path = isinstance(ref, os.PathLike)
    ref = os.fspath(ref).strip()
    if not (is_path or is_plugin_file(ref)):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    return str(path.resolve())


# path -> (sha256, module): a file is executed once per content, however many registries load it.
_local_modules: dict[str, tuple[str, Any]] = {}


def _error_line(exc: BaseException, file: str) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == file]
    return f" (line {frames[-1].lineno})" if frames else ""


def _import_local(ref: str, where: str) -> tuple[Any, str | None]:
    """Import a plugin file or module: (module, the file's sha256 or None)."""
    if is_plugin_file(ref):
        path = Path(ref)
        hint = ("Give the path of a .py file that defines `@hookimpl def minigpt_register(registry)`; relative "
                "paths in an experiment file are relative to that file.")
        try:
            code = read_bytes_bounded(path, "plugin file", SPEC_LIMIT, PluginLoadError,
                                      hint=f"{where} must name a Python file: {hint[0].lower()}{hint[1:]}")
        except FileNotFoundError:
            raise PluginLoadError(f"The plugin file {ref} (named by {where}) does not exist. {hint}") from None
        except OSError as exc:
            raise PluginLoadError(f"Cannot read the plugin file {ref} (named by {where}): {exc.strerror}.") from None
        sha = hashlib.sha256(code).hexdigest()
        cached = _local_modules.get(ref)
        if cached and cached[0] == sha:
            return cached[1], sha
        stem = re.sub(r"\W", "_", path.stem)
        modname = f"minigpt_local_{stem}_{hashlib.sha1(ref.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module  # dataclasses, pickling by spawn workers etc. look modules up here
        with _CtrlC() as ctrl_c:
            try:
                spec.loader.exec_module(module)
                failed = None
            except KeyboardInterrupt as exc:
                if ctrl_c.real():
                    sys.modules.pop(modname, None)
                    raise
                failed = exc
            except BaseException as exc:  # SyntaxError, ImportError, even sys.exit: report, never a traceback
                failed = exc
        if failed is not None:
            sys.modules.pop(modname, None)
            line = f" (line {failed.lineno})" if isinstance(failed, SyntaxError) and failed.lineno else \
                _error_line(failed, str(path))
            raise PluginLoadError(
                f"The plugin file {ref} (named by {where}) failed to import{line}: "
                f"{_plugin_raised(failed)}. Fix the file, or leave it out of {where}."
            )
        _local_modules[ref] = (sha, module)
        return module, sha
    ctrl_c = _CtrlC()
    try:
        with ctrl_c:
            return importlib.import_module(ref), None
    except KeyboardInterrupt as exc:
        if ctrl_c.real():
            raise
        raise PluginLoadError(f"The plugin module '{ref}' (named by {where}) failed to import: "
                              f"{_plugin_raised(exc)}.") from None
    except ModuleNotFoundError as exc:
        if exc.name and (ref == exc.name or ref.startswith(exc.name + ".")):
            raise PluginLoadError(
                f"The plugin module '{ref}' (named by {where}) cannot be imported: no module named "
                f"'{exc.name}'. Install it, put it on PYTHONPATH, or give the path of its .py file instead."
            ) from None
        raise PluginLoadError(f"The plugin module '{ref}' (named by {where}) failed to import: "
                              f"{type(exc).__name__}: {exc}.") from None
    except BaseException as exc:
        raise PluginLoadError(f"The plugin module '{ref}' (named by {where}) failed to import: "
                              f"{type(exc).__name__}: {exc}.") from None


def load_local_plugins(refs: Iterable[str], registry: ComponentRegistry | None = None, *,
                       base: str | Path | None = None, where: str = "--plugin") -> list[PluginInfo]:
    """Load plugin files (``./my_attention.py``) or module names into ``registry``.

    Default registry: the process-wide one, and then the plugins are also added to
    ``MINIGPT_PLUGIN_PATH`` so worker processes load them too. Each runs through the same
    hook machinery as an entry-point plugin, but a plugin asked for explicitly that fails is
    an error (:class:`PluginLoadError`, naming the file and ``where`` it was named), not a
    warning. Loading one already in the registry does nothing. Returns the plugins' infos.
    """
    default = registry is None or registry is _default  # the process-wide one, however it was named
    registry = get_registry() if registry is None else registry
    out = []
    for raw in refs:
        ref = resolve_plugin_ref(raw, base)
        known = [p for p in registry.plugins if p.local_ref == ref or (p.local_ref is None and p.module == ref)]
        if known:
            out.append(known[0])
            continue
        module, sha = _import_local(ref, where)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginLoadWarning)  # turned into an error below
            staged = load_registry(extra_plugins=[(ref, module)], entry_points=False, local_plugins=())
        what = f"plugin file {ref}" if sha else f"plugin module '{ref}'"
        if staged.failures:
            f = staged.failures[0]
            raise PluginLoadError(
                f"The {what} (named by {where}) {'raised in its minigpt_register hook' if f.stage == 'register' else 'failed to load'}: "
                f"{f.error}. Fix it, or leave it out of {where}."
            )
        if not staged.plugins:
            raise PluginLoadError(
                f"The {what} (named by {where}) defines no minigpt_register hook: add "
                f"`@hookimpl def minigpt_register(registry): ...` (hookimpl from minigpt_core.plugin)."
            )
        for entry in staged.entries():  # a clash is an error naming both, before anything is inserted
            if (entry.kind, entry.name) in registry:
                registry._insert(entry)
        for entry in staged.entries():
            registry._insert(entry)
        registry.unavailable += staged.unavailable
        info = replace(staged.plugins[0], module=getattr(module, "__name__", ref), local_ref=ref, sha256=sha)
        registry.plugins.append(info)
        out.append(info)
    if default and out:
        _propagate(info.local_ref for info in out)
    return out


def _propagate(refs: Iterable[str]) -> None:
    """Name the plugins in MINIGPT_PLUGIN_PATH so child processes (spawned workers) load them too."""
    current = _env_plugin_refs()
    new = [r for r in refs if r and r not in current]
    if new:
        os.environ[PLUGIN_PATH_ENV_VAR] = os.pathsep.join(current + new)


# Re-exported for type hints in plugins.
__all__ += ["PluginRegistrar", "DuplicateComponentError"]
