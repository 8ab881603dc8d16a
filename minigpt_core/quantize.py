"""int8 quantization of a model's linear layers for CPU inference (``minigpt quantize``).

Every method stores the same thing: each ``nn.Linear`` weight (the output head included) as
symmetric per-output-channel int8 values plus one fp32 scale per output channel,
``w ~= int8 * scale[:, None]``. They differ in the kernel that runs the layer:

* ``int8-dynamic``: PyTorch's dynamically quantized Linear (fbgemm / x86): the activations are
  quantized per batch on the fly and the matmul runs in int8. The fastest on CPU (see
  docs/quantize.md for the measurements that chose it).
* ``int8-weight``: torchao's int8 weight-only ``Int8Tensor``: activations stay in float, the
  weight is widened to float for the matmul. The most accurate; in eager mode it is slower than
  fp32 (torchao's kernels for it need ``torch.compile``).

A quantized checkpoint is an ordinary checkpoint directory whose ``model.safetensors`` holds
``NAME.weight_int8`` and ``NAME.weight_scale`` in place of each quantized ``NAME.weight`` and
whose ``meta.json`` has a ``quantization`` record. Loading builds the float model from the spec,
then swaps each quantized layer for the method's module made from those plain tensors: nothing
is unpickled, and the int8 values are exactly those that were saved.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .base.errors import MinigptError, CheckpointError
from .checkpoints.checkpoint import load_model_state, model_state_for_saving
from .tasks import build_task_model

__all__ = ["METHODS", "QuantizationError", "quantize_model", "quantized_state",
           "load_quantized", "quantization_record", "check_quantized_use", "linear_weight_bytes"]

INT8_SUFFIX = ".weight_int8"
SCALE_SUFFIX = ".weight_scale"
SCHEME = "symmetric per-output-channel int8 weights, fp32 scales"


class QuantizationError(MinigptError):
    """A quantization request cannot be met (unknown method, missing library, wrong device or use)."""


@dataclass(frozen=True)
class Method:
    name: str
    library: str  # the package that provides its kernel, for the error when it is missing
    description: str
    make_linear: Callable[[nn.Linear, torch.Tensor, torch.Tensor], nn.Module]


def _require_torchao() -> None:
    import logging

    # Its import logs a warning per GPU-only extension a CPU build cannot load, and torch one about an enum.
    logs = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise QuantizationError(
            "This quantization method uses torchao, which is not installed. Install it with "
            "`pip install 'minigpt[quant]'` (or `pip install torchao`), or use --method int8-dynamic, "
            "which needs only PyTorch."
        ) from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _dynamic_linear(linear: nn.Linear, qdata: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with _quiet_deprecation():  # the constructor makes a placeholder quantized weight: it warns first
        mod = DynamicLinear(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                            dtype=torch.qint8)
        qweight = torch._make_per_channel_quantized_tensor(
            qdata, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        mod.set_weight_bias(qweight, bias)
    return mod


@contextlib.contextmanager
def _quiet_deprecation():
    # PyTorch marks its quantized tensors deprecated (docs/quantize.md says why we use them anyway);
    # the warning (with a path inside PyTorch's build, Quantizer.cpp) would be printed on every
    # sample/eval of an int8 model. It is a C++ warn-once: silenced here, it does not come back later.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*quantiz", category=UserWarning)
        yield


def _weight_only_linear(linear: nn.Linear, qdata: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    _require_torchao()
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    weight = Int8Tensor(qdata, scale[:, None], [1, qdata.shape[1]], torch.float32)
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return out


METHODS: dict[str, Method] = {
    "int8-dynamic": Method("int8-dynamic", "torch", "int8 weights and per-batch int8 activations, "
                           "int8 matmul (PyTorch's dynamic quantization, fbgemm/x86 kernels)", _dynamic_linear),
    "int8-weight": Method("int8-weight", "torchao", "int8 weights, float activations (torchao Int8Tensor, "
                          "weight-only)", _weight_only_linear),
}
DEFAULT_METHOD = "int8-dynamic"


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise QuantizationError(
            f"Unknown quantization method {name!r}. The methods are: "
            + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
            + f". {DEFAULT_METHOD} is the fastest on CPU; see docs/quantize.md."
        )
    method = METHODS[name]
    if method.library == "torchao":
        _require_torchao()
    return method


def check_device(device: torch.device | str, what: str = "An int8-quantized model") -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:  # not a device name: select_device says so
        return
    if kind != "cpu":
        raise QuantizationError(
            f"{what} runs on the CPU only: its int8 kernels (fbgemm, torchao's CPU path) are the ones measured "
            f"and tested, and PyTorch's dynamic quantization has no GPU kernels. Pass --device cpu, or use the "
            f"unquantized checkpoint on a GPU (bf16 there is faster than int8 on a CPU)."
        )


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if type(mod) is nn.Linear]


def _int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8, with PyTorch's own observer (what quantize_dynamic uses)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    w = weight.detach().float()
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    with _quiet_deprecation():
        q = torch.quantize_per_channel(w, scale.to(torch.double), zero_point, 0, torch.qint8)
    return q.int_repr().contiguous(), q.q_per_channel_scales().float().contiguous()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors a quantized checkpoint stores for a float ``model``, and the quantized layer names.

    A tied output head gets its own int8 copy; the embedding it shares stays in float.
    """
    names = _linear_names(model)
    state = model_state_for_saving(model)
    for name in names:
        linear = model.get_submodule(name)
        state.pop(f"{name}.weight", None)
        qdata, scale = _int8_per_channel(linear.weight)
        state[name + INT8_SUFFIX], state[name + SCALE_SUFFIX] = qdata, scale
    return state, names


