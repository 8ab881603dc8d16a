"""Autoregressive sampling with the book's semantics, using the KV cache when the model has one."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable, Iterator

import torch

from ..base.errors import MinigptError
from .gpt import GPT, plain_linear

__all__ = ["generate", "filter_logits", "check_sampling", "SamplingError", "threaded_gemv"]


class SamplingError(MinigptError):
    """A sampling setting (temperature, top-k, top-p, token count) is out of range."""


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   max_new_tokens: int = 0) -> None:
    """Refuse settings that would sample nonsense silently (NaN, negative, an empty nucleus)."""
    problems = []
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"temperature must be a finite number >= 0 (0: greedy), not {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be >= 1 (leave it unset to keep every token), not {top_k}")
    if top_p is not None and not (0 < top_p <= 1):  # also False for NaN
        problems.append(f"top_p must be in (0, 1] (1 keeps every token), not {top_p}")
    if max_new_tokens < 0:
        problems.append(f"the number of new tokens must be >= 0, not {max_new_tokens}")
    if problems:
        raise SamplingError("Invalid sampling settings: " + "; ".join(problems) + ".")


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


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool | None = None, generator: torch.Generator | None = None,
             n_vocab: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, compile: bool = False,
             stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to ``idx`` (B, T) and return (B, T + n).

    temperature 0 is greedy (argmax); otherwise logits are divided by the temperature, filtered
    by top-k / top-p, and sampled. Stops early when every row has produced ``eos_id``.
    Uses the KV cache when the model's attention declares one (``use_cache=None``). ``n_vocab``
    restricts sampling to ids below it, for a tokenizer smaller than the model's vocabulary.
    ``on_token`` is called with each step's new ids (B, 1), e.g. to print them as they come;
    ``stop``, after it, ends the generation when it returns True (e.g. every row has produced a
    stop string: lm_eval's ``until``).
    ``compile=True`` runs the one-token decoding step through ``torch.compile`` (one graph per
    process and model structure, whatever the lengths; the first call pays the compilation).

    Past the context length each token sees only the last ``context_length`` tokens (a sliding
    window); a warning says so once per call.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if max_new_tokens == 0:
        return idx
    was_training = model.training
    model.eval()
    try:
        # inference_mode skips autograd's bookkeeping on every op; FSDP2 swaps parameter storage
        # between calls, which tensors created in inference mode would not allow.
        fsdp = _is_fsdp(model)
        gemv = contextlib.nullcontext() if fsdp else threaded_gemv(model)
        with torch.inference_mode(not fsdp), gemv:
            out = _generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache,
                            generator, n_vocab, on_token, compile, stop)
    finally:
        model.train(was_training)
    return out.clone()  # an ordinary tensor: callers may modify it outside inference mode


# A decoding step multiplies a few rows by each weight matrix (a matrix-vector product): it is bound
# by how fast the weights stream from memory. PyTorch's CPU BLAS runs that product on one thread,
# reading 8-10 GB/s on a 2-core EPYC; a batched matmul over slices of the weight, one slice per
# thread, read 11-17 GB/s there (benchmarks/kernels.py, "Kernels" in benchmarks/RESULTS.md).
GEMV_MAX_ROWS = 8  # a batch of up to 8 sequences decoding; measured faster at 1-16 rows


def _threaded_linear(module: torch.nn.Linear, parts: int, x: torch.Tensor) -> torch.Tensor:
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if rows > GEMV_MAX_ROWS:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    w = module.weight  # (N, K), contiguous: its first parts * h rows view as (parts, h, K) without a copy
    n = w.shape[0]
    h = n // parts
    y = torch.bmm(x.reshape(1, rows, k).expand(parts, rows, k), w[:h * parts].view(parts, h, k).transpose(1, 2))
    y = y.transpose(0, 1).reshape(rows, h * parts)  # (parts, rows, h) -> (rows, N')
    if h * parts != n:  # an uneven output size (GPT-2's 50,257-token head): the few last rows apart
        y = torch.cat([y, torch.nn.functional.linear(x.reshape(rows, k), w[h * parts:])], dim=1)
    if module.bias is not None:
        y = y + module.bias
    return y.view(*x.shape[:-1], n)


_THREADED_FORWARD = "_minigpt_threaded_forward"  # where a layer keeps its threaded forward between calls


@contextlib.contextmanager
def threaded_gemv(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's plain fp32 CPU ``nn.Linear`` layers multiply up to
    ``GEMV_MAX_ROWS`` rows on all of torch's threads: the same products, which may round differently
    in the last bit. Layers an adapter wraps or hooks, other dtypes (bf16 was not faster on this
    CPU) and devices run as they are."""
    parts = torch.get_num_threads()
    layers = [] if parts < 2 else [
        m for m in model.modules()
        if plain_linear(m) and "forward" not in m.__dict__ and type(m.weight) is torch.nn.Parameter
        and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 and m.weight.is_contiguous()
        and m.out_features >= 16 * parts]
    for m in layers:
        # An instance attribute shadows the method. The same object every call: a compiled decode
        # step guards on it, and a new one would recompile the step at each generate().
        forward = m.__dict__.get(_THREADED_FORWARD)
        if forward is None or forward.args[1] != parts:
            forward = m.__dict__[_THREADED_FORWARD] = functools.partial(_threaded_linear, m, parts)
        m.forward = forward
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def _generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, n_vocab,
              on_token, compile, stop=None) -> torch.Tensor:
    ctx_len = model.spec.context_length
    b, t0 = idx.shape
    total = t0 + max_new_tokens
    out = torch.empty(b, total, dtype=torch.long, device=idx.device)  # filled in place: no per-step concat
    out[:, :t0] = idx
    n = t0  # tokens in `out` so far
    cache_ok = model.supports_kv_cache if use_cache is None else use_cache
    # Sized for this call, not the whole context: less memory and a cheaper allocation.
    cache = model.new_kv_cache(min(ctx_len, total)) if cache_ok else None
    head = {"last_only": True} if isinstance(model, GPT) else {}  # only the next token's logits
    step = _compiled_step(model) if compile and cache is not None and head else None
    finished = torch.zeros(b, dtype=torch.bool, device=idx.device) if eos_id is not None else None
    step_input = idx[:, -ctx_len:]
    warned = False
    for _ in range(max_new_tokens):
        if n > ctx_len and not warned:
            warned = True
            warnings.warn(
                f"the text passed the model's context length ({ctx_len} tokens): from here on each new "
                f"token sees only the last {ctx_len} tokens (a sliding window)"
                + (", recomputed without the KV cache (slower)" if cache_ok else ""), stacklevel=3)
        if cache is not None and cache.offset + step_input.shape[1] > ctx_len:
            # Learned positions make cached keys depend on where they sat: the cache cannot slide.
            cache, step_input = None, out[:, n - ctx_len:n]
        if cache is None:
            logits = model(step_input, **head)
        elif step is not None and step_input.shape[1] == 1:
            logits = step(step_input, cache)
        else:
            logits = model(step_input, kv_cache=cache, **head)
        logits = logits[:, -1, :n_vocab]  # (B, V)
        if temperature > 0:
            logits = filter_logits(logits.float() / temperature, top_k, top_p)
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        else:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1); exact in any dtype
        if finished is not None:
            next_id = next_id.masked_fill(finished[:, None], eos_id)
            finished |= next_id[:, 0] == eos_id
        out[:, n] = next_id[:, 0]
        n += 1
        if on_token is not None:
            on_token(next_id)
        step_input = next_id if cache is not None else out[:, max(0, n - ctx_len):n]
        if finished is not None and bool(finished.all()):
            break
        if stop is not None and stop():
            break
    return out[:, :n]


def _decode_step(model, ids, cache):
    return model(ids, kv_cache=cache, last_only=True)


_compiled_decode = None


def _compiled_step(model: GPT):
    """The one-token decoding step through torch.compile, compiled once per process (models of
    the same structure share the graph: their parameters are its inputs)."""
    global _compiled_decode
    if _compiled_decode is None:
        # dynamic: the cache grows every step, so its length must not be baked into the graph.
        _compiled_decode = torch.compile(_decode_step, dynamic=True)
    return lambda ids, cache: _compiled_decode(model, ids, cache)
