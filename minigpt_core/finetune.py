"""Fine-tuning: which parameters train (``[finetune] trainable``) and adapters (``[finetune.adapter]``).

A run applies its ``[finetune]`` section to the model it starts from (``init_from`` weights, or the
init scheme): the adapter (a registry component of kind ``adapter``, e.g. ``book.lora``) wraps the
modules its ``targets`` patterns name, then every base parameter is frozen or not by
``trainable``. Adapter parameters, and those of any module tagged with :func:`mark_trainable`
(a new task head), always train. Frozen parameters get ``requires_grad=False`` and so stay out of
the optimizer.

When some base parameters are frozen and the run starts from ``init_from`` weights, checkpoints
hold only the trainable tensors and name their base (the resolved checkpoint or Hugging Face
directory and the sha256 of its weights); loading rebuilds the base, applies the adapter and
loads those tensors. :func:`plain_model` folds an adapter into the base weights (inference,
``export-hf``, ``init_from`` of a fine-tuned checkpoint).
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base.errors import FinetuneError
from .checkpoints.checkpoint import WEIGHTS_FILE, file_sha256
from .checkpoints.state import pick_checkpoint
from .model.gpt import BuildContext
from .model.trainable import ADAPTER_ATTR, is_marked_trainable, mark_trainable, match_modules, plain_model
from .model.weights import _unwrap
from .pretrained import HF_PREFIX, resolve_hf_source

__all__ = ["FinetuneError", "mark_trainable", "is_marked_trainable", "match_modules", "Finetune",
           "apply_finetune", "finetune_active", "plain_model", "trainable_state", "book_trainable"]

META_KEY = "finetune"  # in a checkpoint's meta.json


def book_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The book's classification recipe (chapter 6): the last block and the final norm (a new head,
    tagged with :func:`mark_trainable`, comes on top)."""
    return [*model.trf_blocks[-1].parameters(), *model.final_norm.parameters()]


def finetune_active(spec: Any) -> bool:
    f = spec.finetune
    return f.adapter is not None or f.trainable not in (None, "all")


def _trainable_setting(spec: Any) -> Any:
    f = spec.finetune
    if f.trainable is None:  # an adapter trains on a frozen base unless told otherwise
        return "none" if f.adapter is not None else "all"
    return f.trainable


@dataclass
class Finetune:
    """What :func:`apply_finetune` did to a model."""

    total: int = 0
    trainable: int = 0
    adapter: Any = None
    adapter_names: list[str] = field(default_factory=list)  # the modules the adapter wraps
    frozen: bool = False  # some base parameter is frozen
    base: dict[str, Any] | None = None  # what a partial checkpoint names as its base

    @property
    def partial(self) -> bool:
        """Checkpoints hold only the trainable tensors (the base is frozen and can be named)."""
        return self.frozen and self.base is not None

    def describe(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        line = f"parameters: {self.total:,} total, {self.trainable:,} trainable ({pct:.2f}%)"
        if self.adapter is not None:
            line += f"; adapter {self.adapter.name} on {len(self.adapter_names)} module(s)"
        return line


def _build_adapter(spec: Any) -> Any:
    resolved = spec.components["finetune.adapter"]
    adapter = resolved.build(BuildContext(spec.model, spec.model.components))
    adapter.name = resolved.entry.name
    return adapter


def apply_finetune(model: nn.Module, spec: Any, *, base: dict[str, Any] | None = None) -> Finetune:
    """Apply the spec's adapter and freeze what ``[finetune] trainable`` does not name, in place."""
    info = Finetune()
    if spec.finetune.adapter is not None:
        info.adapter = _build_adapter(spec)
        try:
            info.adapter_names = list(info.adapter.apply(model))
        except ValueError as exc:
            raise FinetuneError(f"finetune.adapter ({info.adapter.name}): {exc}") from None
        model.__dict__[ADAPTER_ATTR] = info.adapter  # not a sub-module: not in state dicts or .to()
    setting = _trainable_setting(spec)
    always = {id(p) for m in model.modules() if is_marked_trainable(m) for p in m.parameters()}
    names = [n for n, _ in model.named_parameters()]
    if setting == "all":
        keep = set(names)
    elif setting == "none":
        keep = set()
    elif setting == "book":
        chosen = {id(p) for p in book_trainable(model)}
        keep = {n for n, p in model.named_parameters() if id(p) in chosen}
    else:
        keep = set()
        for pattern in setting:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                shown = ", ".join(names[:6]) + f", ... ({len(names)} in all)"
                raise FinetuneError(
                    f"finetune.trainable: the pattern {pattern!r} matches no parameter of the model. Patterns are "
                    f"shell-style over parameter names (`*` also matches dots), e.g. \"final_norm.*\" or "
                    f"\"trf_blocks.*.att.*\"; the model's are: {shown}. A tied output head is tok_emb.weight.")
            keep |= hits
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep or id(p) in always)
    info.frozen = any(not p.requires_grad and id(p) not in always for p in model.parameters())
    info.total = sum(p.numel() for p in model.parameters())
    info.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info.base = base
    if info.trainable == 0:
        raise FinetuneError("finetune: nothing trains: finetune.trainable freezes every parameter and there is no "
                            "adapter. Name what trains (trainable = \"all\", \"book\" or patterns) or add "
                            "[finetune.adapter].")
    return info


# -- the base of a fine-tuned checkpoint ------------------------------------------------------------
def _weights_sha256(files: list[Path]) -> str:
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def base_record(init_from: str | None) -> dict[str, Any] | None:
    """Where the base weights of a run with ``init_from`` are, resolved now, and their sha256."""
    if init_from is None:
        return None
    if init_from.startswith(HF_PREFIX):
        directory = resolve_hf_source(init_from[len(HF_PREFIX):]).resolve()
        files = sorted(p for p in directory.iterdir()
                       if p.name.endswith(".safetensors") or p.name == "pytorch_model.bin")
        if any(p.name.endswith(".safetensors") for p in files):
            files = [p for p in files if p.name.endswith(".safetensors")]
        return {"init_from": HF_PREFIX + str(directory), "sha256": _weights_sha256(files)}

    ckpt, _ = pick_checkpoint(init_from)
    ckpt = ckpt.resolve()
    # a sharded training checkpoint (train.sharded_checkpoint) has one weights file per process instead
    files = sorted(ckpt.glob("model-shard-*.safetensors")) if not (ckpt / WEIGHTS_FILE).is_file() else []
    return {"init_from": str(ckpt), "sha256": _weights_sha256(files or [ckpt / WEIGHTS_FILE])}



def trainable_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (default the model's) that belong to trainable parameters."""
    model = _unwrap(model)
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    state = state if state is not None else model.state_dict()
    return {k: v for k, v in state.items() if k in keep}



