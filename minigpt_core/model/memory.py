"""Will a model fit? Parameter counts from meta-device builds and the memory free on a device.

A spec that asks for more memory than the machine has is refused before anything is allocated
(instead of the OS killing the process part-way); training gets a rough activation warning on top.
"""

from __future__ import annotations

import os

import torch

from ..base.errors import InsufficientMemoryError
from .gpt import GPT
from ..spec import ModelSpec, ResolvedComponent

__all__ = ["estimate_model_size", "check_model_fits", "available_memory", "training_memory_warning"]

_GiB = 2**30


def _meta_counts(model: ModelSpec, components: dict[str, ResolvedComponent], n_layers: int) -> tuple[int, int]:
    with torch.device("meta"):
        gpt = GPT(model.model_copy(update={"n_layers": n_layers}), components)
    return (sum(p.numel() for p in gpt.parameters()),
            sum(b.numel() * b.element_size() for b in gpt.buffers()))


def estimate_model_size(model: ModelSpec, components: dict[str, ResolvedComponent]) -> tuple[int, int] | None:
    """(parameters, buffer bytes) of the model, from meta-device builds (nothing allocated).

    Deep models are extrapolated from 2 and 4 layers, so a 100,000-layer spec costs two small builds.
    None when a component cannot be built on the meta device (the real build then speaks for itself).
    """
    n = model.n_layers
    try:
        if n <= 4:
            return _meta_counts(model, components, n)
        (p2, b2), (p4, b4) = _meta_counts(model, components, 2), _meta_counts(model, components, 4)
    except Exception:
        return None
    return p2 + (n - 2) * (p4 - p2) // 2, b2 + (n - 2) * (b4 - b2) // 2


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device`` (CPU: MemAvailable), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_model_fits(model: ModelSpec, *, training: bool, device: torch.device | str = "cpu") -> int | None:
    """Raise InsufficientMemoryError if the model's weights (4 bytes a parameter), or for training also its
    gradients and AdamW moments (16 bytes a parameter), exceed the memory free on ``device``.

    Returns the parameter count (None if it could not be estimated). Activations come on top.
    """
    available = available_memory(device)
    if available is None:
        return None
    per_param = 16 if training else 4
    # A generous bound on a transformer's size: tiny models skip the meta builds.
    e, v = model.emb_dim, model.vocab_size
    rough = 2 * v * e + model.context_length * (e + model.context_length) + model.n_layers * 32 * e * e
    if rough * per_param * 16 < available:
        return None
    size = estimate_model_size(model, model.components)
    if size is None:
        return None
    params, buffers = size
    need = params * per_param + buffers
    if need > available:
        what = ("training it (16 bytes a parameter: fp32 weights, gradients and AdamW's two moments, before "
                "activations)" if training else "holding its fp32 weights (4 bytes a parameter)")
        raise InsufficientMemoryError(
            f"The model is too large for this machine: {params:,} parameters ({model.n_layers:,} layers, emb "
            f"{model.emb_dim:,}, vocabulary {model.vocab_size:,}); {what} needs about {need / _GiB:,.1f} GiB, "
            f"but {torch.device(device)} has {available / _GiB:,.1f} GiB available. Make the model smaller "
            f"(model.n_layers, model.emb_dim, model.vocab_size) or use a machine with more memory."
        )
    return params


def training_memory_warning(model: ModelSpec, n_params: int, micro_batch: int, seq_len: int,
                            device: torch.device | str) -> str | None:
    """A warning when weights, AdamW state and a rough fp32 activation estimate exceed the free memory.

    Activations follow Korthikanti et al. 2022 (34 C + 5 H T values a token and layer, doubled for fp32,
    with attention scores materialised) plus the logits and their gradient; only a hint, never a refusal.
    """
    available = available_memory(device)
    if available is None:
        return None
    tokens = micro_batch * seq_len
    activations = tokens * model.n_layers * (34 * model.emb_dim + 5 * model.n_heads * seq_len) * 2
    activations += tokens * model.vocab_size * 4 * 2
    need = n_params * 16 + activations
    if need <= available:
        return None
    return (f"training needs roughly {need / _GiB:,.1f} GiB ({n_params * 16 / _GiB:,.1f} GiB for weights, gradients "
            f"and AdamW state, about {activations / _GiB:,.1f} GiB of activations for {micro_batch} x {seq_len} "
            f"tokens per micro-batch), but {torch.device(device)} has {available / _GiB:,.1f} GiB available: "
            f"the run may be killed for memory. Lower train.micro_batch_size (batch_size stays, by gradient "
            f"accumulation) or data.max_length")
