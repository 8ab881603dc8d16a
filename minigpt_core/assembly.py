"""Layer 6 (tasks and fine-tuning), its top: the model a checkpoint or a spec describes, whatever its task.

Loading a checkpoint (a task's head, a fine-tuned model's base and adapter, int8 weights),
``init_from`` (another checkpoint, or Hugging Face weights), quantizing a checkpoint, and the
parameter summary of a spec. These call each other (a fine-tuned checkpoint's base is itself
loaded through ``init_from``), so they live in one module above tasks, finetune, pretrained and
quantize. May import every layer up to and including tasks and fine-tuning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .base.device import select_device
from .base.errors import CheckpointError, MinigptError
from .base.registry import ComponentRegistry
from .checkpoints.checkpoint import (
    _verify_model_files,
    load_checkpoint_weights,
    load_spec_from_checkpoint,
    read_meta,
    save_model,
)
from .checkpoints.state import CHECKPOINTS_DIR, list_checkpoints, pick_checkpoint
from .finetune import META_KEY, Finetune, apply_finetune, base_record, finetune_active, trainable_state
from .model.gpt import GPT
from .model.build import build_model
from .model.summary import ParameterSummary, summarize
from .model.tokenizers import build_tokenizer, tokenizer_from_state
from .model.trainable import plain_model
from .model.weights import load_model_state, model_state_for_saving
from .pretrained import (
    DEFAULT_EXPORT_FORMAT,
    HF_PREFIX,
    _merge_model_section,
    init_from_model,
    read_hf_checkpoint,
    resolve_hf_source,
    weights_format,
)
from .quantize import (
    DEFAULT_METHOD,
    QuantizationError,
    check_device,
    check_quantized_use,
    get_method,
    load_quantized,
    quantization_record,
    quantize_model,
    quantized_state,
)
from .spec import ExperimentSpec, ModelSpec, parse_spec
from .tasks import build_task_model, check_init_from_task, get_task, require_lm
from .tasks.classification import read_examples, resolve_classes

__all__ = ["load_model", "load_for_inference", "load_init_from", "init_from_record", "INIT_FROM_KEY", "restore_finetuned", "count_trainable",
           "quantize_checkpoint", "summarize_spec", "with_task_classes"]

def load_model(directory: str | Path, registry: ComponentRegistry | None = None,
               map_location: str | torch.device = "cpu", *,
               quantized: bool = False) -> tuple[GPT, ExperimentSpec]:
    """Rebuild the model from ``spec.toml`` and load ``model.safetensors`` into it.

    A fine-tuning checkpoint that holds only trainable tensors rebuilds its base first (named in
    meta.json, sha256-checked); an adapter comes back merged into the base weights (a plain GPT).

    The files are checked against their recorded sha256 first (CheckpointError naming a damaged one).
    An int8 checkpoint (``minigpt quantize``) loads only with ``quantized=True`` (inference): a
    QuantizationError otherwise, since training or exporting needs float weights.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoint directory at {directory}.")
    meta = read_meta(directory)
    _verify_model_files(directory, meta)
    if meta.get("quantization") and not quantized:
        check_quantized_use(directory, meta, "training, init_from, export or classification")
    spec = load_spec_from_checkpoint(directory, registry)
    state = load_checkpoint_weights(directory)
    if meta.get("quantization"):
        return load_quantized(directory, spec, state, meta, map_location), spec
    if finetune_active(spec):  # base (+ adapter, merged into it; + a task's head): a plain model
        model = plain_model(restore_finetuned(spec, state, meta, str(directory))[0], copy_model=False)
        return model.to(map_location), spec
    model = build_task_model(spec)  # with the task's head (a classifier's Linear(emb_dim, n_classes))
    load_model_state(model, state, str(directory))
    return model.to(map_location), spec


