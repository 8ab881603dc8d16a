"""``minigpt attention`` and the per-token half of ``minigpt eval`` (``--per-token``, ``--compare``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ...base.errors import MinigptError
from ...base.progress import progress_bar
from ...checkpoints.checkpoint import read_meta
from ...checkpoints.state import CHECKPOINTS_DIR
from ...runs import is_run_dir
from ..inference import _load_for_inference
from ..parser import arguments, command

__all__ = ["add_per_token_args", "PerTokenEval", "checkpoint_label", "output_dir"]

DEFAULT_MAX_TOKENS = 64  # readable tick labels in a per-head grid; --max-tokens up to the context length


def checkpoint_label(ckpt: Path, spec) -> str:
    """'quickstart/20261202-054700/step_00000800': the experiment, the run and the checkpoint, for titles
    and legends (two runs of one experiment share its name and their step numbers, so the run tells
    the sides of a comparison apart); 'NAME/step_…' for a checkpoint outside any run."""
    ckpt = ckpt.resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name == CHECKPOINTS_DIR and is_run_dir(run):
        return f"{spec.name}/{run.name}/{ckpt.name}"
    return f"{spec.name}/{ckpt.name}"


def output_dir(out: str | None, ckpt: Path, what: str) -> Path:
    """Where a command writes its files: ``--out``, else RUN/<what>/ of the checkpoint's run (beside its
    checkpoints, so a checkout or the current directory gains no stray folders), else (a checkpoint
    outside any run) the checkpoint's own directory. A default place is printed."""
    if out is not None:
        return Path(out)
    run = ckpt.parent.parent
    place = run / what if ckpt.parent.name == CHECKPOINTS_DIR and is_run_dir(run) else ckpt / what
    print(f"writing to {place}/ (in the checkpoint's {'run' if place.parent == run else 'directory'}; --out DIR "
          f"chooses another place)")
    return place


def _pick(values: list[int] | None, n: int, what: str) -> list[int]:
    if not values:
        return list(range(n))
    out = []
    for v in values:
        if not -n <= v < n:
            raise MinigptError(f"--{what} {v} does not exist: the model has {n} {what}s (0 to {n - 1}, or "
                               f"negative to count from the end).")
        out.append(v % n)
    return list(dict.fromkeys(out))


