"""Ablation plans: an ablation file expanded into cells (variant x seed), every cell validated, budgets fixed.

Every cell is a complete experiment spec. The whole ablation is validated before anything runs
and every problem comes back at once, naming the cell and the dotted path. The file itself is
read by ``file.py``; each variant's steps under the budget come from ``budgets.py``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..base.errors import MinigptError, SpecError
from ..base.loader import resolve_plugin_ref
from ..spec import ExperimentSpec, apply_overrides, dump_spec, parse_spec
from .budgets import fix_budgets, planned_steps, tokens_per_step
from .file import (
    _NAME,
    _RESERVED,
    BUDGETS,
    AblationError,
    AblationFile,
    _base_data,
    _root_of,
    _set_dotted,
    _variants,
    ablation_root,
    scale_sizes,
    flatten_overrides,
    read_ablation_file,
)

__all__ = ["AblationError", "AblationFile", "Cell", "Plan", "load_plan", "count_cells", "MAX_CELLS",
           "flatten_overrides", "BUDGETS", "ablation_root", "read_ablation_file"]


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
    size: str = ""  # with [scale]: the size's name ("" without)

    @property
    def id(self) -> str:
        return f"{self.size}/{self.variant}/seed-{self.seed}" if self.size else f"{self.variant}/seed-{self.seed}"

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
    # budget = "time": each timed variant's seconds per step (from probe_step_seconds) and the
    # seconds of training per cell they were divided into (None when steps came from the manifest)
    step_seconds: dict[str, float] = field(default_factory=dict)
    time_budget_s: float | None = None
    same_spec: list[list[str]] = field(default_factory=list)  # variants that resolve to the same spec
    # with [scale]: size -> {"overrides", "params" (the baseline's), "steps", "tokens"}, in the file's order
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"file": str(self.file), "seeds": list(c.seeds), "baseline": self.baseline, "budget": c.budget,
                "time_budget_s": c.time_budget_s, "combine": c.combine, "set": list(self.sets),
                "nproc_per_node": c.nproc_per_node, "budget_summary": self.budget_summary,
                "description": self.description, "report": c.report.model_dump(),
                **({"scale": {"budget": c.scale.budget, "tokens_per_param": c.scale.tokens_per_param,
                              "sizes": self.sizes}} if c.scale is not None else {}),
                **({"evaluate": c.evaluate.model_dump()} if c.evaluate is not None else {}),
                "wandb": self.cells[0].spec.wandb.model_dump(include={"mode", "project", "entity"}) if self.cells
                else {}}


MAX_CELLS = 1000  # more is refused unless raised (--max-cells): a typo in an axis can make a huge grid


def count_cells(cfg: AblationFile) -> tuple[int, int]:
    """(variants, seeds) of the file, counted from its tables without expanding or validating anything."""
    axes = list(cfg.axes.values())
    n_axes = 0 if not axes else (math.prod(len(v) for v in axes) if cfg.combine == "grid" else len(axes[0]))
    n_sizes = len(scale_sizes(cfg.scale)) if cfg.scale is not None else 1
    return (len(cfg.variants) + n_axes) * n_sizes, len(cfg.seeds)


def load_plan(path: str | Path, sets: list[str] | None = None, *, time_steps: Mapping[str, int] | None = None,
              probe: bool = True, threads: int | None = None, max_cells: int = MAX_CELLS,
              on_count: Callable[[str, int, int], None] | None = None) -> Plan:
    """Read the ablation file, build and validate every cell, and fix their budgets.

    ``time_steps``: with budget = "time", steps already decided (kept in the manifest), so a rerun
    does not time the models again; ``probe=False`` (dry run) leaves undecided time budgets at the
    baseline's steps. ``on_count(name, variants, seeds)`` is called before any cell is built;
    more than ``max_cells`` cells are refused.
    """
    file = Path(path)
    cfg = read_ablation_file(file)
    name = cfg.name or file.stem
    n_variants, n_seeds = count_cells(cfg)
    if n_variants * n_seeds > max_cells:
        raise AblationError(f"{file} makes {n_variants * n_seeds:,} cells ({n_variants:,} variants x {n_seeds} "
                            f"seeds), more than the {max_cells:,} allowed; nothing was run. Check the [axes] "
                            f"(a grid multiplies their lengths), or pass --max-cells {n_variants * n_seeds} if "
                            f"you mean it.")
    if on_count is not None:
        on_count(name, n_variants, n_seeds)
    sets = list(sets or [])
    set_values = flatten_overrides(apply_overrides({}, sets))
    base, base_shown = _base_data(cfg, file)
    for key, value in [*flatten_overrides(cfg.common).items(), *set_values.items()]:
        _set_dotted(base, key, value)
    if not _NAME.fullmatch(name):
        raise AblationError(f"The ablation file's name {file.stem!r} cannot name a directory; set name = \"...\" "
                            f"in it (letters, digits, '.', '_' or '-').")
    root = _root_of(base, name)
    variants = _variants(cfg)
    baseline = cfg.baseline or next(iter(variants))
    if baseline not in variants:
        raise AblationError(f"baseline = {baseline!r} is not a variant of {file}; its variants are: "
                            f"{', '.join(variants)}.")

    problems: list[tuple[str, list[tuple[str, str]]]] = []  # (variant, [(path, reason)]): all its seeds
    sizes = scale_sizes(cfg.scale) if cfg.scale is not None else {"": {}}
    size_keys = {k for ov in sizes.values() for k in ov}
    for size, ov in sizes.items():
        bad = [(k, f"cannot be set by a size: {why}") for k, why in _RESERVED.items() if k in ov]
        if bad:
            problems.append((f"size {size}", bad))
    specs_by_size: dict[str, dict[tuple[str, int], ExperimentSpec]] = {size: {} for size in sizes}
    for (size, size_ov), (variant, overrides) in itertools.product(sizes.items(), variants.items()):
        label = f"{size}/{variant}" if size else variant
        bad = [(k, f"cannot be set by a variant: {why}") for k, why in _RESERVED.items() if k in overrides]
        # the variant would win over the size, and its sizes would all be one model
        bad += [(k, "is set by [scale] sizes; a variant may not set it too") for k in overrides if k in size_keys]
        if bad:
            if (variant, bad) not in problems:
                problems.append((variant, bad))
            continue
        # The seeds of a variant differ only in seed, name and wandb.config: the variant's spec is
        # validated once (plugins loaded, components resolved) and each seed's cell is a copy of it.
        raw = copy.deepcopy(base)
        out_dir = root / size / variant if size else root / variant
        try:
            for key, value in size_ov.items():
                _set_dotted(raw, key, value)
            for key, value in overrides.items():
                if key == "plugins" and isinstance(value, list):  # relative to the ablation file
                    value = [resolve_plugin_ref(r, file.parent) if isinstance(r, str) else r for r in value]
                _set_dotted(raw, key, value)
            for key, value in set_values.items():  # --set wins: it is the command line's last word
                _set_dotted(raw, key, value)
            raw["name"], raw["seed"] = f"seed-{cfg.seeds[0]}", cfg.seeds[0]
            _set_dotted(raw, "train.out_dir", str(out_dir))
            _set_dotted(raw, "wandb.group", name)
            _set_dotted(raw, "wandb.job_type", variant)
            _set_dotted(raw, "wandb.config", _wandb_config(name, variant, cfg.seeds[0], overrides, size))
            first = parse_spec(raw)
        except SpecError as exc:
            problems.append((label, exc.problems))
            continue
        except MinigptError as exc:  # e.g. a plugin file that does not load
            problems.append((label, [("plugins", str(exc))]))
            continue
        for seed in cfg.seeds:
            spec = first if seed == cfg.seeds[0] else first.model_copy(deep=True)
            if seed != cfg.seeds[0]:  # validated on assignment
                spec.name, spec.seed = f"seed-{seed}", seed
                spec.wandb.config = _wandb_config(name, variant, seed, overrides, size)
            specs_by_size[size][(variant, seed)] = spec
    if problems:
        raise AblationError(_problem_message(file, base_shown, problems, cfg.seeds))

    plan = Plan(file=file.resolve(), name=name, description=cfg.description, root=root, config=cfg, sets=sets,
                baseline=baseline, variants=variants)
    summaries = []
    for size, specs in specs_by_size.items():
        if cfg.scale is not None and cfg.scale.budget == "tokens_per_param" and not (
                {"train.max_steps", "train.max_tokens"} & set(set_values)):  # --set has the last word
            scale_steps(specs, baseline, variants, cfg.scale.tokens_per_param)
        _apply_budgets(plan, specs, time_steps or {}, probe, threads, size)
        if size:
            base_cell = next(c for c in plan.cells if c.size == size and c.variant == baseline)
            plan.sizes[size] = {"overrides": sizes[size], "params": base_cell.params, "steps": base_cell.steps,
                                "tokens": base_cell.tokens}
            summaries.append(f"{size}: {plan.budget_summary}")
    if summaries:
        per = (f"{cfg.scale.tokens_per_param:g} tokens per baseline parameter at each size"
               if cfg.scale.budget == "tokens_per_param" else "the file's own steps at every size")
        plan.budget_summary = f"[scale] {per}; " + "; ".join(summaries)
    plan.same_spec = _same_specs(plan)
    return plan


def scale_steps(specs: Mapping[tuple[str, int], ExperimentSpec], baseline: str,
                variants: Mapping[str, Mapping[str, Any]], tokens_per_param: float) -> int:
    """Set every cell of one size (but a variant with its own budget) to ceil(tokens_per_param x the baseline's
    parameters / tokens per step) steps; the file's budget then matches the other variants to the baseline."""
    base_spec = next(s for (v, _), s in specs.items() if v == baseline)
    params = _count_params(base_spec)
    steps = max(1, math.ceil(tokens_per_param * params / tokens_per_step(base_spec)))
    for (v, _), spec in specs.items():
        if not {"train.max_steps", "train.max_tokens"} & set(variants[v]):
            spec.train.max_steps = steps
            spec.train.max_tokens = None
    return steps


