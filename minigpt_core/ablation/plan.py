"""Ablation files: read, expand into cells (variant x seed), validate every cell, fix each cell's budget.

Every cell is a complete experiment spec. The whole ablation is validated before anything runs
and every problem comes back at once, naming the cell and the dotted path.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..base import toml as _toml
from ..base.errors import MinigptError, SpecError
from ..spec import ExperimentSpec, apply_overrides, dump_spec, parse_spec

__all__ = ["AblationError", "AblationFile", "Cell", "Plan", "load_plan", "flatten_overrides", "BUDGETS",
           "ablation_root"]

BUDGETS = ("tokens", "flops", "time")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# Set by the ablation itself; a variant that sets them would break the layout or the pairing.
_RESERVED = {"name": "the cell's run name is seed-<s>", "seed": "seeds come from the ablation's `seeds` list",
             "train.out_dir": "cells live under the base's train.out_dir/<ablation>; set it in the base",
             "wandb.group": "the ablation's name", "wandb.job_type": "the variant's name", "wandb.config": "the cell's overrides"}


class AblationError(MinigptError):
    """An ablation file or its cells failed validation, or an ablation cannot (re)start as asked."""


class AblationFile(BaseModel):
    """An ablation file (TOML): a base experiment, seeds, and variants as named overrides and/or axes."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="the ablation's name: directory train.out_dir/<name> and W&B group "
                             "(default: the file's name without .toml)")
    description: str = Field("", description="free text, shown in the report")
    base: str | dict[str, Any] = Field(description="the experiment every cell starts from: a TOML file (relative to "
                                       "this file) or an inline table with the fields of an experiment file")
    common: dict[str, Any] = Field(default_factory=dict, description="overrides applied to the base for every "
                                   "cell (\"dotted.field\" = value), e.g. a shorter train.max_steps than the base's")
    seeds: list[int] = Field([123], min_length=1, description="seed s of every variant sees the same data order "
                             "and the same initial weights where the shapes agree (paired seeds)")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named variants: "
                                                "name -> {\"dotted.field\" = value}; an empty table is the base")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="\"dotted.field\" -> values; combined "
                                       "as `combine` says, each combination a variant (after the named ones)")
    combine: Literal["grid", "zip"] = Field("grid", description="axes as a cartesian product (grid) or "
                                            "element by element (zip: lists of equal length)")
    baseline: str | None = Field(None, description="the variant the report compares against (default: the first)")
    budget: Literal["tokens", "flops", "time"] = Field("tokens", description="what every cell gets as much of as "
                                                       "the baseline: training tokens, training FLOPs (FLOPs per "
                                                       "token from the model summary) or wall-clock time")
    time_budget_s: float | None = Field(None, gt=0, description="with budget = \"time\": seconds of training per "
                                        "cell (default: what the baseline's steps take)")
    nproc_per_node: int = Field(1, ge=1, description="processes per cell (torchrun --standalone inside the job)")
    executor: dict[str, Any] = Field(default_factory=dict, description="submitit parameters for --executor slurm, "
                                     "e.g. timeout_min = 60, slurm_partition = \"gpu\", gpus_per_node = 1")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a valid ablation name: use letters, digits, '.', '_' or '-' "
                             f"(it names the directory train.out_dir/<name>)")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"seeds must be distinct and >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _variants(self) -> "AblationFile":
        for name in self.variants:
            if not _NAME.fullmatch(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '.', '_' or '-' (it names a directory)")
        for key, values in self.axes.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        if self.combine == "zip" and len({len(v) for v in self.axes.values()}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in self.axes.items())
            raise ValueError(f"combine = \"zip\" needs axes of equal length ({lengths}); use combine = \"grid\" "
                             f"for every combination")
        if not self.variants and not self.axes:
            raise ValueError("no variants: add [variants.NAME] tables of overrides and/or an [axes] table")
        return self


@dataclass
class Cell:
    variant: str
    seed: int
    overrides: dict[str, Any]  # the variant's dotted overrides (the --set values are ablation-wide)
    spec: ExperimentSpec
    spec_sha256: str
    steps: int  # optimizer steps, after the budget
    tokens: int  # training tokens: steps x tokens per step
    tokens_per_step: int
    flops_per_token: int
    params: int
    budget_note: str = ""

    @property
    def id(self) -> str:
        return f"{self.variant}/seed-{self.seed}"

    @property
    def exp_dir(self) -> Path:  # train.out_dir/name: the runs of this cell go below it
        return Path(self.spec.train.out_dir) / self.spec.name


@dataclass
class Plan:
    file: Path
    name: str
    description: str
    root: Path
    config: AblationFile
    sets: list[str]
    baseline: str
    variants: dict[str, dict[str, Any]]
    cells: list[Cell] = field(default_factory=list)
    budget_summary: str = ""

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"file": str(self.file), "seeds": list(c.seeds), "baseline": self.baseline, "budget": c.budget,
                "time_budget_s": c.time_budget_s, "combine": c.combine, "set": list(self.sets),
                "nproc_per_node": c.nproc_per_node, "budget_summary": self.budget_summary,
                "description": self.description,
                "wandb": self.cells[0].spec.wandb.model_dump(include={"mode", "project", "entity"}) if self.cells
                else {}}


