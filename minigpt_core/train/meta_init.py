"""FSDP2 for a model that does not fit one device: build on the meta device, shard, materialise.

``train.meta_init = true`` (with ``train.strategy = "fsdp"`` under torchrun): parameters are
created on the meta device, ``fully_shard`` splits them, and only then does each rank allocate
its own shard. Each rank's shard holds exactly the values an ordinary build with the same seed
would have given that slice, because the build is *recorded* and then *replayed* one parameter
at a time:

* Recording: the model is built as usual on the CPU, except that every parameter is moved to
  the meta device the moment it is registered (buffers, derived from the spec, stay real and
  small). A dispatch mode sees every in-place op that then touches a parameter (the init
  components' ``normal_``, ``uniform_``, ``zero_``, ``fill_``, scaling...) and records it with
  the CPU generator's state just before it; a random op is also run on a scratch CPU tensor of
  the parameter's size, so the generator advances exactly as in the ordinary build.
* Replay: per parameter, a full CPU tensor starts from its value at registration (kept only
  when something wrote it, e.g. ``torch.ones`` of a norm scale; ``torch.empty`` keeps nothing),
  its ops are applied again with the recorded generator states, this rank's slice is copied
  into its shard and the full tensor is freed. Peak host memory: one full parameter (plus the
  scratch of the op being recorded), never the model.

Tied parameters are one parameter (one storage) throughout, so they stay tied.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..base.errors import MinigptError, CheckpointError
from ..model.gpt import GPT

__all__ = ["build_meta_model", "record_meta_build", "materialise", "load_local_shards", "local_shards", "shard_layout",
           "local_optimizer_state", "shard_optimizer_state"]

_RANDOM = {"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "log_normal_", "cauchy_",
           "geometric_"}
_EMPTY = {"empty", "empty_strided", "empty_like"}
# nn.init functions that return at once on a meta tensor (no op to record) or depend on data.
_UNREPLAYABLE = ("trunc_normal_", "orthogonal_", "sparse_")


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _writes_first_arg(func) -> bool:
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


class _Recorder(TorchDispatchMode):
    """Records the in-place ops on meta parameters; tracks which CPU tensors were never written."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[int, list[tuple]] = {}  # meta parameter storage -> ops (see materialise)
        self.unwritten: set[int] = set()  # CPU storages made by torch.empty and not written since
        self.error: str | None = None
        self.names: dict[str, int] = {}  # parameter name -> its storage key (remember_names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is not None and target.is_meta and _writes_first_arg(func) and _key(target) in self.logs:
            self._record(func, name, target, args[1:], kwargs)
            return target
        out = func(*args, **kwargs)
        in_keys = {_key(a) for a in args if isinstance(a, torch.Tensor) and not a.is_meta}
        if target is not None and not target.is_meta and _writes_first_arg(func):
            self.unwritten.discard(_key(target))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and not o.is_meta:
                if name in _EMPTY:
                    self.unwritten.add(_key(o))
                elif _key(o) not in in_keys:  # a new storage with values (a view keeps its mark)
                    self.unwritten.discard(_key(o))
        return out

    def _record(self, func, name: str, target: torch.Tensor, rest: tuple, kwargs: dict) -> None:
        if any(isinstance(a, torch.Tensor) for a in (*rest, *kwargs.values())) or kwargs.get("generator"):
            self.error = self.error or (f"an in-place {name} on a parameter reads another tensor or an explicit "
                                        f"generator")
            return
        rng = None
        if name in _RANDOM:  # advance the CPU generator as the ordinary build would
            rng = torch.get_rng_state()  # (inside its own dispatch the mode is off)
            func(torch.empty(target.shape, dtype=target.dtype), *rest, **kwargs)
        view = (tuple(target.shape), tuple(target.stride()), target.storage_offset())
        self.logs[_key(target)].append((func, view, rest, kwargs, rng))

    def register(self, param: torch.Tensor) -> torch.Tensor:
        """The meta twin of a parameter being registered; its value kept if it has one."""
        initial = None if _key(param) in self.unwritten else param.detach()
        from torch.utils._python_dispatch import _pop_mode_temporarily

        with _pop_mode_temporarily():
            meta = param.detach().to("meta")
        self.logs[_key(meta)] = [] if initial is None else [("value", initial)]
        return meta


@contextlib.contextmanager
def record_meta_build():
    """Inside: parameters registered on any module go to the meta device and their init is recorded.

    Yields the recorder, which :func:`materialise` replays after sharding.
    """
    recorder = _Recorder()
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(recorder.register(param), requires_grad=param.requires_grad)
        original(module, name, param)

    def refuse(fname: str) -> Callable[..., Any]:
        def fn(*args, **kwargs):
            raise MinigptError(f"train.meta_init cannot reproduce nn.init.{fname} (it skips meta tensors or "
                               f"depends on the values it draws); set train.meta_init = false for this model.")
        return fn

    saved = {f: getattr(nn.init, f) for f in _UNREPLAYABLE}
    nn.Module.register_parameter = register_parameter
    for f in _UNREPLAYABLE:
        setattr(nn.init, f, refuse(f))
    try:
        with recorder:
            yield recorder
    finally:
        nn.Module.register_parameter = original
        for f, fn in saved.items():
            setattr(nn.init, f, fn)
    if recorder.error:
        raise MinigptError(f"train.meta_init cannot reproduce this model's initialisation: {recorder.error}. "
                           f"Set train.meta_init = false (the model is then built whole on each process).")


