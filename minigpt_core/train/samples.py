"""What a run shows of its model as it trains: text samples (``train.sample_every``) and attention
maps (``train.log_attention_every``). Both leave the training RNG untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..base.errors import MinigptError
from ..model.generate import generate
from ..inspection import log_attention_maps
from ..spec import ExperimentSpec
from ..base.device import autocast

__all__ = ["sample_text", "attention_maps"]


def sample_text(model: nn.Module, tokenizer: Any, task: Any, spec: ExperimentSpec, step: int,
                device: torch.device, write: Callable[[str], None]) -> str | None:
    """The model's continuation of the task's sample prompt (None: the task writes no text, or the
    prompt cannot be encoded); seeded from the step."""
    t = spec.train
    text = task.sample_prompt()
    if text is None:  # a classifier's head predicts classes, not tokens
        return None
    try:
        prompt = tokenizer.encode(text)
    except MinigptError as exc:
        write(f"note: no sample: the prompt cannot be encoded ({exc})")
        return None
    if not prompt:
        prompt = [tokenizer.eot_id or 0]
    # A task's sample (an instruction's response) ends at its end-of-text id, which may lie just
    # past the tokenizer's vocabulary (a char tokenizer has none of its own).
    eos = task.sample_eos()
    idx = torch.tensor([prompt[-spec.model.context_length:]], device=device)
    gen = torch.Generator(device).manual_seed(spec.seed + step)  # training RNG untouched
    with autocast(device, t.precision):
        out = generate(model, idx, t.sample_tokens, temperature=t.sample_temperature, top_k=t.sample_top_k,
                       generator=gen, n_vocab=max(tokenizer.n_vocab, (eos or 0) + 1), eos_id=eos)
    ids = out[0, idx.shape[1]:].tolist()
    return tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)


def attention_maps(model: nn.Module, tokenizer: Any, spec: ExperimentSpec, step: int, run_dir: Path, *,
                   is_main: bool, write: Callable[[str], None]) -> dict[str, Path]:
    """The prompt's attention maps, into RUN/attention/step-N/ (rank 0 writes): key -> PNG file."""
    t = spec.train
    paths = log_attention_maps(model, tokenizer, t.attention_prompt or t.sample_prompt,
                               run_dir / "attention" / f"step-{step}", write=is_main,
                               title=f"{spec.name} step {step}", note=write)
    return {f"attention/layer-{i}": p for i, p in enumerate(paths or [])}