def load_for_inference(path: str | Path, device: str = "auto", *, quantize: str | None = None,
                       report: Callable[[str], None] | None = None, what: str = "sampling or next-token evaluation"
                       ) -> tuple[Path, GPT, ExperimentSpec, Any, torch.device]:
    """(checkpoint, model, spec, tokenizer, device) of the language model an inference command names.

    ``path`` is a checkpoint, or a run or experiment directory (its best checkpoint, else its latest:
    :func:`pick_checkpoint`); ``report`` receives one line naming the checkpoint chosen, before it
    loads. An int8 checkpoint (``minigpt quantize``) loads as such; ``quantize`` (a method name)
    quantizes a float one after loading. Both run on the CPU ("auto" picks it). A fine-tuned
    checkpoint's adapter comes back merged (:func:`load_model`); a model of another task than ``lm``
    is refused (``what`` says what it was loaded for). The tokenizer is the one the run saved."""
    ckpt, which = pick_checkpoint(path)
    record = read_meta(ckpt).get("quantization")
    stored = record.get("method") if isinstance(record, dict) else "?"  # a damaged record: load_model says so
    if quantize is not None:
        get_method(quantize)  # an unknown method or a missing library before the load
        if record:
            raise QuantizationError(f"{ckpt} is already quantized (method {stored}); leave out "
                                    f"--quantize, or give the float checkpoint it was made from.")
    int8 = bool(record) or quantize is not None
    if report is not None:
        report(f"checkpoint: {ckpt} ({which}{', int8 ' + (quantize or stored) if int8 else ''})")
    if int8 and device != "auto":  # before select_device: the reason is int8, not a missing GPU
        check_device(device)
    dev = select_device("cpu" if int8 else device)
    model, spec = load_model(ckpt, map_location=dev, quantized=True)
    if quantize is not None:
        model = quantize_model(model, quantize)
    require_lm(spec, ckpt, what)
    state = read_meta(ckpt).get("tokenizer")
    tokenizer = tokenizer_from_state(state) if state else build_tokenizer(spec)
    return ckpt, model, spec, tokenizer, dev


INIT_FROM_KEY = "init_from"  # meta.json: what a run's init_from resolved to (init_from_record)


def init_from_record(given: str, ckpt: Path, which: str) -> dict[str, Any]:
    """What ``init_from = given`` resolved to, for the run's banner and its checkpoints' meta.json:
    ``{"given", "checkpoint" (absolute), "which"}``; ``which`` says how it was chosen, e.g. "best
    checkpoint of the latest run in runs/quickstart" (a later run there changes what the same file
    starts from)."""
    given_path, run = Path(given).resolve(), ckpt.resolve().parent.parent
    if which != "as given" and given_path != run and given_path != run / "checkpoints":
        which = f"{which} checkpoint of the latest run in {given}, {run.name}"
    elif which != "as given":
        which = f"{which} checkpoint of the run"
    return {"given": given, "checkpoint": str(ckpt.resolve()), "which": which}


def load_init_from(spec: ExperimentSpec, *, cache_dir: str | Path | None = None,
                   report: Callable[[str], None] | None = None,
                   record: dict[str, Any] | None = None) -> tuple[GPT, ExperimentSpec]:
    """The model a run starts from, and the spec that describes it.

    ``init_from = "hf:PATH_OR_HUB_ID"`` loads Hugging Face GPT-2 weights; ``init_from = "DIR"`` a
    minigpt checkpoint directory (a run or experiment directory: its best checkpoint, else its
    latest; the files are hash-checked); ``None`` builds the spec's model with its init scheme. The
    model section comes from the weights; the file may still choose any GPT-2 compatible attention
    (``[model.attention]``) and the dropout rate, and all its other sections are kept. ``report``
    receives a line naming the checkpoint used; ``record`` (a dict) is filled with what init_from
    resolved to (see :func:`init_from_record`).
    """
    source = spec.init_from
    if source is None:
        return build_model(spec), spec
    if source.startswith(HF_PREFIX):
        directory = resolve_hf_source(source[len(HF_PREFIX):], cache_dir)
        if record is not None:
            record.update(given=source, checkpoint=HF_PREFIX + str(Path(directory).resolve()), which="as given")
        config, hf_state = read_hf_checkpoint(directory)
        fmt = weights_format(spec.registry, model_type=config.get("model_type"))
        imported = ModelSpec.model_validate(fmt.model_section(config))
        new_spec = _respec(spec, _merge_model_section(spec, imported, source))
        fmt.check(new_spec.components, export=False)
        model = build_model(new_spec)
        fmt.load_state(model, hf_state, str(directory))
        return model, new_spec
    else:
        if not Path(source).is_dir():
            raise CheckpointError(
                f"init_from = {source!r}: no such checkpoint directory. Use a minigpt checkpoint "
                f"directory (or a run directory: its best checkpoint, else its latest), or "
                f"'hf:PATH_OR_HUB_ID' for Hugging Face GPT-2 weights."
            )
        ckpt, which = pick_checkpoint(source)
        if report is not None:
            report(f"init_from checkpoint: {ckpt} ({which})")
        if record is not None:
            record.update(init_from_record(source, ckpt, which))
        loaded, loaded_spec = load_model(ckpt, spec.registry)
        check_init_from_task(loaded_spec, spec, ckpt)
        new_spec = _respec(spec, _merge_model_section(spec, loaded_spec.model, source))
        if loaded_spec.task != "lm":  # a fine-tuned model of this task: its head comes too and trains on
            if loaded_spec.model.attention != new_spec.model.attention:
                raise CheckpointError(
                    f"init_from = {source!r} is a {loaded_spec.task} model; going on fine-tuning it keeps its "
                    f"components, but this experiment sets another [model.attention]. Remove that section.")
            cs = new_spec.classification
            if cs is not None and cs.classes is None:
                cs.classes = list(loaded_spec.classification.classes)
                cs._classes_from = str(ckpt)  # named when the data has labels outside them
            model = build_task_model(new_spec)
            model.load_state_dict(loaded.state_dict())
            return model, new_spec
        if new_spec.model.attention == loaded_spec.model.attention:
            model = build_model(new_spec)
            model.load_state_dict(loaded.state_dict())  # same components: same state-dict keys
            return model, new_spec
        # Another attention: only through a layout both speak (GPT-2's: the gpt2 capability).
        fmt = weights_format(spec.registry, name=DEFAULT_EXPORT_FORMAT)
        for s in (loaded_spec, new_spec):
            fmt.check(s.components, export=False)
        model = build_model(new_spec)
        fmt.transfer(loaded, model, source)
        return model, new_spec


