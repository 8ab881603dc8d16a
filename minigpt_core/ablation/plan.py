"""Ablation plans: an ablation file expanded into cells (variant x seed), every cell validated, budgets fixed.

Every cell is a complete experiment spec. The whole ablation is validated before anything runs
and every problem comes back at once, naming the cell and the dotted path. The file itself is
read by ``file.py``; each variant's steps under the budget come from ``budgets.py``.
"""

from __future__ import annotations

import copy
import hashlib
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
    # budget = "time": each timed variant's seconds per step (from probe_step_seconds) and the
    # seconds of training per cell they were divided into (None when steps came from the manifest)
    step_seconds: dict[str, float] = field(default_factory=dict)
    time_budget_s: float | None = None
    same_spec: list[list[str]] = field(default_factory=list)  # variants that resolve to the same spec

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"file": str(self.file), "seeds": list(c.seeds), "baseline": self.baseline, "budget": c.budget,
                "time_budget_s": c.time_budget_s, "combine": c.combine, "set": list(self.sets),
                "nproc_per_node": c.nproc_per_node, "budget_summary": self.budget_summary,
                "description": self.description, "report": c.report.model_dump(),
                "wandb": self.cells[0].spec.wandb.model_dump(include={"mode", "project", "entity"}) if self.cells
                else {}}


MAX_CELLS = 1000  # more is refused unless raised (--max-cells): a typo in an axis can make a huge grid


def count_cells(cfg: AblationFile) -> tuple[int, int]:
    """(variants, seeds) of the file, counted from its tables without expanding or validating anything."""
    axes = list(cfg.axes.values())
    n_axes = 0 if not axes else (math.prod(len(v) for v in axes) if cfg.combine == "grid" else len(axes[0]))
    return len(cfg.variants) + n_axes, len(cfg.seeds)


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
    specs: dict[tuple[str, int], ExperimentSpec] = {}
    for variant, overrides in variants.items():
        bad = [(k, f"cannot be set by a variant: {why}") for k, why in _RESERVED.items() if k in overrides]
        if bad:
            problems.append((variant, bad))
            continue
        # The seeds of a variant differ only in seed, name and wandb.config: the variant's spec is
        # validated once (plugins loaded, components resolved) and each seed's cell is a copy of it.
        raw = copy.deepcopy(base)
        try:
            for key, value in overrides.items():
                if key == "plugins" and isinstance(value, list):  # relative to the ablation file
                    value = [resolve_plugin_ref(r, file.parent) if isinstance(r, str) else r for r in value]
                _set_dotted(raw, key, value)
            for key, value in set_values.items():  # --set wins: it is the command line's last word
                _set_dotted(raw, key, value)
            raw["name"], raw["seed"] = f"seed-{cfg.seeds[0]}", cfg.seeds[0]
            _set_dotted(raw, "train.out_dir", str(root / variant))
            _set_dotted(raw, "wandb.group", name)
            _set_dotted(raw, "wandb.job_type", variant)
            _set_dotted(raw, "wandb.config", _wandb_config(name, variant, cfg.seeds[0], overrides))
            first = parse_spec(raw)
        except SpecError as exc:
            problems.append((variant, exc.problems))
            continue
        except MinigptError as exc:  # e.g. a plugin file that does not load
            problems.append((variant, [("plugins", str(exc))]))
            continue
        for seed in cfg.seeds:
            spec = first if seed == cfg.seeds[0] else first.model_copy(deep=True)
            if seed != cfg.seeds[0]:  # validated on assignment
                spec.name, spec.seed = f"seed-{seed}", seed
                spec.wandb.config = _wandb_config(name, variant, seed, overrides)
            specs[(variant, seed)] = spec
    if problems:
        raise AblationError(_problem_message(file, base_shown, problems, cfg.seeds))

    plan = Plan(file=file.resolve(), name=name, description=cfg.description, root=root, config=cfg, sets=sets,
                baseline=baseline, variants=variants)
    _apply_budgets(plan, specs, time_steps or {}, probe, threads)
    plan.same_spec = _same_specs(plan)
    return plan


def _wandb_config(name: str, variant: str, seed: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {"ablation": name, "variant": variant, "seed": seed, "overrides": dict(overrides)}


def _same_specs(plan: Plan) -> list[list[str]]:
    """Groups of variants whose cells would train the same thing (their specs differ only in where they live)."""
    seed = plan.config.seeds[0]
    groups: dict[str, list[str]] = {}
    for c in plan.cells:
        if c.seed != seed:
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
                   probe: bool, threads: int | None) -> None:
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
                               summaries[v][0], notes.get(v, "")))
