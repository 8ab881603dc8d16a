"""What a resume may change: the run's own spec, the fields a resume may set, and the refusal of the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..base import toml as _toml
from ..base.toml import flatten  # noqa: F401  (in base, so that `minigpt runs` reads specs without torch)
from ..checkpoints.checkpoint import SPEC_FILE, check_plugin_files
from ..base.errors import MinigptError
from ..base.registry import ComponentRegistry
from ..spec import ExperimentSpec, apply_overrides, parse_spec
from .run_dir import experiment_dir
from ..checkpoints.state import resolve_checkpoint

__all__ = ["RESUME_SAFE_FIELDS", "resume_target", "resumed_spec", "run_spec", "saved_spec_data",
           "spec_differences", "flatten"]

# What a resume may change: the budget, the bookkeeping and where things go, nothing that
# changes the optimisation of the steps already planned (wandb.* is matched as a prefix).
RESUME_SAFE_FIELDS = (
    "train.max_steps", "train.max_tokens", "train.eval_every", "train.sample_every", "train.save_every",
    "train.log_every", "train.keep_last", "train.keep_best", "train.threads", "train.device", "train.compile",
    "train.out_dir", "train.peak_flops", "train.sample_prompt", "train.sample_tokens", "train.sample_temperature",
    "train.sample_top_k", "train.log_attention_every", "train.attention_prompt", "data.cache_dir", "data.workers", "description", "wandb.*",
    "train.meta_init", "train.sharded_checkpoint",  # how the model is built and saved, not what it learns
    "train.loss_chunk", "train.activation_checkpointing",  # memory knobs: the same function
)
_UNSET = object()


def _safe_on_resume(key: str) -> bool:
    return key in RESUME_SAFE_FIELDS or key.split(".")[0] + ".*" in RESUME_SAFE_FIELDS


def spec_differences(spec: ExperimentSpec, saved: ExperimentSpec) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (the run's value, the new value) where they differ."""
    a, b = flatten(saved.model_dump(mode="json")), flatten(spec.model_dump(mode="json"))
    pairs = {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b))}
    out = {k: (old, new) for k, (old, new) in pairs.items() if old != new}
    if spec.init_from is not None and spec.init_from == saved.init_from:
        # The run's model section was read from the init_from weights; the file's is only a sketch.
        out = {k: v for k, v in out.items() if not k.startswith("model.")}
    for key in ("classification.classes", "classification.max_length",  # a run stores what it read from data
                "instruction.max_length", "instruction.eot_id"):
        if key in out and out[key][1] is None:
            del out[key]
    return out


def _shown(value: Any) -> str:
    return "(unset)" if value is _UNSET or value is None else repr(value)


def resumed_spec(spec: ExperimentSpec | None, saved: ExperimentSpec, ckpt: Path,
                 write: Callable[[str], None]) -> ExperimentSpec:
    """The run's own spec, with the changes a resume may make; any other change is refused."""
    if spec is None:
        return saved
    diff = spec_differences(spec, saved)
    unsafe = {k: v for k, v in diff.items() if not _safe_on_resume(k)}
    if unsafe:
        fields = "; ".join(f"{k}: the run has {_shown(old)}, now {_shown(new)}" for k, (old, new) in unsafe.items())
        raise MinigptError(
            f"Cannot resume from {ckpt}: the experiment file / --set values differ from the run's own spec "
            f"({ckpt.parent.parent / 'spec.toml'}) in {len(unsafe)} field(s) that change the training: {fields}. "
            f"Resume with the run's spec: `minigpt train --resume {ckpt}` (no experiment file; --set may change "
            f"only {', '.join(RESUME_SAFE_FIELDS)}); or train a new run with the changed spec, e.g. with "
            f"init_from = \"{ckpt}\" to start from these weights.")
    if not diff:
        return saved
    write("note: resuming with changes to the run's spec: "
          + "; ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in diff.items()))
    data = saved.model_dump(mode="json")
    for key, (_, new) in diff.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if new is _UNSET:
            node.pop(leaf, None)
        else:
            node[leaf] = new
    return parse_spec(data, registry=saved.registry)


def saved_spec_data(ckpt: Path) -> dict[str, Any]:
    """The raw spec a checkpoint was written with (its plugin files checked)."""
    data = _toml.loads((ckpt / SPEC_FILE).read_text(encoding="utf-8"))  # hash-verified on load
    return check_plugin_files(ckpt, data)


def run_spec(path: str | Path, overrides: list[str] | None = None,
             registry: ComponentRegistry | None = None) -> ExperimentSpec:
    """The spec a run (or checkpoint, or experiment directory: its latest run) was trained with, plus ``--set``s."""
    ckpt = resolve_checkpoint(path, prefer="latest")
    data = saved_spec_data(ckpt)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, source=str(ckpt / "spec.toml"), registry=registry)


def resume_target(spec: ExperimentSpec | None, resume: str | Path | bool | None,
                  notes: list[str]) -> tuple[ExperimentSpec, Path | None]:
    """(the spec to train, the checkpoint to resume or None): ``resume=True`` is the experiment's latest
    run, a path that run or checkpoint. Notes about changes to the run's spec go to ``notes``."""
    if resume is None or resume is False:
        if spec is None:
            raise MinigptError("Nothing to train: give an experiment spec, or a run or checkpoint to resume.")
        return spec, None
    if resume is True and spec is None:
        raise MinigptError("resume=True continues the experiment's latest run, so it needs the experiment "
                           "spec; or give the run or checkpoint to resume instead.")
    target = experiment_dir(spec) if resume is True else Path(resume)
    ckpt = resolve_checkpoint(target, prefer="latest")
    # The registry is the spec's (chosen when it was parsed), else the process default.
    saved = parse_spec(saved_spec_data(ckpt), source=str(ckpt),
                       registry=spec.registry if spec is not None else None)
    return resumed_spec(spec, saved, ckpt, notes.append), ckpt