def _respec(spec: ExperimentSpec, model: dict[str, Any]) -> ExperimentSpec:
    data = spec.model_dump(mode="json", exclude_none=True)
    data.pop("preset", None)  # the model section is complete; a preset would be merged under it
    data["model"] = model
    return parse_spec(data, source=f"init_from {spec.init_from}", registry=spec.registry)


def _load_base(spec: Any, base: dict[str, Any], source: str) -> nn.Module:
    where = base.get("init_from")
    if not isinstance(where, str):
        raise CheckpointError(f"{source}: its meta.json names no base weights ({META_KEY}.base.init_from).")
    now = base_record(where)  # raises CheckpointError / PretrainedError if the base is gone
    if now["sha256"] != base.get("sha256"):
        raise CheckpointError(
            f"{source} holds only fine-tuned weights on top of the base {where}, whose weights changed since "
            f"(sha256 {str(base.get('sha256'))[:16]}... then, {now['sha256'][:16]}... now). Restore the base "
            f"checkpoint it was trained from; these weights do not fit another one.")
    model, _ = load_init_from(spec.model_copy(update={"init_from": where}))
    return model


def restore_finetuned(spec: Any, state: dict[str, torch.Tensor], meta: dict[str, Any],
                      source: str) -> tuple[nn.Module, Finetune]:
    """The model of a checkpoint written by a fine-tuning run, adapter applied, weights loaded."""
    record = meta.get(META_KEY) if isinstance(meta.get(META_KEY), dict) else {}
    base = record.get("base")
    model = _load_base(spec, base, source) if base else build_model(spec)
    task = get_task(spec)
    if task is not None:  # a task's head, before the adapter: it trains and is saved like the adapter
        model = task.attach_head(model)
    info = apply_finetune(model, spec, base=base)
    if not base:
        load_model_state(model, state, source)
        return model, info
    expected = trainable_state(model, model_state_for_saving(model))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"The fine-tuned weights in {source} do not fit the model its spec and base describe: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. The checkpoint was probably written by another "
            f"version of the adapter plugin.")
    for k, v in state.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}.")
    model.load_state_dict(state, strict=False)
    return model, info


def count_trainable(spec: Any) -> Finetune:
    """Total and trainable parameters of a fine-tuning spec, built on the meta device (no weights read);
    with the task's head (a classification spec without classes reads them from its data)."""
    try:
        model_section = init_from_model(spec)
    except MinigptError:  # e.g. a checkpoint's spec whose relative init_from is elsewhere: its section is whole
        model_section = spec.model
    task = get_task(spec)
    if task is not None:
        spec = spec.model_copy(deep=True)
        with_task_classes(spec)
        task = get_task(spec)
    with torch.device("meta"):
        model = build_model(model_section.resolve(spec.registry), seed=None)
        if task is not None:  # a new head always trains
            model = task.attach_head(model)
        return apply_finetune(model, spec)


