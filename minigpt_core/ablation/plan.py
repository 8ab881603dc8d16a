"""Ablation plans: an ablation file expanded into cells (variant x seed), every cell validated, budgets fixed.

Every cell is a complete experiment spec. The whole ablation is validated before anything runs
and every problem comes back at once, naming the cell and the dotted path. The file itself is
read by ``file.py``; each variant's steps under the budget come from ``budgets.py``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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

__all__ = ["AblationError", "AblationFile", "Cell", "Plan", "load_plan", "flatten_overrides", "BUDGETS",
           "ablation_root", "read_ablation_file"]


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

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"file": str(self.file), "seeds": list(c.seeds), "baseline": self.baseline, "budget": c.budget,
                "time_budget_s": c.time_budget_s, "combine": c.combine, "set": list(self.sets),
                "nproc_per_node": c.nproc_per_node, "budget_summary": self.budget_summary,
                "description": self.description,
                "wandb": self.cells[0].spec.wandb.model_dump(include={"mode", "project", "entity"}) if self.cells
                else {}}


def load_plan(path: str | Path, sets: list[str] | None = None, *, time_steps: Mapping[str, int] | None = None,
              probe: bool = True, threads: int | None = None) -> Plan:
    """Read the ablation file, build and validate every cell, and fix their budgets.

    ``time_steps``: with budget = "time", steps already decided (kept in the manifest), so a rerun
    does not time the models again; ``probe=False`` (dry run) leaves undecided time budgets at the
    baseline's steps.
    """
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