def _count_params(spec: ExperimentSpec) -> int:
    from ..assembly import summarize_spec  # lazy, as budgets._summary

    return summarize_spec(spec).total


def _wandb_config(name: str, variant: str, seed: int, overrides: Mapping[str, Any], size: str = "") -> dict[str, Any]:
    return {"ablation": name, "variant": variant, "seed": seed, "overrides": dict(overrides),
            **({"size": size} if size else {})}


def _same_specs(plan: Plan) -> list[list[str]]:
    """Groups of variants whose cells would train the same thing (their specs differ only in where they live)."""
    seed, size = plan.config.seeds[0], plan.cells[0].size if plan.cells else ""
    groups: dict[str, list[str]] = {}
    for c in plan.cells:
        if c.seed != seed or c.size != size:
            continue
        data = c.spec.model_dump(mode="json")
        del data["train"]["out_dir"], data["wandb"]["job_type"], data["wandb"]["config"]
        groups.setdefault(json.dumps(data, sort_keys=True), []).append(c.variant)
    return [g for g in groups.values() if len(g) > 1]


def _problem_message(file: Path, base_shown: str, problems: list[tuple[str, list[tuple[str, str]]]],
                     seeds: list[int]) -> str:
    # A variant's problem is the same in every seed (they differ only in the seed): said once.
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    parts = [f"cell(s) of variant {variant!r} ({which}): {path}: {reason}"
             for variant, items in problems for path, reason in dict.fromkeys(items)]
    n = len(parts)
    return (f"Invalid ablation {file} (base: {base_shown}); nothing was run. {n} problem{'s' if n > 1 else ''}: "
            + "; ".join(parts) + ". Fix the variant's overrides (or the base), then run again; "
            "`minigpt ablate FILE --dry-run` checks the file without running anything.")


def _apply_budgets(plan: Plan, specs: dict[tuple[str, int], ExperimentSpec], time_steps: Mapping[str, int],
                   probe: bool, threads: int | None, size: str = "") -> None:
    b = fix_budgets(plan.config, plan.baseline, plan.variants, specs, time_steps, probe, threads)
    plan.budget_summary = b.summary
    plan.step_seconds, plan.time_budget_s = b.step_seconds, b.seconds
    own_budget, steps_of, notes, summaries = b.own, b.steps, b.notes, b.sizes
    for (v, seed), spec in specs.items():
        spec = spec.model_copy(deep=True)
        if v not in own_budget:
            spec.train.max_steps = steps_of[v]
            spec.train.max_tokens = None
        tps = tokens_per_step(spec)
        steps = planned_steps(spec)
        digest = hashlib.sha256(dump_spec(spec).encode("utf-8")).hexdigest()
        plan.cells.append(Cell(v, seed, plan.variants[v], spec, digest, steps, steps * tps, tps, summaries[v][1],
                               summaries[v][0], notes.get(v, ""), size))