def _read_text(args) -> str:
    if args.file is None:
        return args.text
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinigptError(f"--file {args.file}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MinigptError(f"--file {args.file} cannot be read as UTF-8 text: {exc}") from None


# -- attention ---------------------------------------------------------------------------------
def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, or a run / experiment directory (its best checkpoint, "
                                      "else its latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to run through the model")
    src.add_argument("--file", help="read the text from this UTF-8 file")
    p.add_argument("--layer", type=int, action="append", default=None, metavar="L",
                   help="draw only this layer (repeatable; -1 is the last); default: every layer")
    p.add_argument("--head", type=int, action="append", default=None, metavar="H",
                   help="draw only this head in the PNGs (repeatable); default: every head")
    p.add_argument("--average-heads", action="store_true", help="add a panel with the mean of the heads")
    p.add_argument("--start", type=int, default=0, metavar="N", help="first token of the window shown (default 0)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"tokens in the window (default {DEFAULT_MAX_TOKENS} or the context length if shorter; at "
                        f"most the context length); "
                        f"the model sees only the window")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory: layer-<i>.png and attention.html (default RUN/attention/ of the "
                        "checkpoint's run)")
    p.add_argument("--device", default="auto")


@command("attention", "attention maps of a text: a PNG grid of every head per layer and an offline HTML page")
@arguments(_attention_args)
def _attention(args) -> int:
    import torch

    from ...inspection import attention_modules, attention_weights
    from ...viz.attention import MAX_PAGE_CELLS, attention_page, write_attention_pngs
    from ...viz.html import write_page

    text = _read_text(args)
    if not text:
        raise MinigptError("the text is empty: give the model something to read with --text or --file.")
    ckpt, model, spec, tokenizer, device = _load_for_inference(args.checkpoint, args.device)
    attention_modules(model)  # no attn_weights: say so (and which attentions can) before any work
    ctx = spec.model.context_length
    if args.max_tokens is None:
        args.max_tokens = min(DEFAULT_MAX_TOKENS, ctx)
    if not 1 <= args.max_tokens <= ctx:
        raise MinigptError(f"--max-tokens must be between 1 and the model's context length {ctx}, "
                           f"not {args.max_tokens}.")
    ids = tokenizer.encode(text)
    if not ids:
        raise MinigptError("the text encodes to no tokens.")
    if not 0 <= args.start < len(ids):
        raise MinigptError(f"--start {args.start} is outside the text's {len(ids)} tokens (0 to {len(ids) - 1}).")
    window = ids[args.start:args.start + args.max_tokens]
    if len(window) < len(ids):
        print(f"window: tokens {args.start} to {args.start + len(window) - 1} of {len(ids)} "
              f"(--start / --max-tokens choose it; the model sees only the window)")
    n_layers, n_heads = len(model.trf_blocks), spec.model.n_heads
    layers = _pick(args.layer, n_layers, "layer")
    weights = attention_weights(model, torch.tensor([window], device=device))
    arrays = [w[0].float().cpu().numpy() for w in weights]
    heads = _pick(args.head, arrays[0].shape[0], "head")
    tokens = [tokenizer.decode([i]) for i in window]
    attention = spec.model.attention.name
    causal = spec.components["attention"].entry.has("causal")
    label = checkpoint_label(ckpt, spec)
    out = output_dir(args.out, ckpt, "attention")
    # Drawing is the slow part (a grid of every head per layer): seconds per layer for a 12-layer model.
    with progress_bar(len(layers), desc="drawing attention maps", unit="layer") as bar:
        pngs = write_attention_pngs(arrays, tokens, out, layers=layers, heads=None if args.head is None else heads,
                                    average=args.average_heads, title=f"{label} ({attention})", causal=causal,
                                    progress=bar.update)
    cells = len(layers) * n_heads * len(window) ** 2
    if cells > MAX_PAGE_CELLS:
        print(f"note: no HTML page: {len(layers)} layers x {n_heads} heads x {len(window)}^2 tokens is too much for "
              f"one page; choose fewer with --layer or --max-tokens", file=sys.stderr)
        page = None
    else:
        meta = (f"{ckpt} · attention {attention} · {len(window)} tokens"
                + (f" ({args.start} to {args.start + len(window) - 1} of {len(ids)})" if len(window) < len(ids) else ""))
        page = write_page(out / "attention.html", attention_page(
            [arrays[i] for i in layers], tokens, layers=layers, title=f"Attention: {label}", meta=meta,
            causal=causal))
    for p in pngs:
        print(f"wrote {p}")
    if page is not None:
        print(f"wrote {page} (open it in a browser; works offline)")
    return 0


# -- eval --per-token ----------------------------------------------------------------------------
def add_per_token_args(p: argparse.ArgumentParser) -> None:
    """The options ``minigpt eval`` gets for per-token output."""
    p.add_argument("--per-token", action="store_true",
                   help="also write each token's loss (per-token.jsonl), an HTML page of the text coloured by "
                        "loss, and print the highest-loss tokens")
    p.add_argument("--compare", default=None, metavar="OTHER_CHECKPOINT",
                   help="with --per-token (implied): also evaluate this checkpoint on the same tokens and colour "
                        "by the difference (CHECKPOINT's loss minus OTHER's: red is harder for CHECKPOINT)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where --per-token writes per-token.jsonl, .html and .png (default RUN/per-token/ of the "
                        "checkpoint's run)")


def _show(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


class PerTokenEval:
    """``minigpt eval --per-token [--compare OTHER]``: each token's loss, written, drawn and summarised.

    Built before the evaluation (it loads and checks OTHER, so a mismatch fails before any work);
    :meth:`run` evaluates and returns the mean loss; :meth:`report` writes per-token.jsonl and
    per-token.html and prints the extreme tokens.
    """

    def __init__(self, args, ckpt: Path, spec, tokenizer, length: int):
        self.args, self.ckpt, self.spec, self.tokenizer, self.length = args, ckpt, spec, tokenizer, length
        self.other = self.other_ckpt = self.other_spec = None
        if args.compare is not None:
            self.other_ckpt, self.other, self.other_spec, _, _ = _load_for_inference(args.compare, args.device)
            mine, theirs = read_meta(ckpt).get("tokenizer"), read_meta(self.other_ckpt).get("tokenizer")
            if (mine or spec.tokenizer.model_dump()) != (theirs or self.other_spec.tokenizer.model_dump()):
                raise MinigptError(
                    f"{ckpt} and {self.other_ckpt} use different tokenizers, so their per-token losses cannot be "
                    f"compared token by token; compare checkpoints that share a tokenizer.")
            if self.other_spec.model.context_length < length - 1:
                raise MinigptError(
                    f"{self.other_ckpt} attends over {self.other_spec.model.context_length} tokens, fewer than "
                    f"the {length - 1} of each window of {ckpt}; put the checkpoint with the smaller context "
                    f"first (its windows are used for both).")
        self.out = output_dir(args.out, ckpt, "per-token")  # said before the evaluation, not after
        self.names = (checkpoint_label(ckpt, spec),
                      checkpoint_label(self.other_ckpt, self.other_spec) if self.other is not None else "other")
        if self.names[0] == self.names[1]:  # same labels from different places (copies): the paths differ
            self.names = (str(ckpt), str(self.other_ckpt))

    def run(self, model, corpus, starts: np.ndarray, device, progress=None) -> float:
        from ...inspection import window_token_losses

        a = self.args
        kw = dict(micro_batch=a.batch_size, device=device, precision=a.precision, progress=progress)
        self.starts = starts
        self.losses = window_token_losses(model, corpus, starts, self.length, **kw)
        self.other_losses = (None if self.other is None else
                             window_token_losses(self.other, corpus, starts, self.length, **kw))
        windows = corpus.windows(starts, self.length)
        self.first, self.ids = windows[:, 0], windows[:, 1:]  # the first token is context only
        return float(self.losses.astype(np.float64).mean()) if self.losses.size else float("nan")

    def report(self) -> None:
        vocab = {int(i): self.tokenizer.decode([int(i)]) for i in np.unique(self.ids)}
        tokens = [vocab[int(i)] for i in self.ids.ravel()]
        flat = self.losses.ravel()
        other = None if self.other_losses is None else self.other_losses.ravel()
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        # Three files, one a line per token and a figure of up to 1,500 tokens: seconds for a long eval.
        with progress_bar(3, desc="writing per-token files", unit="file") as bar:
            jsonl, picture, page = self._write(out, tokens, flat, other, bar)
        self._tables(tokens, flat, other)
        print(f"wrote {jsonl}, {picture} and {page} (open it in a browser; works offline)")

    def _write(self, out: Path, tokens: list[str], flat: np.ndarray, other: np.ndarray | None, bar):
        from ...viz.html import write_page
        from ...viz._mpl import save_figure
        from ...viz.tokens import MAX_PAGE_TOKENS, loss_figure, loss_page

        per, starts, names = self.length - 1, self.starts, self.names
        jsonl = out / "per-token.jsonl"
        tmp = jsonl.with_name(f".{jsonl.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k, token in enumerate(tokens):
                w, p = divmod(k, per)
                rec = {"window": w, "position": p, "offset": int(starts[w]) + p + 1, "token_id": int(self.ids[w, p]),
                       "token": token, "loss": float(flat[k])}
                if other is not None:
                    rec["other_loss"] = float(other[k])
                    rec["delta"] = float(flat[k] - other[k])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, jsonl)
        bar.update(1)

        shown = min(len(starts), max(1, MAX_PAGE_TOKENS // per))
        meta = f"{self.ckpt} · {len(starts):,} windows of {per} tokens · mean loss {flat.mean():.4f} nats"
        if other is not None:
            meta += f" · {names[1]}: {other.mean():.4f}"
        if shown < len(starts):
            meta += f" · the first {shown:,} windows shown (all are in per-token.jsonl)"
        page = write_page(out / "per-token.html", loss_page(
            tokens[:shown * per], flat[:shown * per], other=None if other is None else other[:shown * per],
            names=names, window_starts=[w * per for w in range(shown)], meta=meta,
            title=f"Per-token loss: {names[0]}" + (f" vs {names[1]}" if other is not None else "")))
        bar.update(1)
        picture = save_figure(loss_figure(
            tokens, flat, other=other, names=names, window_starts=[w * per for w in range(len(starts))],
            title=f"{names[0]}" + (f" vs {names[1]}" if other is not None else "") + f": the first {min(len(tokens), 1500)} "
                  f"tokens evaluated, coloured by " + ("loss difference" if other is not None else "loss")),
            out / "per-token.png")
        bar.update(1)
        return jsonl, picture, page

    def _tables(self, tokens: list[str], flat: np.ndarray, other: np.ndarray | None) -> None:
        per, starts, names = self.length - 1, self.starts, self.names

        def table(order, heading: str, values: np.ndarray) -> None:
            print(heading)
            for k in order:
                w = k // per
                both = f"  ({names[0]} {flat[k]:.3f}, {names[1]} {other[k]:.3f})" if other is not None else ""
                before = (self.tokenizer.decode([int(self.first[w])]) + "".join(tokens[w * per:k]))[-24:]
                print(f"  {values[k]:8.3f}  {_show(tokens[k]):<8} after {_show(before)}  "
                      f"(offset {int(starts[w]) + k % per + 1}){both}")

        top = min(10, flat.size)
        if other is None:
            table(np.argsort(-flat, kind="stable")[:top], "highest-loss tokens (nats):", flat)
        else:
            delta = flat - other
            table(np.argsort(-delta, kind="stable")[:top],
                  f"harder for {names[0]} than for {names[1]} (loss difference, nats):", delta)
            table(np.argsort(delta, kind="stable")[:top], f"easier for {names[0]} than for {names[1]}:", delta)
