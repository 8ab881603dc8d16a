"""A built model's weights as checkpoints hold them, and loading weights into a model."""

from __future__ import annotations

import torch

from ..base.errors import CheckpointError
from .gpt import GPT

__all__ = ["model_weights", "model_state_for_saving", "load_model_state"]


def _unwrap(model: torch.nn.Module) -> GPT:
    # DDP wraps as .module, torch.compile as ._orig_mod: checkpoints hold the plain model's keys.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model  # type: ignore[return-value]


def model_state_for_saving(model: torch.nn.Module,
                           state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each storage once (safetensors refuses shared tensors).

    ``state`` replaces ``model.state_dict()``, e.g. the full state gathered from FSDP shards.
    """
    model = _unwrap(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in (state or model.state_dict()).items()}
    if model.out_head.weight is model.tok_emb.weight:
        state.pop("out_head.weight", None)
    # Causal-mask buffers are rebuilt from the spec; storing them would only waste space.
    return {k: v for k, v in state.items() if not k.endswith(".mask")}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    model = _unwrap(model)
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"The weights in {source} do not fit the model its spec describes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            f"The checkpoint was probably written by a different spec or plugin version."
        )
    for k, v in state.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(expected[k].shape)}; the checkpoint does not match its spec."
            )
    model.load_state_dict(state, strict=False)


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A built model's weights as a checkpoint holds them: the plain model's state dict (unwrapped
    from DDP / torch.compile), on the CPU, contiguous, without a tied output head or mask buffers."""
    return model_state_for_saving(model)
