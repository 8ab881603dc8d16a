"""An ablation's fair budgets: every cell gets as many training tokens, FLOPs or seconds as the baseline.

A time budget times each variant's model on this machine (:func:`probe_step_seconds`); the
other two follow from the specs and the model summaries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..base.device import select_device
from ..model.build import build_model
from ..spec import ExperimentSpec
from .file import AblationFile

__all__ = ["Budgets", "fix_budgets", "planned_steps", "probe_step_seconds", "tokens_per_step"]


def tokens_per_step(spec: ExperimentSpec) -> int:
    return spec.train.batch_size * (spec.data.max_length or spec.model.context_length)


def planned_steps(spec: ExperimentSpec) -> int:
    t, tps = spec.train, tokens_per_step(spec)
    return int(min(t.max_steps or math.inf, math.ceil(t.max_tokens / tps) if t.max_tokens else math.inf))


def _summary(spec: ExperimentSpec) -> tuple[int, int]:
    # The assembly and the training stack are imported where they are used: `minigpt ablate`'s
    # arguments come from ablation.runner, which imports this module, and `minigpt --help` builds them.
    from ..assembly import summarize_spec

    s = summarize_spec(spec)
    return s.total, s.flops_per_token


def probe_step_seconds(spec: ExperimentSpec, threads: int | None = None, steps: int = 3) -> float:
    """Seconds per optimizer step of the spec's model on this machine (random tokens, after a warm-up step)."""
    from ..tasks.evaluate import lm_loss
    from ..train.optim import build_optimizer  # (lazy: see _summary)

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


@dataclass
class Budgets:
    """Each variant's optimizer steps under the ablation's budget."""

    steps: dict[str, int]  # variant -> steps
    own: set[str]  # variants that set train.max_steps/max_tokens themselves: their specs keep them
    notes: dict[str, str]  # variant -> how its budget was decided, where that needs saying
    sizes: dict[str, tuple[int, int]]  # variant -> (parameters, FLOPs per token)
    summary: str  # one line for the plan and the report
    # budget = "time": each timed variant's seconds per step (from probe_step_seconds) and the
    # seconds of training per cell they were divided into (None when steps came from the manifest)
    step_seconds: dict[str, float]
    seconds: float | None


def fix_budgets(cfg: AblationFile, baseline: str, variants: Mapping[str, Mapping[str, Any]],
                specs: Mapping[tuple[str, int], ExperimentSpec], time_steps: Mapping[str, int],
                probe: bool, threads: int | None) -> Budgets:
    """The steps of each variant (from its first seed's spec) that give it the baseline's budget."""
    first_seed = cfg.seeds[0]
    base_spec = specs[(baseline, first_seed)]
    base_steps, base_tps = planned_steps(base_spec), tokens_per_step(base_spec)
    base_tokens = base_steps * base_tps
    # Counting builds the model (on the meta device): once per distinct model, not per variant, since a
    # grid over training settings has a thousand variants and one model.
    by_model: dict[str, tuple[int, int]] = {}
    summaries = {}
    for v in variants:
        spec = specs[(v, first_seed)]
        key = spec.model_dump_json(exclude={"train", "wandb", "name", "seed", "description"})
        if key not in by_model:
            by_model[key] = _summary(spec)
        summaries[v] = by_model[key]
    base_fpt = summaries[baseline][1]
    own_budget = {v for v, ov in variants.items() if {"train.max_steps", "train.max_tokens"} & set(ov)}
    seconds = None
    step_s: dict[str, float] = {}
    if cfg.budget == "time":
        for v in variants:
            if v not in time_steps and probe:
                step_s[v] = probe_step_seconds(specs[(v, first_seed)], threads)
        if cfg.time_budget_s is not None:
            seconds = cfg.time_budget_s
        elif baseline in time_steps:
            seconds = None  # steps already fixed in the manifest
        elif probe:
            seconds = base_steps * step_s[baseline]
    steps_of: dict[str, int] = {}
    notes: dict[str, str] = {}
    for v in variants:
        spec = specs[(v, first_seed)]
        tps, fpt = tokens_per_step(spec), summaries[v][1]
        if v in own_budget:
            steps_of[v], notes[v] = planned_steps(spec), "its own train.max_steps/max_tokens"
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
        summary = f"same training tokens: {base_tokens:,} per cell ({base_steps} steps of the baseline)"
    elif cfg.budget == "flops":
        summary = (f"same training compute: {base_tokens * base_fpt:.3g} FLOPs per cell "
                   f"(the baseline's {base_tokens:,} tokens x {base_fpt:,} FLOPs/token)")
    else:
        summary = ("same wall-clock time: " + (f"{seconds:.1f} s of training per cell" if seconds
                   else "steps fixed from per-step timings") + " (steps from a timing probe of each "
                   "variant on this machine)")
    return Budgets(steps_of, own_budget, notes, summaries, summary, step_s, seconds)