def quantize_checkpoint(source: str | Path, out: str | Path, method: str = DEFAULT_METHOD) -> tuple[Path, dict]:
    """Read a float checkpoint, write its int8 version to ``out``; returns (out, its quantization record)."""
    get_method(method)
    source = Path(source)
    done = read_meta(source).get("quantization")
    if done:
        done = done if isinstance(done, dict) else {}
        raise QuantizationError(f"{source} is already an int8 checkpoint (method {done.get('method', '?')}); "
                                f"quantize the float checkpoint it was made from ({done.get('source', '?')}) "
                                f"instead.")
    out = Path(out)
    _refuse_inside_run_checkpoints(out)
    model, spec = load_model(source)
    require_lm(spec, source, "int8 quantization (for sampling and evaluation)")
    state, names = quantized_state(model)
    meta = {k: v for k, v in read_meta(source).items() if k == "tokenizer"}
    record = quantization_record(method, names, str(source))
    # Written into a hidden sibling and renamed into place: a kill leaves ``out`` complete or absent,
    # never a partial directory that `sample` cannot load and `quantize` will not overwrite.
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_quantize_dirs(out)
    tmp = out.parent / f".{out.name}.quantizing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, spec, tmp, meta={**meta, "quantization": record}, state=state)
        _test_pause(tmp)
        try:
            os.replace(tmp, out)  # also over an empty directory (POSIX rename)
        except OSError as exc:
            if out.exists():
                raise QuantizationError(f"{out} already exists and is not an empty directory ({exc.strerror}); "
                                        f"nothing was written there. Give a new directory.") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, record


def _refuse_inside_run_checkpoints(out: Path) -> None:
    """A run's checkpoints/ directory belongs to the run: its next resume tidies away whatever it does not
    recognise there, a quantized copy included."""
    resolved = out.expanduser().resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name == CHECKPOINTS_DIR and folder.is_dir() and (
                list_checkpoints(folder) or any((folder.parent / f).exists() for f in _RUN_FILES)):
            raise QuantizationError(
                f"{out} is inside the run {folder.parent}'s {CHECKPOINTS_DIR}/ directory, which the run manages: "
                f"its next resume or checkpoint may delete what it does not recognise there. Give a directory "
                f"outside it, e.g. {folder.parent / 'int8'} (nothing was written).")


_RUN_FILES = ("spec.toml", "metrics.jsonl", "console.log")
_QUANTIZING = ".quantizing-"


def _remove_stale_quantize_dirs(out: Path) -> None:
    """The temporary directories a killed `quantize` to ``out`` left behind (their process is gone)."""
    for leftover in out.parent.glob(f".{out.name}{_QUANTIZING}*"):
        pid = leftover.name.rpartition(_QUANTIZING)[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _test_pause(tmp: Path) -> None:
    """Test hook: with MINIGPT_TEST_QUANTIZE_FD=N (an inherited pipe), write "written\n" to fd N once the
    temporary directory is complete, then wait until the pipe's reader hangs up (a test SIGKILLs the
    process in this state, just before the rename)."""
    fd = os.environ.get("MINIGPT_TEST_QUANTIZE_FD")
    if not fd:
        return
    import select

    try:
        os.write(int(fd), b"written\n")
        poller = select.poll()
        poller.register(int(fd), select.POLLERR)  # a pipe's write end reports POLLERR once no reader is left
        poller.poll()
        os.close(int(fd))
    except (OSError, ValueError):  # not an open fd: the hook is for tests, never a reason to fail
        pass


def summarize_spec(spec) -> ParameterSummary:
    """Build on the meta device (no memory, no init cost) and count."""
    if getattr(spec, "task", "lm") != "lm":
        return _summarize_task_spec(spec)
    with torch.device("meta"):
        return summarize(build_model(spec, seed=None))


def _summarize_task_spec(spec) -> ParameterSummary:
    """A fine-tuning spec: the init_from model's shape, with the task's head (classes read from the data
    file when the spec does not declare them)."""
    spec = spec.model_copy(deep=True)
    if spec.init_from is not None:
        spec.model = init_from_model(spec)
    with_task_classes(spec)
    with torch.device("meta"):
        model = build_task_model(spec, seed=None)
        out = summarize(model)
        if finetune_active(spec):  # the trainable line: what [finetune] leaves trainable of these parameters
            counted = {id(p) for p in model.parameters()}
            apply_finetune(model, spec)
            out.trainable = sum(p.numel() for p in model.parameters() if id(p) in counted and p.requires_grad)
    out.fine_tuning = True
    return out


def with_task_classes(spec) -> None:
    """Fill in a classification spec's classes from its data when it does not declare them (in place):
    the head's size depends on them."""
    cs = getattr(spec, "classification", None)
    if getattr(spec, "task", "lm") == "classification" and cs is not None and cs.classes is None:
        cs.classes = resolve_classes(cs, [label for _, label in read_examples(cs)], cs.path or cs.hf_dataset)
