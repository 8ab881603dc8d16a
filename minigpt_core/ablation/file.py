"""Ablation files: their schema, reading them, and the variants their named overrides and axes make.

A cell of the ablation is built from these by ``plan.py``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..base import toml as _toml
from ..base.errors import MinigptError, SpecError
from ..base.loader import resolve_plugin_ref
from ..base.reading import SPEC_LIMIT, read_text_bounded
from ..spec import apply_overrides, validation_problems

__all__ = ["AblationError", "AblationFile", "ReportOptions", "ScaleOptions", "TuneOptions", "EvaluateOptions",
           "SCALE_PRESET_FIELDS",
           "scale_sizes", "BUDGETS", "flatten_overrides", "read_ablation_file", "ablation_root"]


BUDGETS = ("tokens", "flops", "time")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# Set by the ablation itself; a variant that sets them would break the layout or the pairing.
_RESERVED = {"name": "the cell's run name is seed-<s>", "seed": "seeds come from the ablation's `seeds` list",
             "train.out_dir": "cells live under the base's train.out_dir/<ablation>; set it in the base",
             "wandb.group": "the ablation's name", "wandb.job_type": "the variant's name", "wandb.config": "the cell's overrides"}


class AblationError(MinigptError):
    """An ablation file or its cells failed validation, or an ablation cannot (re)start as asked."""


class ReportOptions(BaseModel):
    """The statistics of the report (the [report] table)."""

    model_config = ConfigDict(extra="forbid")

    correction: Literal["holm", "bonferroni", "none"] = Field(
        "holm", description="how the p-values of the variants' comparisons with the baseline are adjusted for "
        "their number: holm (default), bonferroni, or none")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise significance level of the verdicts (an "
                         "adjusted p-value below it, and |difference| above the noise floor)")


# What a size taken from a preset sets: its shape. The rest of the model (vocabulary, context, components)
# stays the base's, so the sizes differ only in width and depth.
SCALE_PRESET_FIELDS = ("emb_dim", "n_heads", "n_layers")


class ScaleOptions(BaseModel):
    """The same ablation at several model sizes (the [scale] table)."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[dict[str, Any]] = Field(default_factory=list, description="sizes as tables: {name = \"s\", "
                                        "\"model.emb_dim\" = 64, \"model.n_layers\" = 2, ...}, smallest first")
    presets: list[str] = Field(default_factory=list, description="sizes as preset names: each takes the preset's "
                               "model.emb_dim, model.n_heads and model.n_layers (instead of `sizes`)")
    budget: Literal["tokens_per_param", "fixed"] = Field(
        "fixed", description="training length at each size: tokens_per_param (steps = ceil(tokens_per_param x the "
        "baseline's parameters / tokens per step), Chinchilla-style) or fixed (the file's own steps at every size)")
    tokens_per_param: float | None = Field(None, gt=0, description="with budget = \"tokens_per_param\": training "
                                           "tokens per parameter (default 20)")

    @model_validator(mode="after")
    def _check(self) -> "ScaleOptions":
        from ..spec.presets import PRESETS

        problems = []
        if bool(self.sizes) == bool(self.presets):
            problems.append("give either sizes = [{name = ..., \"model.emb_dim\" = ...}, ...] or presets = [...], "
                            "not both and not neither")
        names = []
        for i, size in enumerate(self.sizes):
            name = size.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                problems.append(f"sizes[{i}]: name = {name!r}: give each size a name of letters, digits, '.', '_' "
                                f"or '-' (it names a directory)")
            elif len(flatten_overrides({k: v for k, v in size.items() if k != "name"})) == 0:
                problems.append(f"sizes[{i}] ({name}): no overrides; a size sets e.g. \"model.emb_dim\" and "
                                f"\"model.n_layers\"")
            names.append(name)
        for p in self.presets:
            if p not in PRESETS:
                problems.append(f"presets: unknown preset {p!r}; presets are: {', '.join(PRESETS)}")
            names.append(p)
        dup = sorted({str(n) for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"size names must be distinct: {', '.join(dup)} appear(s) twice")
        if len(names) < 2:
            problems.append(f"a scale study needs at least 2 sizes (got {len(names)})")
        if self.budget == "fixed" and self.tokens_per_param is not None:
            problems.append("tokens_per_param is set but budget = \"fixed\"; set budget = \"tokens_per_param\" "
                            "or drop it")
        if problems:
            raise ValueError("; ".join(problems))
        if self.budget == "tokens_per_param" and self.tokens_per_param is None:
            self.tokens_per_param = 20.0
        return self


def scale_sizes(scale: ScaleOptions) -> dict[str, dict[str, Any]]:
    """size name -> its dotted overrides, in the file's order."""
    from ..spec.presets import PRESETS

    if scale.presets:
        return {p: {f"model.{k}": PRESETS[p][k] for k in SCALE_PRESET_FIELDS} for p in scale.presets}
    return {s["name"]: flatten_overrides({k: v for k, v in s.items() if k != "name"}) for s in scale.sizes}


class TuneOptions(BaseModel):
    """A search of one field (the learning rate) per variant, on seeds of its own (the [tune] table)."""

    model_config = ConfigDict(extra="forbid")

    param: str = Field("train.lr", description="the dotted field searched (log scale), e.g. train.lr")
    seeds: list[int] = Field(min_length=1, description="the tuning seeds: every trial is the mean final validation "
                             "loss over them; they must differ from the evaluation seeds")
    grid: list[float] | None = Field(None, min_length=1, description="the values to try (instead of low/high)")
    low: float | None = Field(None, gt=0, description="the lower end of the searched range (log scale)")
    high: float | None = Field(None, gt=0, description="the upper end of the searched range (log scale)")
    trials: int | None = Field(None, ge=1, le=1000, description="with low/high: the grid's points (log-spaced, "
                               "ends included) or TPE's trial budget")
    sampler: Literal["grid", "tpe"] = Field("grid", description="grid: every value of the grid; tpe: Optuna's "
                                            "TPE sampler for `trials` trials (needs low/high)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="overrides for the trial runs only, "
                                      "e.g. a shorter train.max_steps")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 or s >= 2**63 for s in v):
            raise ValueError(f"tune.seeds must be distinct, >= 0 and < 2**63, got {v}")
        return v

    @model_validator(mode="after")
    def _range(self) -> "TuneOptions":
        ranged = self.low is not None or self.high is not None or self.trials is not None
        if self.grid is not None:
            if ranged:
                raise ValueError("[tune] gives both grid and low/high/trials: give either grid = [...] or "
                                 "low, high and trials")
            if self.sampler != "grid":
                raise ValueError("[tune] sampler = \"tpe\" searches a range: give low, high and trials instead "
                                 "of grid")
            if any(not (v > 0 and math.isfinite(v)) for v in self.grid) or len(set(self.grid)) != len(self.grid):
                raise ValueError(f"[tune] grid values must be distinct, finite and > 0 (a log scale), got "
                                 f"{self.grid}")
        else:
            if self.low is None or self.high is None or self.trials is None:
                raise ValueError("[tune] needs grid = [...], or low, high and trials")
            if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
                raise ValueError(f"[tune] needs 0 < low < high, got low = {self.low}, high = {self.high}")
            if self.sampler == "grid" and self.trials < 2:
                raise ValueError("[tune] a grid over [low, high] needs trials >= 2 (both ends)")
        if self.param in _RESERVED or self.param == "seed":
            raise ValueError(f"[tune] param = {self.param!r} is set by the ablation itself; search e.g. train.lr")
        bad = [k for k in flatten_overrides(self.overrides) if k in _RESERVED or k == self.param]
        if bad:
            raise ValueError(f"[tune] overrides cannot set {', '.join(bad)} (set by the ablation or the search)")
        return self

    def values(self) -> list[float]:
        """The grid searched (sorted), or for TPE the range's two ends."""
        if self.grid is not None:
            return sorted(self.grid)
        assert self.low is not None and self.high is not None and self.trials is not None
        if self.sampler == "tpe":
            return [self.low, self.high]
        lo, hi, n = math.log(self.low), math.log(self.high), self.trials
        # rounded to 6 significant digits: the values name directories and are shown in tables
        return [float(f"{math.exp(lo + (hi - lo) * i / (n - 1)):.6g}") for i in range(n)]

    def n_trials(self) -> int:
        return len(self.values()) if self.sampler == "grid" else int(self.trials or 0)


