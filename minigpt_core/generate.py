"""Autoregressive sampling with the book's semantics, using the KV cache when the model has one."""

from __future__ import annotations

import torch

from .model import GPT

__all__ = ["generate", "filter_logits"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: (B, V)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = torch.where(logits < kth, torch.full_like(logits, -torch.inf), logits)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool | None = None, generator: torch.Generator | None = None,
             n_vocab: int | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to ``idx`` (B, T) and return (B, T + n).

    temperature 0 is greedy (argmax); otherwise logits are divided by the temperature, filtered
    by top-k / top-p, and sampled. Stops early when every row has produced ``eos_id``.
    Uses the KV cache when the model's attention declares one (``use_cache=None``). ``n_vocab``
    restricts sampling to ids below it, for a tokenizer smaller than the model's vocabulary.
    """
    was_training = model.training
    model.eval()
    ctx_len = model.spec.context_length
    cache_ok = model.supports_kv_cache if use_cache is None else use_cache
    # The cache cannot slide: fall back to recomputing once the sequence outgrows the context.
    cache = model.new_kv_cache() if cache_ok and idx.shape[1] + max_new_tokens <= ctx_len else None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    step_input = idx[:, -ctx_len:]
    try:
        for _ in range(max_new_tokens):
            logits = model(step_input, kv_cache=cache) if cache is not None else model(step_input)
            logits = logits[:, -1, :n_vocab].float()  # (B, V)
            if temperature > 0:
                logits = filter_logits(logits / temperature, top_k, top_p)
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)
            if eos_id is not None:
                next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_id), next_id)
                finished |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            step_input = next_id if cache is not None else idx[:, -ctx_len:]
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx
