"""The lm_eval model type ``minigpt``: EleutherAI's lm-evaluation-harness scoring a minigpt checkpoint.

:class:`MinigptLM` is an ``lm_eval.api.model.TemplateLM`` (lm_eval's ``LM`` with its shared
tokenization: a context's trailing spaces move to the continuation, an empty context is the
prefix token), registered in lm_eval's model registry as ``minigpt``. It answers lm_eval's three
requests the way lm_eval's own ``hf`` model does, on minigpt's model and tokenizer:

- ``loglikelihood``: (context, continuation) pairs, longest first (``Collator``), right-padded
  into batches of ``batch_size``; a pair longer than the context length L loses tokens on the left
  (``(context + continuation)[-(L + 1):][:-1]``, as ``hf`` cuts it). A continuation longer than L
  (where ``hf`` stops with an assertion) is scored in pieces of L / 2 tokens, each piece with the
  tokens before it as context. The log-probabilities are over
  the model's whole vocabulary (what minigpt's loss uses); ``is_greedy`` compares the continuation
  with the argmax over the tokenizer's ids (what greedy generation would produce).
- ``loglikelihood_rolling``: lm_eval's rolling windows (``get_rolling_token_windows`` with
  ``make_disjoint_window``: every token predicted once, each window as much context as fits),
  scored as loglikelihood pairs and summed per text.
- ``generate_until``: minigpt's own ``generate`` with its KV cache, greedy unless the request
  asks ``do_sample``; it stops when every row of a batch has produced one of the ``until``
  strings (or the end-of-text token) and the text is cut at the first of them. Rows of a batch
  have the same context length (no padding: minigpt's generation takes no attention mask).
  The context keeps its last ``L - max_gen_toks`` tokens when that leaves room (``hf``'s rule),
  else its last ``L``; a generation that runs past the context length continues on a sliding
  window, as ``minigpt sample`` does.

The prefix token (what an empty context and the first rolling window condition on) is the
end-of-text token, or for a tokenizer without one (``char``) the last token of the ``"\\n\\n"``
that separates documents in minigpt's training data. A text the tokenizer cannot encode (a
character outside a ``char`` vocabulary) is a :class:`~minigpt_core.base.errors.MinigptError`
naming it.

Checkpoints load through ``assembly.load_for_inference``, as ``minigpt sample`` and ``eval`` load
them: safetensors and JSON only (nothing is unpickled), fine-tuned adapters merged, int8
checkpoints on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  lm_eval's own model table first: get_model imports it only while the registry is empty
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from ..assembly import load_for_inference
from ..base.errors import MinigptError
from ..base.progress import progress_bar
from ..model.generate import generate
from ..model.tokenizers import TokenizerError

__all__ = ["MinigptLM", "MODEL_ARGS", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_GEN_TOKS"]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's hf default
# --model_args minigpt takes (lm_eval adds batch_size, max_batch_size and device from its own options).
MODEL_ARGS = {
    "checkpoint": "a checkpoint directory, or a run / experiment directory (its best checkpoint, else its latest)",
    "device": "auto (default), cpu, cuda, cuda:1, mps",
    "batch_size": f"requests per forward pass (default {DEFAULT_BATCH_SIZE}; 'auto' takes the default)",
    "max_batch_size": "accepted for lm_eval's --max_batch_size and ignored",
    "quantize": "int8-dynamic or int8-weight: quantize a float checkpoint after loading (CPU)",
    "max_gen_toks": f"tokens generate_until produces at most when a task does not say (default {DEFAULT_MAX_GEN_TOKS})",
    "progress": "true (default): a progress bar on a terminal; false: none",
}
_SLIDING = "the text passed the model's context length"  # generate's warning, expected here


class AdapterError(MinigptError):
    """The minigpt lm_eval model got arguments it cannot use."""


def _generation_options(gen_kwargs: dict[str, Any], default_max: int, eos: str | None) -> dict[str, Any]:
    """lm_eval's generation arguments as generate_until reads them (its hf model's rules): ``until`` a list
    of stop strings with the end-of-text string added, ``max_gen_toks`` (or max_new_tokens / max_tokens),
    sampling with ``do_sample`` (at ``temperature``, default 1) or a temperature above 0, else greedy."""
    until = gen_kwargs.get("until")
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(u, str) for u in until):
        raise AdapterError(f"generate_until's `until` must be a string or a list of strings, not {until!r}.")
    if eos is not None and eos not in until:
        until.append(eos)
    n = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if gen_kwargs.get(k)),
             default_max)
    temperature = gen_kwargs.get("temperature")
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is None:  # lm_eval's convention: a temperature above 0 alone asks for sampling
        do_sample = float(temperature or 0.0) > 0
    temperature = (1.0 if temperature is None else float(temperature)) if do_sample else 0.0
    sample = bool(do_sample) and temperature > 0
    return {"until": [u for u in until if u], "max_gen_toks": int(n), "sample": sample,
            "temperature": temperature if sample else 0.0,
            "top_k": gen_kwargs.get("top_k") if sample else None, "top_p": gen_kwargs.get("top_p") if sample else None}


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop string."""
    for stop in until:
        text = text.split(stop)[0]
    return text


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("0", "false", "no", "off", "")


