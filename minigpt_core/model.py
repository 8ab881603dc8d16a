"""The assembled GPT: token + positional embeddings, N blocks, final norm, output head.

Components are looked up and built once in :func:`build_model`; the forward pass
is plain module calls, so an assembled model costs what a hand-written one does.
Attribute names follow the book's ``GPTModel`` (tok_emb, pos_emb, drop_emb,
trf_blocks, final_norm, out_head) so its state dicts load as they are.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import InsufficientMemoryError
from .registry import ComponentRegistry
from .spec import ExperimentSpec, ModelSpec, ResolvedComponent, resolve_components

__all__ = ["BuildContext", "KVCache", "LayerKVCache", "GPT", "build_model", "mark_residual_projection",
           "estimate_model_size", "check_model_fits", "available_memory", "training_memory_warning"]

RESIDUAL_PROJECTION_ATTR = "_minigpt_residual_projection"


def mark_residual_projection(linear: nn.Module) -> nn.Module:
    """Tag the layer that writes a branch back into the residual stream.

    Initialisation schemes such as GPT-2's scale these by 1/sqrt(2 * n_layers).
    """
    setattr(linear, RESIDUAL_PROJECTION_ATTR, True)
    return linear


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
        return self.components[slot].build(self)


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
        # Modules that add a training loss (e.g. a mixture-of-experts load-balancing term) set
        # `self.aux_loss` in forward; found once here so the training step does no module walk.
        self._aux_loss_modules = [m for m in self.modules() if m is not self and hasattr(m, "aux_loss")]

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        # idx: (B, T) token ids -> logits (B, T, vocab_size)
        _, t = idx.shape
        x = self.tok_emb(idx)  # (B, T, C)
        start = 0 if kv_cache is None else kv_cache.offset
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + t, device=idx.device))  # (T, C) broadcast
        x = self.drop_emb(x)
        if kv_cache is None:
            for block in self.trf_blocks:
                x = block(x)
        else:
            for block, layer_cache in zip(self.trf_blocks, kv_cache.layers):
                x = block(x, kv_cache=layer_cache)
            kv_cache.advance(t)
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, V)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the last forward pass produced, or None if no module adds one."""
        losses = [m.aux_loss for m in self._aux_loss_modules if m.aux_loss is not None]
        return torch.stack([l.float() for l in losses]).sum() if losses else None

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        if not self.supports_kv_cache:
            raise ValueError(f"attention '{self.spec.attention.name}' does not declare a KV cache")
        return KVCache(len(self.trf_blocks), max_len or self.spec.context_length)


def build_model(spec: ExperimentSpec | ModelSpec, registry: ComponentRegistry | None = None,
                *, seed: int | None = None) -> GPT:
    """Validate the spec's components, then build the GPT they describe.

    With an :class:`ExperimentSpec`, ``torch.manual_seed(spec.seed)`` runs first (pass
    ``seed=`` to override) so the same spec always gives the same initial weights.
    """
    model_spec = spec.model if isinstance(spec, ExperimentSpec) else spec
    if isinstance(spec, ExperimentSpec):
        components = resolve_components(spec, registry)
        seed = spec.seed if seed is None else seed
    else:
        components = resolve_components(ExperimentSpec(model=model_spec), registry)
    device = torch.get_default_device()
    if device.type != "meta":  # refuse a model that cannot fit before allocating it
        check_model_fits(model_spec, components, training=False, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT(model_spec, components)


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


def check_model_fits(model: ModelSpec, components: dict[str, ResolvedComponent] | None = None, *,
                     training: bool, device: torch.device | str = "cpu",
                     registry: ComponentRegistry | None = None) -> int | None:
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
    if components is None:
        components = resolve_components(ExperimentSpec(model=model), registry)
    size = estimate_model_size(model, components)
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