def _apply(model: nn.Module, method: Method, state: dict[str, torch.Tensor], names: list[str]) -> nn.Module:
    for name in names:
        linear = model.get_submodule(name)
        _set_module(model, name, method.make_linear(linear, state[name + INT8_SUFFIX], state[name + SCALE_SUFFIX]))
    return model.eval().requires_grad_(False)


def quantize_model(model: nn.Module, method: str = DEFAULT_METHOD) -> nn.Module:
    """Quantize a float model's linear layers in place (CPU); the result is for inference only."""
    m = get_method(method)
    check_device(next(model.parameters()).device)
    state, names = quantized_state(model)
    if hasattr(model, "out_head") and getattr(model, "tok_emb", None) is not None:
        if model.out_head.weight is model.tok_emb.weight:  # untie: the head becomes int8, the embedding stays
            model.out_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    return _apply(model, m, state, names)


def quantization_record(method: str, names: list[str], source: str | None = None) -> dict[str, Any]:
    import importlib.metadata as md

    lib = METHODS[method].library
    return {"method": method, "scheme": SCHEME, "layers": names, "library": f"{lib} {md.version(lib)}",
            **({"source": source} if source else {})}


def linear_weight_bytes(state: dict[str, torch.Tensor], names: list[str]) -> int:
    """Bytes of the quantized layers' weights in a stored state (int8 values and scales)."""
    return sum(state[n + s].numel() * state[n + s].element_size() for n in names for s in (INT8_SUFFIX, SCALE_SUFFIX))



def check_quantized_use(directory: str | Path, meta: dict[str, Any], purpose: str) -> None:
    """Refuse a quantized checkpoint where float weights are needed (training, init_from, export)."""
    record = meta.get("quantization")
    if record:
        src = record.get("source") if isinstance(record, dict) else None
        raise QuantizationError(
            f"{directory} is an int8-quantized checkpoint (minigpt quantize, method "
            f"{record.get('method') if isinstance(record, dict) else '?'}): it is for CPU inference only "
            f"(`minigpt sample` and `minigpt eval`), so it cannot be used for {purpose}. Use the float "
            f"checkpoint it was made from" + (f" ({src})." if src else ".")
        )


def load_quantized(directory: Path, spec, state: dict[str, torch.Tensor], meta: dict[str, Any],
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized checkpoint's model: the float model from the spec, then its int8 layers."""
    record = meta["quantization"]
    method_name = record.get("method") if isinstance(record, dict) else None
    names = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(method_name, str) or not isinstance(names, list):
        raise CheckpointError(f"{directory}/meta.json has a damaged quantization record: {record!r}.")
    method = get_method(method_name)
    check_device(map_location, f"The int8-quantized checkpoint {directory}")
    model = build_task_model(spec)
    if getattr(model, "out_head", None) is not None and model.out_head.weight is model.tok_emb.weight:
        model.out_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    missing = [n for n in names if n + INT8_SUFFIX not in state or n + SCALE_SUFFIX not in state]
    def is_linear(n) -> bool:
        try:
            return type(model.get_submodule(n)) is nn.Linear
        except (AttributeError, TypeError):
            return False

    unknown = [n for n in names if not is_linear(n)]
    if missing or unknown:
        raise CheckpointError(f"{directory} does not fit its spec: quantized layers "
                              f"{(missing + unknown)[:5]} are missing from the weights or not linear layers.")
    floats = {k: v for k, v in state.items() if not k.endswith((INT8_SUFFIX, SCALE_SUFFIX))}
    for n in names:  # placeholders so the float load sees every tensor it expects
        floats[n + ".weight"] = model.get_submodule(n).weight.detach()
    load_model_state(model, floats, str(directory))
    return _apply(model, method, state, names)
