"""Experiment files: reading a TOML file into a spec and writing one back.

:func:`load_spec` reads a file, applies ``--set`` overrides (:func:`apply_overrides`), then
:func:`parse_spec` merges the preset, loads the plugins the spec names, validates the sections
(``spec.schema``), checks the rules between sections and resolves the components
(``spec.resolution``). :func:`dump_spec` writes the resolved spec a run keeps as ``spec.toml``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from ..base import toml as _toml
from ..base.errors import SpecError
from ..base.loader import load_local_plugins, resolve_plugin_ref
from ..base.reading import SPEC_LIMIT, read_text_bounded
from ..base.registry import ComponentRegistry
from .presets import PRESETS
from .resolution import ResolvedComponent, resolve_components, validation_problems
from .schema import ExperimentSpec


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "params":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _cross_section_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
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
        raise SpecError(validation_problems(err, model=ExperimentSpec), source) from None
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
        text = read_text_bounded(path, "experiment file", SPEC_LIMIT, lambda msg: SpecError([("<file>", msg)]),
                                 hint="Give the experiment's TOML file, e.g. experiments/tiny.toml.")
    except FileNotFoundError:
        raise SpecError([("<file>", f"no such experiment file: {path}")]) from None
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