def flatten_overrides(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"norm": {"name": x}}}`` and ``{"model.norm.name": x}`` both give ``{"model.norm.name": x}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_overrides(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError([(key, f"'{p}' is a value, not a table")])
        node = nxt
    node[leaf] = copy.deepcopy(value)


def _axis_label(key: str, value: Any) -> str:
    parts = key.split(".")
    label = parts[-2] if parts[-1] in ("name", "params") and len(parts) > 1 else parts[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{label}-{value}")[:60]


def _variants(cfg: AblationFile) -> dict[str, dict[str, Any]]:
    out = {name: flatten_overrides(ov) for name, ov in cfg.variants.items()}
    if cfg.axes:
        keys = list(cfg.axes)
        combos = (itertools.product(*cfg.axes.values()) if cfg.combine == "grid" else zip(*cfg.axes.values()))
        for values in combos:
            name = "_".join(_axis_label(k, v) for k, v in zip(keys, values))
            if name in out:
                raise AblationError(f"The axes make a variant named {name!r}, which is also a named variant; "
                                    f"rename the named variant.")
            out[name] = flatten_overrides(dict(zip(keys, values)))
    return out


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return _toml.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AblationError(f"No such {what}: {path}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AblationError(f"Cannot read the {what} {path}: {exc}.") from None
    except _toml.TOMLDecodeError as exc:
        raise AblationError(f"The {what} {path} is not valid TOML: {exc}.") from None


def _base_data(cfg: AblationFile, file: Path) -> tuple[dict[str, Any], str]:
    from ..base.loader import resolve_plugin_ref

    if isinstance(cfg.base, str):
        path = (file.parent / cfg.base).expanduser()
        data, where = _read_toml(path, "base experiment file (`base` of the ablation file)"), path.parent
        shown = str(path)
    else:
        data, where, shown = copy.deepcopy(cfg.base), file.parent, "the inline [base] table"
    if isinstance(data.get("plugins"), list):  # relative to the file that names them
        data["plugins"] = [resolve_plugin_ref(r, where) if isinstance(r, str) else r for r in data["plugins"]]
    return data, shown


def _root_of(base: Mapping[str, Any], name: str) -> Path:
    out_dir = base.get("train", {}).get("out_dir", "runs") if isinstance(base.get("train"), dict) else "runs"
    return (Path(str(out_dir)).expanduser() / name).resolve()


def ablation_root(path: str | Path, sets: list[str] | None = None) -> Path:
    """Where the ablation in ``path`` (with these --set values) keeps its runs and manifest."""
    file = Path(path)
    cfg = read_ablation_file(file)
    base, _ = _base_data(cfg, file)
    for key, value in [*flatten_overrides(cfg.common).items(),
                       *flatten_overrides(apply_overrides({}, list(sets or []))).items()]:
        _set_dotted(base, key, value)
    return _root_of(base, cfg.name or file.stem)


def read_ablation_file(path: str | Path) -> AblationFile:
    path = Path(path)
    data = _read_toml(path, "ablation file")
    try:
        return AblationFile.model_validate(data)
    except ValidationError as err:
        from ..spec import validation_problems as _problems

        raise AblationError(str(SpecError(_problems(err, model=AblationFile), str(path)))
                            .replace("Invalid experiment spec", "Invalid ablation file", 1)) from None


def _tokens_per_step(spec: ExperimentSpec) -> int:
    return spec.train.batch_size * (spec.data.max_length or spec.model.context_length)


def _planned_steps(spec: ExperimentSpec) -> int:
    t, tps = spec.train, _tokens_per_step(spec)
    return int(min(t.max_steps or math.inf, math.ceil(t.max_tokens / tps) if t.max_tokens else math.inf))


def _summary(spec: ExperimentSpec) -> tuple[int, int]:
    from ..assembly import summarize_spec

    s = summarize_spec(spec)
    return s.total, s.flops_per_token


def probe_step_seconds(spec: ExperimentSpec, threads: int | None = None, steps: int = 3) -> float:
    """Seconds per optimizer step of the spec's model on this machine (random tokens, after a warm-up step)."""
    import time

    import torch

    from ..model.build import build_model
    from ..train import select_device
    from ..tasks.evaluate import lm_loss
    from ..train.optim import build_optimizer

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        device = select_device(spec.train.device)
        model = build_model(spec).to(device)
        opt = build_optimizer(model, spec.train, device)
        t = spec.train
        micro = t.micro_batch_size or t.batch_size
        length = spec.data.max_length or spec.model.context_length
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, spec.model.vocab_size, (micro, length + 1), generator=gen).to(device)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            for _ in range(t.batch_size // micro):
                loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first step pays for allocation and kernel selection
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(before)


def load_plan(path: str | Path, sets: list[str] | None = None, *, time_steps: Mapping[str, int] | None = None,
              probe: bool = True, threads: int | None = None) -> Plan:
    """Read the ablation file, build and validate every cell, and fix their budgets.

    ``time_steps``: with budget = "time", steps already decided (kept in the manifest), so a rerun
    does not time the models again; ``probe=False`` (dry run) leaves undecided time budgets at the
    baseline's steps.
    """
    from ..base.loader import resolve_plugin_ref

    file = Path(path)
    cfg = read_ablation_file(file)
    sets = list(sets or [])
    set_values = flatten_overrides(apply_overrides({}, sets))
    base, base_shown = _base_data(cfg, file)
    for key, value in [*flatten_overrides(cfg.common).items(), *set_values.items()]:
        _set_dotted(base, key, value)
    name = cfg.name or file.stem
    if not _NAME.fullmatch(name):
        raise AblationError(f"The ablation file's name {file.stem!r} cannot name a directory; set name = \"...\" "
                            f"in it (letters, digits, '.', '_' or '-').")
    root = _root_of(base, name)
    variants = _variants(cfg)
    baseline = cfg.baseline or next(iter(variants))
    if baseline not in variants:
        raise AblationError(f"baseline = {baseline!r} is not a variant of {file}; its variants are: "
                            f"{', '.join(variants)}.")

    problems: list[tuple[str, list[tuple[str, str]]]] = []  # (cell label, [(path, reason)])
    specs: dict[tuple[str, int], ExperimentSpec] = {}
    for variant, overrides in variants.items():
        for seed in cfg.seeds:
            label = f"cell {variant}/seed-{seed} (variant {variant!r}, seed {seed})"
            bad = [(k, f"cannot be set by a variant: {why}") for k, why in _RESERVED.items() if k in overrides]
            if bad:
                problems.append((label, bad))
                continue
            raw = copy.deepcopy(base)
            try:
                for key, value in overrides.items():
                    if key == "plugins" and isinstance(value, list):  # relative to the ablation file
                        value = [resolve_plugin_ref(r, file.parent) if isinstance(r, str) else r for r in value]
                    _set_dotted(raw, key, value)
                for key, value in set_values.items():  # --set wins: it is the command line's last word
                    _set_dotted(raw, key, value)
                raw["name"], raw["seed"] = f"seed-{seed}", seed
                _set_dotted(raw, "train.out_dir", str(root / variant))
                _set_dotted(raw, "wandb.group", name)
                _set_dotted(raw, "wandb.job_type", variant)
                _set_dotted(raw, "wandb.config", {"ablation": name, "variant": variant, "seed": seed,
                                                  "overrides": dict(overrides)})
                specs[(variant, seed)] = parse_spec(raw)
            except SpecError as exc:
                problems.append((label, exc.problems))
            except MinigptError as exc:  # e.g. a plugin file that does not load
                problems.append((label, [("plugins", str(exc))]))
    if problems:
        raise AblationError(_problem_message(file, base_shown, problems))

    plan = Plan(file=file.resolve(), name=name, description=cfg.description, root=root, config=cfg, sets=sets,
                baseline=baseline, variants=variants)
    _apply_budgets(plan, specs, time_steps or {}, probe, threads)
    return plan


def _problem_message(file: Path, base_shown: str, problems: list[tuple[str, list[tuple[str, str]]]]) -> str:
    # The same problem in every seed of a variant is said once.
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for label, items in problems:
        variant = label.split("/")[0].removeprefix("cell ")
        seed = label.split("seed ")[-1].rstrip(")")
        for path, reason in items:
            grouped.setdefault((variant, path, reason), []).append(seed)
    parts = []
    for (variant, path, reason), seeds in grouped.items():
        which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(seeds)}"
        parts.append(f"cell(s) of variant {variant!r} ({which}): {path}: {reason}")
    n = len(parts)
    return (f"Invalid ablation {file} (base: {base_shown}); nothing was run. {n} problem{'s' if n > 1 else ''}: "
            + "; ".join(parts) + ". Fix the variant's overrides (or the base), then run again; "
            "`minigpt ablate FILE --dry-run` checks the file without running anything.")


def _apply_budgets(plan: Plan, specs: dict[tuple[str, int], ExperimentSpec], time_steps: Mapping[str, int],
                   probe: bool, threads: int | None) -> None:
    cfg = plan.config
    first_seed = cfg.seeds[0]
    base_spec = specs[(plan.baseline, first_seed)]
    base_steps, base_tps = _planned_steps(base_spec), _tokens_per_step(base_spec)
    base_tokens = base_steps * base_tps
    summaries = {v: _summary(specs[(v, first_seed)]) for v in plan.variants}
    base_fpt = summaries[plan.baseline][1]
    own_budget = {v for v, ov in plan.variants.items() if {"train.max_steps", "train.max_tokens"} & set(ov)}
    seconds = None
    if cfg.budget == "time":
        step_s: dict[str, float] = {}
        for v in plan.variants:
            if v not in time_steps and probe:
                step_s[v] = probe_step_seconds(specs[(v, first_seed)], threads)
        if cfg.time_budget_s is not None:
            seconds = cfg.time_budget_s
        elif plan.baseline in time_steps:
            seconds = None  # steps already fixed in the manifest
        elif probe:
            seconds = base_steps * step_s[plan.baseline]
    steps_of: dict[str, int] = {}
    notes: dict[str, str] = {}
    for v in plan.variants:
        spec = specs[(v, first_seed)]
        tps, fpt = _tokens_per_step(spec), summaries[v][1]
        if v in own_budget:
            steps_of[v], notes[v] = _planned_steps(spec), "its own train.max_steps/max_tokens"
        elif cfg.budget == "tokens":
            steps_of[v] = max(1, round(base_tokens / tps))
        elif cfg.budget == "flops":
            steps_of[v] = max(1, round(base_tokens * base_fpt / (fpt * tps)))
        elif v in time_steps:
            steps_of[v] = int(time_steps[v])
        elif probe and seconds is not None:
            steps_of[v] = max(1, round(seconds / step_s[v]))
        else:  # dry run: decided by a timing probe when the ablation starts
            steps_of[v], notes[v] = base_steps, "time budget: steps fixed by a timing probe at the start"
    if cfg.budget == "tokens":
        plan.budget_summary = f"same training tokens: {base_tokens:,} per cell ({base_steps} steps of the baseline)"
    elif cfg.budget == "flops":
        plan.budget_summary = (f"same training compute: {base_tokens * base_fpt:.3g} FLOPs per cell "
                               f"(the baseline's {base_tokens:,} tokens x {base_fpt:,} FLOPs/token)")
    else:
        plan.budget_summary = ("same wall-clock time: " + (f"{seconds:.1f} s of training per cell" if seconds
                               else "steps fixed from per-step timings") + " (steps from a timing probe of each "
                               "variant on this machine)")
    for (v, seed), spec in specs.items():
        spec = spec.model_copy(deep=True)
        if v not in own_budget:
            spec.train.max_steps = steps_of[v]
            spec.train.max_tokens = None
        tps = _tokens_per_step(spec)
        steps = _planned_steps(spec)
        digest = hashlib.sha256(dump_spec(spec).encode("utf-8")).hexdigest()
        plan.cells.append(Cell(v, seed, plan.variants[v], spec, digest, steps, steps * tps, tps, summaries[v][1],
                               summaries[v][0], notes.get(v, "")))
