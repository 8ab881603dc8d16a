"""The assembled GPT: token + positional embeddings, N blocks, final norm, output head.

Components are looked up and built once in :func:`build_model`; the forward pass
is plain module calls, so an assembled model costs what a hand-written one does.
Attribute names follow the book's ``GPTModel`` (tok_emb, pos_emb, drop_emb,
trf_blocks, final_norm, out_head) so its state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base.contracts import AuxLossProtocol
from ..spec import ExperimentSpec, ModelSpec, ResolvedComponent

__all__ = ["BuildContext", "KVCache", "LayerKVCache", "GPT", "mark_residual_projection",
           "is_residual_projection", "chunked_head_loss", "HeadWorkspace", "plain_linear"]

RESIDUAL_PROJECTION_ATTR = "_minigpt_residual_projection"
ATTENTION_MODULE_ATTR = "_minigpt_attention"  # set on each module built for the attention slot


def mark_residual_projection(linear: nn.Module) -> nn.Module:
    """Tag the layer that writes a branch back into the residual stream.

    Initialisation schemes such as GPT-2's scale these by 1/sqrt(2 * n_layers).
    """
    setattr(linear, RESIDUAL_PROJECTION_ATTR, True)
    return linear


def is_residual_projection(module: nn.Module) -> bool:
    """Whether :func:`mark_residual_projection` tagged ``module`` (what an init scheme asks)."""
    return bool(getattr(module, RESIDUAL_PROJECTION_ATTR, False))


class BuildContext:
    """What a component factory sees: the model section, its layer, and the other slots."""

    def __init__(self, model: ModelSpec, components: dict[str, ResolvedComponent], layer_idx: int | None = None):
        self.model = model
        self.components = components
        self.layer_idx = layer_idx

    # Shorthands for the fields nearly every factory needs.
    vocab_size = property(lambda self: self.model.vocab_size)
    context_length = property(lambda self: self.model.context_length)
    emb_dim = property(lambda self: self.model.emb_dim)
    n_heads = property(lambda self: self.model.n_heads)
    n_layers = property(lambda self: self.model.n_layers)
    head_dim = property(lambda self: self.model.head_dim)
    drop_rate = property(lambda self: self.model.drop_rate)
    qkv_bias = property(lambda self: self.model.qkv_bias)

    def at_layer(self, layer_idx: int) -> "BuildContext":
        return BuildContext(self.model, self.components, layer_idx)

    def build(self, slot: str):
        """Build the component chosen for ``slot`` (e.g. a feed-forward builds its activation)."""
        part = self.components[slot].build(self)
        if slot == "attention" and isinstance(part, nn.Module):
            setattr(part, ATTENTION_MODULE_ATTR, True)  # how minigpt_core.inspection finds it in a block
        return part


class LayerKVCache:
    """Keys and values of one attention layer, preallocated for ``max_len`` positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None  # (B, H_kv, max_len, D)
        self.v: torch.Tensor | None = None
        self.length = 0  # positions filled so far
        self._children: dict[int, LayerKVCache] = {}

    def child(self, i: int) -> "LayerKVCache":
        """A separate cache for sub-module ``i`` (e.g. one per head of a head-wrapper)."""
        if i not in self._children:
            self._children[i] = LayerKVCache(self.max_len)
        return self._children[i]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, H, T_new, D) keys/values; return all of them so far (B, H, T_all, D)."""
        b, h, t, d = k.shape
        if self.k is None or self.k.shape[0] != b or self.k.dtype != k.dtype:
            self.k = k.new_empty(b, h, self.max_len, d)
            self.v = v.new_empty(b, h, self.max_len, v.shape[-1])
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append {t} more after {self.length}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per block. ``offset`` is the position of the next token."""

    def __init__(self, n_layers: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layers)]
        self.offset = 0

    def advance(self, n: int) -> None:
        self.offset += n


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear nothing hooks into (an adapter would wrap, replace or hook it): code may use its
    weight directly instead of calling it."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


