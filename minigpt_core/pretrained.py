"""Weights in and out of other libraries' checkpoints (Hugging Face GPT-2), and ``init_from``.

The core does what every format shares: finding a checkpoint (a directory, or a Hub id
downloaded into the Hugging Face cache), reading it without unpickling, writing one atomically,
and the spec. The names and layout of the tensors belong to a ``weights`` component from a
plugin (``gpt2.hf``, in the gpt2 plugin), picked by the config's ``model_type``; each model
component maps its own weights (minigpt_core.plugin.CanonicalStateProtocol). So the core names
no plugin's parameters, and a plugin can add another architecture's checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import torch

from .base import toml as _toml
from .base.contracts import HFFilesProtocol
from .base.errors import CheckpointError, PretrainedError
from .base.loader import get_registry
from .base.registry import ComponentRegistry
from .checkpoints.checkpoint import atomic_write_bytes, load_weights_file, read_record, SPEC_FILE, check_plugin_files
from .checkpoints.state import resolve_checkpoint
from .model.build import build_model
from .model.gpt import GPT
from .model.tokenizers import TokenizerError, build_tokenizer, tokenizer_from_state
from .model.trainable import plain_model
from .model.weights import _unwrap
from .spec import MODEL_SLOTS, ExperimentSpec, ModelSpec, parse_spec

__all__ = [
    "HF_PREFIX",
    "DEFAULT_EXPORT_FORMAT",
    "PretrainedError",
    "weights_format",
    "read_hf_checkpoint",
    "resolve_hf_source",
    "import_hf",
    "export_hf",
    "init_from_model",
]

HF_PREFIX = "hf:"  # init_from = "hf:PATH_OR_HUB_ID"
DEFAULT_EXPORT_FORMAT = "gpt2.hf"  # what export-hf writes unless told otherwise
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


# -- formats -----------------------------------------------------------------------------------
def weights_format(registry: ComponentRegistry, *, model_type: str | None = None, name: str | None = None) -> Any:
    """The ``weights`` component named ``name``, or the one that reads ``model_type`` configs."""
    def build(entry):
        return entry.factory(None, entry.make_params({}))

    if name is not None:
        if ("weights", name) not in registry:
            raise PretrainedError(registry.unknown_message("weights", name))
        return build(registry.get("weights", name))
    formats = [(entry.name, build(entry)) for entry in registry.entries("weights")]
    for _, fmt in formats:
        if getattr(fmt, "model_type", None) == model_type:
            return fmt
    known = ", ".join(f"{n} reads '{getattr(fmt, 'model_type', '?')}'" for n, fmt in formats) \
        or "none is installed (the gpt2 plugin provides gpt2.hf)"
    raise PretrainedError(
        f"This Hugging Face checkpoint's model_type is {model_type!r}, and no installed plugin reads it "
        f"(weights formats: {known}). Install a plugin with a `weights` component for it, or convert the "
        f"checkpoint to one of these.")


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads(read_record(directory / "config.json"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json; it is not a Hugging Face checkpoint directory.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / 'config.json'} is unreadable or corrupt ({exc}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'} is not a JSON object; it is not a Hugging Face config.")
    return config


def _model_section(fmt: Any, config: Mapping[str, Any], attention: Mapping[str, Any] | None = None,
                   components: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    section = dict(fmt.model_section(config))
    for slot, table in (components or {}).items():  # another name keeps the format's params (e.g. eps)
        section[slot] = {**section.get(slot, {}), **table}
    if attention:
        section["attention"] = dict(attention)
    return section


def read_hf_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights (model.safetensors, sharded safetensors, or pytorch_model.bin)."""
    directory = Path(directory)
    config = _read_config(directory)
    if (directory / "model.safetensors").is_file():
        return config, load_weights_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(read_record(index))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index} is corrupt ({exc}).") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_weights_file(directory / shard))
        return config, state
    if (directory / "pytorch_model.bin").is_file():
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects.
            return config, torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(
                f"{directory / 'pytorch_model.bin'} cannot be loaded safely ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); it is corrupt or holds more than tensors. "
                f"Convert it to model.safetensors with a trusted tool."
            ) from None
    raise CheckpointError(
        f"{directory} has a config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin."
    )