def _local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` for a sharded (DTensor) parameter; ``full`` for a plain one."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if b is not None and not b.is_meta}


def _to_empty(model: nn.Module, device: torch.device) -> None:
    """Allocate every (sharded) parameter on ``device``; the buffers keep their real values."""
    buffers = _buffers(model)
    first: dict[int, str] = {}
    ties = []  # (alias, name of the parameter it is): to_empty gives each module its own new parameter
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        first.setdefault(id(p), name)
    model.to_empty(device=device)
    for alias, name in ties:
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    with torch.no_grad():
        for name, value in buffers.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = value.to(device)


@torch.no_grad()
def materialise(model: nn.Module, recorder: _Recorder, device: torch.device) -> None:
    """After fully_shard: allocate each rank's shards on ``device`` and fill them by replaying the build."""
    _to_empty(model, device)
    rng = torch.get_rng_state()
    try:
        for name, param in model.named_parameters():
            log = recorder.logs.get(recorder.names[name])
            if not log or log[0][0] != "value" and not _overwrites(log[0]):
                raise MinigptError(
                    f"train.meta_init cannot reproduce the initial value of {name}: it was created with "
                    f"torch.empty and first touched by an op that reads it. Set train.meta_init = false.")
            full = _replay(log, tuple(param.shape), param.dtype)
            _local(param).copy_(_local_slice(param, full).to(device))
            del full
    finally:
        torch.set_rng_state(rng)


def _overwrites(entry: tuple) -> bool:
    func, _, _, _, rng = entry
    return rng is not None or _op_name(func) in {"fill_", "zero_"}


def _replay(log: list[tuple], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    full = torch.empty(shape, dtype=dtype)
    for entry in log:
        if entry[0] == "value":
            full.copy_(entry[1])
            continue
        func, (size, stride, offset), rest, kwargs, rng = entry
        if rng is not None:
            torch.set_rng_state(rng)
        func(full.as_strided(size, stride, offset), *rest, **kwargs)
    return full


def remember_names(model: nn.Module, recorder: _Recorder) -> None:
    """Name each recorded storage by its parameter (before fully_shard replaces the parameters)."""
    recorder.names = {name: _key(p) for name, p in model.named_parameters(remove_duplicate=False)}


def build_meta_model(spec) -> tuple[nn.Module, _Recorder]:
    """The GPT of ``spec`` with meta parameters, and the recording that :func:`materialise` replays.

    Seeded as :func:`minigpt_core.model.build.build_model` seeds, so the replay gives its weights.
    """
    with record_meta_build() as recorder:
        torch.manual_seed(spec.seed)
        model = GPT(spec.model, spec.model.components)
    remember_names(model, recorder)
    return model, recorder


# -- sharded checkpoints ----------------------------------------------------------------------
def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a sharded checkpoint stores: a tied tensor once, causal masks (rebuilt from the spec) not."""
    first: dict[int, str] = {}
    aliases = set()  # the state dict gives a tied parameter under each of its names
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            aliases.add(name)
    return {k: v for k, v in model.state_dict().items() if k not in aliases and not k.endswith(".mask")}


def local_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's (and persistent buffer's) local shard on this rank, as contiguous CPU copies."""
    return {k: _local(v).detach().to("cpu", copy=True).contiguous() for k, v in _state(model).items()}


def shard_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Full shape of every tensor a sharded checkpoint stores and whether it is split (along dim 0)."""
    return {k: {"shape": list(v.shape), "sharded": hasattr(v, "device_mesh")} for k, v in _state(model).items()}


@torch.no_grad()
def load_local_shards(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device, source: str) -> None:
    """Fill a sharded (meta-built, not yet materialised) model from this rank's shard file."""
    _to_empty(model, device)
    expected = _state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"The shards in {source} do not fit the model its spec describes: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}.")
    for k, v in expected.items():
        local = _local(v)
        if tuple(local.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{source}: shard of {k} has shape {tuple(state[k].shape)}, this process "
                                  f"expects {tuple(local.shape)}; the checkpoint does not match its spec.")
        local.copy_(state[k].to(device))


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, each tensor this rank's local shard."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)  # sharded (DTensor) by default: nothing gathered
    return {"state": {name: {k: _local(v) if torch.is_tensor(v) else v for k, v in per.items()}
                      for name, per in osd["state"].items()},
            "param_groups": osd["param_groups"]}


def shard_optimizer_state(model: nn.Module, osd: dict[str, Any]) -> dict[str, Any]:
    """Turn the local tensors of a shard file back into DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, per in osd["state"].items():
        param = model.get_parameter(name)
        state[name] = {
            k: DTensor.from_local(v.to(_local(param).device), param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
            if torch.is_tensor(v) and hasattr(param, "device_mesh") and v.dim() == param.dim() else v
            for k, v in per.items()}
    return {**osd, "state": state}