class HeadWorkspace:
    """Scratch memory for the chunked head's logits: one flat buffer per dtype and device, grown on
    demand, reused by every chunk and kept from step to step.

    A chunk of full-vocabulary logits is large (256 tokens x 50,257 fp32 = 51 MB), above glibc's
    largest mmap threshold (32 MB): allocated afresh, every chunk of every step was a new mapping whose
    pages the kernel zeroes on first touch and takes back at free, about a tenth of a training step in
    a fresh process ("Chunked head in a fresh process", benchmarks/RESULTS.md). Not thread-safe: one
    forward of a model at a time, as training does.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous (rows, cols) view of the buffer for ``dtype`` on ``device`` (contents undefined)."""
        key = (dtype, device)
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < rows * cols:
            flat = self._buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
        return flat[:rows * cols].view(rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk`` rows at a time.

    Each chunk's logits live only while that chunk is processed, in ``workspace``: the forward pass
    computes the loss and, when gradients are wanted, the gradients of ``hidden`` and ``weight`` too
    (softmax - one-hot), so nothing of the (N, V) logits is kept for backward and the head's matmuls
    are not recomputed. Backward only scales the stored gradients by the incoming one.

    The logits are computed transposed, (V, chunk) = weight @ h.T: on CPU BLAS that layout ran the
    forward GEMM ~1.5x faster than h @ weight.T, and the weight gradient then accumulates with one
    addmm_ (benchmarks/kernels.py, "Kernels" in RESULTS.md). The softmax is taken in place in the
    fp32 buffer (max, exp, sum, divide): no (V, chunk) temporary is allocated per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, want_h, want_w, workspace):
        n, vocab = hidden.shape[0], weight.shape[0]
        # The matmul dtype is what autocast (if on) gives the plain head; the loop then runs with autocast
        # off and explicit casts, so the matmuls can write into the workspace.
        mm_dtype = torch.mm(weight[:1], hidden[:1].t()).dtype
        w, hid = weight.to(mm_dtype), hidden.to(mm_dtype)
        # Under torch.compile the compiler plans the memory: plain out-of-place tensors, no workspace.
        compiling = _is_compiling()
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n, chunk):
                h, t = hid[i:i + chunk], targets[i:i + chunk]
                c = len(t)
                cols = torch.arange(c, device=h.device)
                if compiling:
                    low = torch.mm(w, h.t())
                    scores = low if mm_dtype == torch.float32 else low.float()
                else:
                    scores = workspace.take(vocab, c, torch.float32, h.device)  # (V, c) fp32 logits, then softmax
                    low = scores if mm_dtype == torch.float32 else workspace.take(vocab, c, mm_dtype, h.device)
                    torch.mm(w, h.t(), out=low)  # (V, c) in the matmul's own dtype
                    if low is not scores:
                        scores.copy_(low)
                picked = scores[t, cols]  # (c,) the targets' logits
                peak = scores.amax(dim=0)  # (c,)
                denom = scores.sub_(peak).exp_().sum(dim=0)
                total += (denom.log() + peak - picked).sum()  # logsumexp - target logit
                if not (want_h or want_w):
                    continue
                scores.div_(denom)
                scores[t, cols] -= 1  # d(sum CE)/d logits = softmax - one-hot
                g = scores if low is scores else low.copy_(scores)
                if want_h:
                    if grad_h.dtype == mm_dtype and not compiling:
                        torch.mm(g.t(), w, out=grad_h[i:i + c])
                    else:
                        grad_h[i:i + c] = g.t() @ w
                if want_w:
                    if mm_dtype != torch.float32:
                        grad_w = (g @ h).float() if grad_w is None else grad_w.add_(g @ h)
                    elif grad_w is None:
                        grad_w = torch.mm(g, h)
                    else:
                        grad_w.addmm_(g, h)
        # Kept on ctx (not inputs or outputs); backward scales them in place: no second copy.
        ctx.grad_h = grad_h.div_(n) if want_h else None
        ctx.grad_w = grad_w.div_(n) if want_w else None
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        gh, gw = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        if gh is not None:
            gh = gh.mul_(grad_out.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      chunk: int, workspace: HeadWorkspace | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of the head ``weight`` (V, C) over ``hidden`` (..., C).

    Equals ``F.cross_entropy((hidden @ weight.T).float(), targets)`` without holding more than
    ``chunk`` rows of logits at once; ``chunk <= 0`` is the plain computation. ``workspace`` keeps the
    chunk's buffer between calls (a model passes its own); without one, a buffer lives for this call.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk <= 0:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets)
    grad = torch.is_grad_enabled()
    return _ChunkedHeadLoss.apply(hidden, weight, targets, chunk,
                                  grad and hidden.requires_grad, grad and weight.requires_grad,
                                  workspace if workspace is not None else HeadWorkspace())


class GPT(nn.Module):
    def __init__(self, model: ModelSpec, components: dict[str, ResolvedComponent]):
        super().__init__()
        self.spec = model
        ctx = BuildContext(model, components)
        # Creation order matches the book's GPTModel so the same seed gives the same weights.
        self.tok_emb = nn.Embedding(model.vocab_size, model.emb_dim)
        self.pos_emb = ctx.build("positional")  # None for rotary / ALiBi style attention
        self.drop_emb = nn.Dropout(model.drop_rate)
        self.trf_blocks = nn.ModuleList(ctx.at_layer(i).build("block") for i in range(model.n_layers))
        self.final_norm = ctx.build("norm")
        self.out_head = nn.Linear(model.emb_dim, model.vocab_size, bias=False)
        if model.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        components["init"].build(ctx)(self)
        self.supports_kv_cache = components["attention"].entry.has("kv_cache")
        self.supports_attn_weights = components["attention"].entry.has("attn_weights")  # minigpt_core.inspection
        # Modules that add a training loss (e.g. a mixture-of-experts load-balancing term) set
        # `self.aux_loss` in forward; found once here so the training step does no module walk.
        self._aux_loss_modules = [m for m in self.modules() if m is not self and isinstance(m, AuxLossProtocol)]
        # Recompute each block's activations in backward instead of keeping them (train.activation_checkpointing).
        self.activation_checkpointing = False
        self.head_workspace = HeadWorkspace()  # the chunked loss's logits buffer, kept between steps

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None, *, last_only: bool = False,
                targets: torch.Tensor | None = None, loss_chunk: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab_size) of token ids ``idx`` (B, T); ``last_only``: (B, 1, vocab_size),
        the next token's; with ``targets`` (B, T), the mean next-token loss instead (fp32), its head
        and cross-entropy taken ``loss_chunk`` tokens at a time (0: all at once) so the full-vocabulary
        logits never exist together. The loss is computed inside forward so a DDP / FSDP wrapper's
        hooks see the head's weight used."""
        x = self.hidden(idx, kv_cache, last_only=last_only)
        if targets is None:
            return self.out_head(x)  # (B, T, V)
        head = self.out_head
        if not plain_linear(head) or head.bias is not None:
            loss_chunk = 0  # an adapted head (e.g. LoRA's hook) must run as a module: the plain path
        if loss_chunk <= 0:
            return F.cross_entropy(head(x).flatten(0, 1).float(), targets.flatten())
        return chunked_head_loss(x, head.weight, targets, loss_chunk, self.head_workspace)

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """The final norm's output (B, T, C): what the output head reads (last_only: (B, 1, C))."""
        _, t = idx.shape
        x = self.tok_emb(idx)  # (B, T, C)
        start = 0 if kv_cache is None else kv_cache.offset
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + t, device=idx.device))  # (T, C) broadcast
        x = self.drop_emb(x)
        if kv_cache is None:
            checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            for block in self.trf_blocks:
                # Non-reentrant: works under DDP / FSDP2 hooks and restores the RNG, so dropout repeats.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        else:
            for block, layer_cache in zip(self.trf_blocks, kv_cache.layers):
                x = block(x, kv_cache=layer_cache)
            kv_cache.advance(t)
        if last_only:  # generation: the output head (the largest matmul) on one position, not T
            x = x[:, -1:]
        return self.final_norm(x)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the last forward pass produced, or None if no module adds one."""
        losses = [m.aux_loss for m in self._aux_loss_modules if m.aux_loss is not None]
        return torch.stack([l.float() for l in losses]).sum() if losses else None

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        if not self.supports_kv_cache:
            raise ValueError(f"attention '{self.spec.attention.name}' does not declare a KV cache")
        return KVCache(len(self.trf_blocks), max_len or self.spec.context_length)