# -- Hugging Face Hub ----------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why no TCP connection to the hub (or the proxy the environment names) opens, or None if one does.

    huggingface_hub retries a failed request five times with backoff (about 25 s, longer when
    packets are dropped); one short probe first makes an offline machine fail in seconds.
    """
    url = urlsplit(endpoint)
    target = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (p.hostname, p.port or 80)
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {target[0]}:{target[1]}: {exc.strerror or exc}"
    return None


def _hub_download(repo_id: str, cache_dir: str | Path | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise PretrainedError(
            f"'{repo_id}' is not a local directory, and loading it from the Hugging Face Hub needs "
            f"huggingface_hub: `pip install 'minigpt[hf]'`. Or download the model elsewhere and pass "
            f"its directory (config.json + model.safetensors)."
        ) from None
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE")

    def fetch(filename: str, local_only: bool) -> Path:
        # etag_timeout bounds the metadata request, so an unreachable hub fails in seconds, not hangs.
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir,
                                                    local_files_only=local_only, etag_timeout=10))

    def fetch_model(local_only: bool) -> Path:
        config = fetch("config.json", local_only)
        for weights in ("model.safetensors", "pytorch_model.bin"):
            try:
                fetch(weights, local_only)
                return config.parent
            except huggingface_hub.errors.EntryNotFoundError:
                continue
        raise PretrainedError(f"The Hub repository '{repo_id}' has no model.safetensors or pytorch_model.bin.")

    try:
        return fetch_model(local_only=True)  # already in the local cache: no network at all
    except (huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.EntryNotFoundError):
        pass
    if offline:
        raise PretrainedError(
            f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot "
            f"be downloaded. Run once with network access (unset HF_HUB_OFFLINE), or pass the path of a "
            f"directory holding its config.json and model.safetensors."
        )
    offline_hint = (
        f"Download it where there is network (`hf download {repo_id}`) and copy the Hugging Face cache "
        f"here, or pass the path of a directory with its config.json and model.safetensors."
    )
    why = _unreachable(constants.ENDPOINT)
    if why:
        raise PretrainedError(
            f"'{repo_id}' is not in the local Hugging Face cache and this machine looks offline "
            f"({why}). {offline_hint}"
        )
    try:
        return fetch_model(local_only=False)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise PretrainedError(f"There is no Hugging Face Hub model '{repo_id}' (or it is private).") from None
    except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError, OSError) as exc:
        raise PretrainedError(
            f"Cannot download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}): this machine "
            f"looks offline or the Hub is unreachable. {offline_hint}"
        ) from None


def resolve_hf_source(source: str, cache_dir: str | Path | None = None) -> Path:
    """A local Hugging Face checkpoint directory for ``source``: a path, or a hub id such as ``gpt2``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the Hugging Face checkpoint directory that holds it.")
    if not _HUB_ID.match(source) or ".." in source:
        raise CheckpointError(
            f"No Hugging Face checkpoint directory at {source}. Pass a directory holding config.json and "
            f"model.safetensors (or pytorch_model.bin), e.g. one written by save_pretrained, or a hub id "
            f"such as gpt2 when online."
        )
    return _hub_download(source, cache_dir)