def _batch_size(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise AdapterError(f"batch_size must be a whole number >= 1 (or 'auto'), not {value!r}.")
    return size


@register_model("minigpt")
class MinigptLM(TemplateLM):
    """A minigpt language model as lm_eval sees it (``lm_eval`` ``--model minigpt --model_args checkpoint=DIR``)."""

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, device: str | None = "auto", batch_size: Any = None,
                 max_batch_size: Any = None, quantize: str | None = None, max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS,
                 progress: Any = True, **unknown: Any):
        super().__init__()
        if unknown:
            raise AdapterError(
                f"The minigpt lm_eval model does not take {', '.join(sorted(unknown))}; its arguments are: "
                + "; ".join(f"{k} ({v})" for k, v in MODEL_ARGS.items()) + ".")
        if not checkpoint:
            raise AdapterError("The minigpt lm_eval model needs a checkpoint: --model_args checkpoint=DIR (a "
                               "checkpoint directory, or a run directory: its best checkpoint, else its latest).")
        if not Path(str(checkpoint)).exists():
            raise AdapterError(f"No checkpoint at {checkpoint}: give a checkpoint directory, or a run or experiment "
                               f"directory (its best checkpoint, else its latest).")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line passes cuda:0 unless told otherwise; like its hf model, fall back.
            device = "auto"
        ckpt, model, spec, tokenizer, dev = load_for_inference(str(checkpoint), device, quantize=quantize,
                                                               what="lm_eval")
        self._setup(model, tokenizer, dev, batch_size=batch_size, max_gen_toks=max_gen_toks, progress=progress)
        self.checkpoint = ckpt
        self.quantized = quantize

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str | None = None,
                   batch_size: Any = None, max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS, progress: Any = True,
                   checkpoint: str | Path | None = None) -> "MinigptLM":
        """An adapter around a model already loaded (a GPT and its tokenizer), e.g. in a test or a notebook."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        self._setup(model, tokenizer, dev, batch_size=batch_size, max_gen_toks=max_gen_toks, progress=progress)
        self.checkpoint, self.quantized = (Path(checkpoint) if checkpoint else None), None
        return self

    def _setup(self, model, tokenizer, device, *, batch_size, max_gen_toks, progress) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self._device = torch.device(device)
        self.batch_size = _batch_size(batch_size)
        try:
            self._max_gen_toks = int(max_gen_toks)
        except (TypeError, ValueError):
            self._max_gen_toks = 0
        if self._max_gen_toks < 1:
            raise AdapterError(f"max_gen_toks must be a whole number >= 1, not {max_gen_toks!r}.")
        self.progress = _flag(progress)
        eot = tokenizer.eot_id
        # A tokenizer without an end-of-text token: documents are joined with "\n\n" in the training data.
        self._prefix = eot if eot is not None else tokenizer.encode("\n\n")[-1]

    # -- what lm_eval asks of a model --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return int(self.model.spec.context_length)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        try:
            return self.tok.encode(string)
        except TokenizerError as exc:
            raise AdapterError(
                f"A task's text cannot be encoded with the checkpoint's {self.tok.name} tokenizer: {exc} A "
                f"character model reads only the characters of its training text: evaluate it on tasks written in "
                f"them (pydoc_mc and pydoc_cloze use only python-docs' characters), or train with a byte-level "
                f"tokenizer (gpt2, bpe).") from None

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        spec = self.model.spec
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "minigpt_checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "minigpt_tokenizer": self.tok.name, "minigpt_context_length": spec.context_length,
                "minigpt_attention": spec.attention.name if getattr(spec, "attention", None) else None,
                "minigpt_quantize": self.quantized}

    def _bar(self, total: int, desc: str):
        return progress_bar(total, desc=desc, unit="request", enabled=self.progress, delay=1.0)

    # -- loglikelihood -----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # our own bar, on a terminal only

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability, is_greedy) of each (key, context ids, continuation ids), in their order.

        A continuation longer than the context length is scored in pieces of half of it, each with
        the tokens before it as context (every token sees at least half a context)."""
        length = self.max_length
        step = max(1, length // 2)
        pieces: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) <= length:
                pieces.append((ctx, cont))
                owner.append(i)
                continue
            tokens = ctx + cont
            for a in range(len(ctx), len(tokens), step):
                pieces.append((tokens[:a], tokens[a:a + step]))
                owner.append(i)
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        for i, (logprob, is_greedy) in zip(owner, self._score(pieces)):
            totals[i] += logprob
            greedy[i] = greedy[i] and is_greedy
        answers = list(zip(totals, greedy))
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    @torch.no_grad()
    def _score(self, pieces: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Batched, longest first, right-padded forward passes over (context, continuation) pairs whose
        continuation fits the context length; the context loses tokens on the left as lm_eval's hf cuts it."""
        length = self.max_length
        n_vocab = self.tok.n_vocab
        order = Collator(pieces, sort_fn=lambda r: (-len(r[0] + r[1]), tuple(r[0] + r[1])))
        results: list[tuple[float, bool]] = []
        with self._bar(len(pieces), "loglikelihood") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                rows = [(ctx + cont)[-(length + 1):][:-1] for ctx, cont in chunk]
                width = max(len(r) for r in rows)
                batch = torch.zeros(len(rows), width, dtype=torch.long)
                for i, r in enumerate(rows):
                    batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)  # (B, T, V)
                for (_, cont), row, lp in zip(chunk, rows, logprobs):
                    n = len(cont)
                    scored = lp[len(row) - n:len(row)]  # the positions that predict the continuation
                    target = torch.tensor(cont, dtype=torch.long, device=scored.device)
                    greedy = bool((scored[:, :n_vocab].argmax(dim=-1) == target).all())
                    results.append((float(scored.gather(1, target[:, None]).sum()), greedy))
                bar.update(len(chunk))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------------
    def _context_ids(self, context: str, max_gen_toks: int) -> list[int]:
        ids = self.tok_encode(context) if context else [self.prefix_token_id]
        keep = self.max_length - max_gen_toks if max_gen_toks < self.max_length else self.max_length
        return ids[-keep:]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_id = self.tok.eot_id
        eos = self.tok_decode([eos_id]) if eos_id is not None else None
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            if not isinstance(gen_kwargs, dict):
                raise AdapterError(f"generate_until expects its generation arguments as a dict, not {gen_kwargs!r}.")
            options = _generation_options(gen_kwargs, self.max_gen_toks, eos)
            prepared.append((context, gen_kwargs, self._context_ids(context, options["max_gen_toks"]), options))
        # Same arguments and same context length in a batch: minigpt's generation needs no padding then.
        order = Collator(prepared, sort_fn=lambda r: (-len(r[2]), r[0]), group_by="gen_kwargs",
                         group_fn=lambda r: {**r[1], "__context_length": len(r[2])})
        results: list[str] = []
        with self._bar(len(requests), "generate_until") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                options = chunk[0][3]
                texts = self._generate([r[2] for r in chunk], options)
                for (context, gen_kwargs, _, _), text in zip(chunk, texts):
                    text = _cut(text, options["until"])
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(chunk))
        return order.get_original(results)

    def _generate(self, rows: list[list[int]], options: dict[str, Any]) -> list[str]:
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        stops = options["until"]

        def on_token(ids: torch.Tensor) -> None:
            for i, t in enumerate(ids[:, 0].tolist()):
                if not done[i]:
                    new[i].append(t)

        def stop() -> bool:
            for i in range(len(rows)):
                if not done[i] and stops:
                    text = self.tok_decode(new[i])
                    done[i] = any(s in text for s in stops)
            return all(done)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SLIDING)
            generate(self.model, torch.tensor(rows, dtype=torch.long, device=self._device), options["max_gen_toks"],
                     temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"],
                     n_vocab=self.tok.n_vocab, eos_id=self.tok.eot_id, on_token=on_token, stop=stop)
        return [self.tok_decode(ids) for ids in new]
