"""Looking inside a model, as tensors: attention weights per layer and the loss of every token.

The attention weights come from the model's own attention modules (the ``return_weights=True``
path that components declaring the ``attn_weights`` capability implement), not from a
re-implementation outside them: :func:`capture_attention` asks each block's attention for its
weights during an ordinary forward pass. The commands ``minigpt attention`` and
``minigpt eval --per-token`` and ``train.log_attention_every`` draw what these functions return
(minigpt_core.viz); from Python::

    from minigpt_core.inspection import attention_weights, token_losses
    weights = attention_weights(model, idx)   # one (B, H, T, T) tensor per layer
    losses = token_losses(model, idx[:, :-1], idx[:, 1:])   # (B, T - 1) nats
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .base.device import autocast
from .base.errors import MinigptError
from .model.gpt import ATTENTION_MODULE_ATTR
from .spec import attention_weights_message
from .tasks.evaluate import lm_loss
from .viz.attention import write_attention_pngs

__all__ = ["AttentionWeightsUnavailable", "attention_modules", "capture_attention", "attention_weights",
           "attention_weights_message", "token_losses", "window_token_losses", "log_attention_maps"]


class AttentionWeightsUnavailable(MinigptError):
    """The model's attention does not declare ``attn_weights``: it cannot return its weights."""


def _plain(model: nn.Module) -> nn.Module:
    # DDP wraps as .module, torch.compile as ._orig_mod: the hooks go on the plain model's modules.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model



def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each block, in layer order (the modules built for the attention slot)."""
    model = _plain(model)
    if not getattr(model, "supports_attn_weights", False):
        raise AttentionWeightsUnavailable(attention_weights_message(model.spec.attention.name))
    found = []
    for i, block in enumerate(model.trf_blocks):
        # The outermost tagged module: a wrapper's inner heads are built by the wrapper, not tagged.
        mods = [m for m in block.modules() if getattr(m, ATTENTION_MODULE_ATTR, False)]
        if not mods:
            raise AttentionWeightsUnavailable(
                f"block {i} ({type(block).__name__}) holds no module built for the attention slot; a block must "
                f"build its attention with ctx.build('attention') for its weights to be found.")
        found.append(mods[0])
    return found


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, each forward pass fills the yielded list with one (B, H, T, T) tensor per layer.

    Hooks ask every attention module for its weights (``return_weights=True``) and hand the block
    only the output it expects, so the model computes exactly what it always does; they are removed
    on exit, so the ordinary forward pays nothing. Attentions take their weight-returning path
    (explicit softmax instead of a fused kernel) while the hooks are on. Weights keep their graph
    (detach them, or run under torch.no_grad()); a second forward pass replaces them.
    """
    mods = attention_modules(model)
    captured: list[torch.Tensor | None] = [None] * len(mods)
    handles = []

    def ask(module, args, kwargs):
        if kwargs.get("kv_cache") is not None:
            raise MinigptError("capture_attention reads full forward passes, not KV-cache decoding steps.")
        return args, {**kwargs, "return_weights": True}

    def keep(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            if not (isinstance(output, tuple) and len(output) == 2):
                raise MinigptError(f"the attention of layer {i} ({type(module).__name__}) declares attn_weights "
                                   f"but forward(x, return_weights=True) did not return (output, weights).")
            captured[i] = output[1]
            return output[0]
        return hook

    try:
        for i, m in enumerate(mods):
            handles.append(m.register_forward_pre_hook(ask, with_kwargs=True))
            handles.append(m.register_forward_hook(keep(i), with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_weights(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """One forward pass in eval mode (no dropout): one (B, H, T, T) weight tensor per layer.

    ``weights[l][b, h, i, j]`` is how much position i attends to position j in head h of layer l;
    rows sum to 1 and, for a causal attention, are zero above the diagonal. Raises
    :class:`AttentionWeightsUnavailable` (naming the attentions that can) for an attention that
    does not declare ``attn_weights``.
    """
    plain = _plain(model)
    was_training = plain.training
    plain.eval()
    try:
        with capture_attention(plain) as captured:
            plain(idx)
    finally:
        plain.train(was_training)
    return [w.detach() for w in captured]  # type: ignore[union-attr]


@torch.no_grad()
def token_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss (nats) of every position: (B, T) from inputs and targets (B, T), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
    finally:
        model.train(was_training)
    return lm_loss(logits, targets, reduction="none").view(targets.shape)


@torch.no_grad()
def window_token_losses(model: nn.Module, corpus, starts: np.ndarray, length: int, *, micro_batch: int,
                        device: torch.device, precision: str = "fp32",
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Per-token loss of the windows ``evaluate`` averages: (len(starts), length - 1) float32.

    Row w, column p is the loss of predicting token ``starts[w] + p + 1`` of the corpus from the
    tokens of the window before it; the mean of the array is what ``evaluate`` returns.
    """
    out = np.empty((len(starts), length - 1), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(starts), micro_batch):
            batch = torch.from_numpy(corpus.windows(starts[i:i + micro_batch], length)).to(device)
            with autocast(device, precision):
                logits = model(batch[:, :-1])
            loss = lm_loss(logits, batch[:, 1:], reduction="none").view(len(batch), length - 1)
            out[i:i + len(batch)] = loss.float().cpu().numpy()
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return out


def log_attention_maps(model: nn.Module, tokenizer, prompt: str, out_dir, *, write: bool = True, title: str = "",
                       note: Callable[[str], None] = print, max_tokens: int = 64) -> list:
    """``train.log_attention_every``: ``out_dir/layer-<i>.png`` for the prompt (its last ``max_tokens``).

    Every process of a sharded (FSDP) model must call it (the forward pass needs them all); only
    those with ``write`` draw. Returns the PNGs written.
    """
    from pathlib import Path

    try:
        ids = tokenizer.encode(prompt)
    except MinigptError as exc:
        note(f"note: no attention maps: the prompt cannot be encoded ({exc})")
        return []
    ids = ids[-min(max_tokens, _plain(model).spec.context_length):]
    if not ids:
        return []
    device = next(model.parameters()).device
    weights = attention_weights(model, torch.tensor([ids], device=device))
    if not write:
        return []
    labels = [tokenizer.decode([i]) for i in ids]
    return write_attention_pngs([w[0].float().cpu().numpy() for w in weights], labels, Path(out_dir), title=title)