# -- import / export -------------------------------------------------------------------------
def import_hf(source: str | Path, registry: ComponentRegistry | None = None, *,
              base: ExperimentSpec | None = None, attention: Mapping[str, Any] | None = None,
              cache_dir: str | Path | None = None,
              components: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[GPT, ExperimentSpec]:
    """Build a minigpt GPT holding a Hugging Face checkpoint (a directory or a hub id).

    The model section comes from the checkpoint's config (through the ``weights`` format that
    reads its model_type); everything else (name, tokenizer, data, training) from ``base`` when
    given. ``attention`` picks any attention the format accepts (for GPT-2: the gpt2 capability);
    ``components`` names other components for slots (e.g. ``minigpt_core.spec.BOOK_COMPONENTS``),
    keeping the format's params.
    """
    registry = registry or get_registry()
    directory = resolve_hf_source(str(source), cache_dir)
    config = _read_config(directory)
    fmt = weights_format(registry, model_type=config.get("model_type"))
    data = base.model_dump(mode="json", exclude_none=True) if base is not None else {"name": "gpt2-import"}
    data.pop("preset", None)
    data["model"] = _model_section(fmt, config, attention, components)
    _, hf_state = read_hf_checkpoint(directory)
    spec = parse_spec(data, source=f"{directory}/config.json", registry=registry)
    fmt.check(spec.components, export=False)
    model = build_model(spec)
    fmt.load_state(model, hf_state, str(directory))
    return model, spec


def _write_tokenizer_files(spec: ExperimentSpec, directory: Path, tokenizer_state: Mapping[str, Any] | None) -> None:
    """The tokenizer's own Hugging Face files (``hf_files``), so the export loads with AutoTokenizer too."""
    try:
        tok = tokenizer_from_state(tokenizer_state, spec.registry) if tokenizer_state else build_tokenizer(spec)
    except (TokenizerError, KeyError):  # e.g. a learnt vocabulary (char) without its saved state
        tok = None
    files = tok.hf_files(spec.model.context_length) if isinstance(tok, HFFilesProtocol) else None
    if files:
        for name, content in files.items():
            atomic_write_bytes(directory / name, content)
        return
    name = spec.tokenizer.name
    warnings.warn(
        f"{directory} has no tokenizer files: the model was trained with the {name!r} tokenizer, which "
        f"this export cannot write{' without its saved state' if tok is None else ''}. Its token ids are that "
        f"tokenizer's ids, not GPT-2's: encode and decode text with it (minigpt_core.model.tokenizers."
        f"tokenizer_from_state of the checkpoint's meta.json 'tokenizer').", stacklevel=3)


def export_hf(model: torch.nn.Module, spec: ExperimentSpec, directory: str | Path, *,
              tokenizer_state: Mapping[str, Any] | None = None, format: str = DEFAULT_EXPORT_FORMAT) -> Path:
    """Write a directory ``transformers`` loads with identical logits (``GPT2LMHeadModel.from_pretrained``).

    Tokenizer files come along where the tokenizer can write them (gpt2; char given its saved
    ``tokenizer_state``, as in a checkpoint's meta.json); otherwise a warning says that the
    directory has no tokenizer.
    """
    from safetensors.torch import save

    model = plain_model(_unwrap(model))  # an adapter merged into the base weights: plain GPT-2
    fmt = weights_format(spec.registry, name=format)
    fmt.check(spec.components, export=True)
    state = {k: v.float().contiguous() for k, v in fmt.state(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config.json last: a directory with a config is complete.
    atomic_write_bytes(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    _write_tokenizer_files(spec, directory, tokenizer_state)
    atomic_write_bytes(directory / "config.json", json.dumps(fmt.config(model), indent=2).encode("utf-8"))
    return directory


# -- init_from -------------------------------------------------------------------------------
_SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")


def _merge_model_section(spec: ExperimentSpec, imported: ModelSpec, source: str) -> dict[str, Any]:
    """The imported model section, with the file's attention choice and drop_rate when it sets them."""
    mine = spec.model
    chosen = mine.model_fields_set
    merged = imported.model_dump(mode="json")
    ignored = [f"model.{f}={getattr(mine, f)!r}" for f in _SHAPE_FIELDS + tuple(MODEL_SLOTS)
               if f in chosen and f not in ("attention", "init") and getattr(mine, f) != getattr(imported, f)]
    if ignored:
        warnings.warn(
            f"init_from = {source!r} decides the model's architecture; the file's "
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored.", stacklevel=3)
    if "attention" in chosen:
        merged["attention"] = mine.attention.model_dump(mode="json")
    if "drop_rate" in chosen:
        merged["drop_rate"] = mine.drop_rate
    return merged


def init_from_model(spec: ExperimentSpec) -> ModelSpec:
    """The model section a run with ``init_from`` will have, read cheaply (config files, no weights).

    ``validate`` shows this shape instead of the file's (which init_from overrides). A Hub id that is
    not cached locally is not fetched: the file's own section is returned.
    """
    source = spec.init_from
    if source is None:
        return spec.model
    if source.startswith(HF_PREFIX):
        directory = Path(source[len(HF_PREFIX):]).expanduser()
        if not (directory / "config.json").is_file():
            return spec.model
        config = _read_config(directory)
        fmt = weights_format(spec.registry, model_type=config.get("model_type"))
        imported = ModelSpec.model_validate(fmt.model_section(config))
    else:
        if not Path(source).is_dir():
            raise CheckpointError(
                f"init_from = {source!r}: no such checkpoint directory. Use a minigpt checkpoint "
                f"directory (or a run directory: its latest checkpoint), or 'hf:PATH_OR_HUB_ID' for "
                f"Hugging Face GPT-2 weights."
            )

        ckpt = resolve_checkpoint(source)
        try:
            saved = _toml.loads(read_record(ckpt / SPEC_FILE))
        except (OSError, UnicodeDecodeError, _toml.TOMLDecodeError) as exc:
            raise CheckpointError(f"{ckpt / SPEC_FILE} is unreadable or corrupt ({exc}).") from None
        saved = check_plugin_files(ckpt, saved, spec.registry)  # its plugin files: gone (error) or changed (warning)
        imported = parse_spec(saved, source=str(ckpt / SPEC_FILE), registry=spec.registry).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself warns about ignored fields
        merged = _merge_model_section(spec, imported, source)
    return ModelSpec.model_validate(merged)