class EvaluateOptions(BaseModel):
    """Downstream tasks evaluated on each cell's final checkpoint (the [evaluate] table; `minigpt evaluate`)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1, description="lm_eval tasks: pydoc_mc, pydoc_cloze, pydoc (offline, they "
                             "ship with minigpt) or any task lm_eval knows (downloaded on first use)")
    num_fewshot: int | None = Field(None, ge=0, description="examples shown before each question (default: the "
                                    "task's own)")
    limit: float | None = Field(None, gt=0, description="at most this many examples per task (a fraction below 1: "
                                "that share)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        names = [t.strip() for t in v]
        if any(not t for t in names) or len(set(names)) != len(names):
            raise ValueError(f"evaluate.tasks must be distinct, non-empty task names, got {v}")
        return names


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
    report: ReportOptions = Field(default_factory=ReportOptions, description="the report's statistics: "
                                  "correction = \"holm\" | \"bonferroni\" | \"none\", alpha")
    scale: ScaleOptions | None = Field(None, description="the same ablation at several model sizes: sizes or "
                                       "presets, and budget = \"tokens_per_param\" | \"fixed\"")
    tune: TuneOptions | None = Field(None, description="optional: a learning-rate search per variant (with "
                                     "[scale]: per size and variant) on tuning seeds; the best value is then used "
                                     "for the variant's evaluation cells")
    evaluate: EvaluateOptions | None = Field(None, description="optional: lm_eval tasks evaluated on each cell's "
                                             "final checkpoint after it trains; the report adds their accuracy")

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
        # below 2**63 as the spec's seed: a cell's spec takes the seed without being parsed again
        if len(set(v)) != len(v) or any(s < 0 or s >= 2**63 for s in v):
            raise ValueError(f"seeds must be distinct, >= 0 and < 2**63, got {v}")
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
        if self.scale is not None and self.budget == "time":
            # a time budget is timed per variant; with sizes its steps would have to be timed per size too
            raise ValueError("budget = \"time\" cannot be combined with [scale]: use budget = \"tokens\" or "
                             "\"flops\" (each size's baseline sets that size's budget)")
        if self.tune is not None:
            shared = sorted(set(self.tune.seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"[tune] seeds {shared} are also evaluation seeds: a learning rate tuned on the "
                                 f"seeds it is judged on flatters it; give tune.seeds values not in seeds")
        return self


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
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{label}-{value}")


_MAX_AXIS_NAME = 64  # well under the 100 of _NAME: it is a directory, a W&B job type and a column in the tables


def _axes_name(labels: list[str], values: tuple[Any, ...]) -> str:
    """A variant name from its axis labels; a long one is cut and given a hash of the values, so it stays unique."""
    name = "_".join(labels)
    if name.startswith("."):  # a hidden directory
        name = "_" + name[1:]
    if len(name) <= _MAX_AXIS_NAME:
        return name
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode("utf-8")).hexdigest()[:8]
    return f"{name[:_MAX_AXIS_NAME - 9].rstrip('._-')}-{digest}"


def _combo_text(keys: list[str], values: tuple[Any, ...]) -> str:
    return ", ".join(f"{k} = {json.dumps(v, default=repr)}" for k, v in zip(keys, values))


def _variants(cfg: AblationFile) -> dict[str, dict[str, Any]]:
    out = {name: flatten_overrides(ov) for name, ov in cfg.variants.items()}
    if cfg.axes:
        keys = list(cfg.axes)
        combos = (itertools.product(*cfg.axes.values()) if cfg.combine == "grid" else zip(*cfg.axes.values()))
        made: dict[str, tuple[Any, ...]] = {}  # axis-made name -> the values that made it
        for values in combos:
            name = _axes_name([_axis_label(k, v) for k, v in zip(keys, values)], values)
            if name in made:
                same = "the same values twice" if made[name] == values else "two combinations"
                raise AblationError(
                    f"The axes make the variant name {name!r} from {same}: ({_combo_text(keys, made[name])}) and "
                    f"({_combo_text(keys, values)}). Characters other than letters, digits, '.', '_' and '-' "
                    f"become '_' in names; make the axis values distinct, or give these variants as named "
                    f"[variants.NAME] tables instead.")
            if name in out:
                raise AblationError(f"The axes ({_combo_text(keys, values)}) make a variant named {name!r}, which "
                                    f"is also a named variant; rename the named variant.")
            made[name] = values
            out[name] = flatten_overrides(dict(zip(keys, values)))
    return out


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return _toml.loads(read_text_bounded(path, what, SPEC_LIMIT, AblationError,
                                             hint="Give the path of a TOML file (docs/ablations.md)."))
    except FileNotFoundError:
        raise AblationError(f"No such {what}: {path}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AblationError(f"Cannot read the {what} {path}: {exc}.") from None
    except _toml.TOMLDecodeError as exc:
        raise AblationError(f"The {what} {path} is not valid TOML: {exc}.") from None


def _base_data(cfg: AblationFile, file: Path) -> tuple[dict[str, Any], str]:
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
        raise AblationError(str(SpecError(validation_problems(err, model=AblationFile), str(path)))
                            .replace("Invalid experiment spec", "Invalid ablation file", 1)) from None
