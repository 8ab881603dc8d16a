"""``minigpt train``, ``sample``, ``eval`` and ``prepare``."""

from __future__ import annotations

import argparse
import builtins
import math
import os
import sys
import warnings
from pathlib import Path

from ...base.errors import MinigptError
from ...base.loader import get_registry
from ...checkpoints.checkpoint import read_meta
from ...data import (
    TokenCorpus,
    build_source,
    is_shard_dir,
    load_tokens,
    load_training_data,
    sample_length,
    window_starts,
    write_shards,
)
from ...data.pipeline import text_tokenizer
from ...data.sources import TokenSource
from ...spec import apply_overrides, load_spec, parse_spec
from ..inference import _WHICH, _load_for_inference
from ..parser import arguments, command
from .inspection import PerTokenEval, add_per_token_args

__all__ = ["source_slot"]


def source_slot(source: str, params: list[str] | None = None) -> dict:
    """A data.source slot from a command-line SOURCE: a dataset name, a shards directory or text paths."""
    extra = apply_overrides({}, params or [])
    if ("dataset", source) in get_registry():
        return {"name": source, "params": extra}
    if is_shard_dir(source):
        return {"name": "shards", "params": {"path": source, **extra}}
    return {"name": "text", "params": {"paths": [source], **extra}}


# -- train --------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=None,
                   help="experiment TOML file (not needed with --resume RUN_OR_CHECKPOINT: the run's own spec)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.lr=3e-4 --set model.n_layers=4 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the experiment's latest run exactly, or the given run or checkpoint (an earlier "
                        "checkpoint than the run's latest starts a branch in a new run directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.add_argument("--label", default=None, metavar="TEXT",
                   help="a readable name for the run: its directory becomes <start time>-<label> (letters, digits, "
                        "'.', '_', '-'; spaces become '-'); `minigpt runs` shows it")
    p.add_argument("--run-dir-file", default=None, metavar="FILE",
                   help="write the run directory's path to FILE as soon as it is chosen (how `minigpt ablate` "
                        "learns which run is its cell's)")


@command("train", "train the experiment's model, with checkpoints and W&B / JSONL logging (torchrun for several processes)")
@arguments(_train_args)
def _train(args) -> int:
    from ...train import train
    from ...train.trainer import append_console, label_slug, run_spec

    if args.label is not None:
        label_slug(args.label)  # a bad label fails before anything is loaded
    if args.file is None:
        if args.resume is None or args.resume is True:
            raise MinigptError("minigpt train needs an experiment file (minigpt train experiments/quickstart.toml), "
                               "or a run or checkpoint to resume (minigpt train --resume runs/NAME/RUN).")
        spec = run_spec(args.resume, overrides=args.overrides)  # the run's own spec.toml
    else:
        spec = load_spec(args.file, overrides=args.overrides)
    _busy_cpu_note(spec)
    result = train(spec, resume=args.resume, progress=not args.no_progress, label=args.label,
                   run_dir_file=args.run_dir_file)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    lines: list[str] = []  # the closing lines also go to the run's console.log

    def print(text: str = "") -> None:
        lines.append(text)
        builtins.print(text, flush=True)

    try:
        return _report(spec, result, print)
    finally:
        append_console(result.run_dir, "\n".join(lines))


def _busy_cpu_note(spec) -> None:
    """One line on stderr when other processes already occupy the cores this run's threads need."""
    import torch

    from ...base.device import available_cores, busy_cpu_note, cpu_load

    t = spec.train
    on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()
                                   and not torch.backends.mps.is_available())
    if not on_cpu or int(os.environ.get("RANK", "0")) != 0:
        return
    note = busy_cpu_note(cpu_load(), available_cores(), t.threads or torch.get_num_threads(),
                         os.environ.get("OMP_WAIT_POLICY"))
    if note:
        print(note, file=sys.stderr, flush=True)


def _report(spec, result, print) -> int:
    print()
    classify = spec.task == "classification"
    if result.val_loss is not None and classify:
        print(f"validation loss {result.val_loss:.4f} nats (class entropy of the training split "
              f"{result.unigram_entropy:.4f}: the loss of a model that ignores the text)")
    elif result.val_loss is not None:
        verdict = "below" if result.val_loss < result.unigram_entropy else "NOT below"
        print(f"validation loss {result.val_loss:.4f} nats/token (perplexity {math.exp(min(result.val_loss, 50)):.2f}), "
              f"{verdict} the unigram entropy {result.unigram_entropy:.4f} "
              f"({result.unigram_entropy - result.val_loss:+.4f}: what the model learnt from context)")
    if result.sample is not None and spec.task == "instruction":
        print(f"sample after step {result.step} (the response to the first validation example): {result.sample!r}")
    elif result.sample is not None:
        print(f"sample after step {result.step}: {(spec.train.sample_prompt + result.sample)!r}")
    print(f"run directory: {result.run_dir} (metrics in {result.run_dir / 'metrics.jsonl'})")
    if result.checkpoint is not None:
        best = result.best_checkpoint
        other_best = best is not None and best.resolve() != result.checkpoint.resolve()
        print(f"checkpoint:    {result.checkpoint}" + (f" (best: {best})" if other_best else ""))
        print(f"  minigpt classify {result.checkpoint} --text '...'" if classify else
              f"  minigpt sample {result.checkpoint} --instruction '...' --temperature 0"
              if spec.task == "instruction" else
              f"  minigpt sample {result.checkpoint} --prompt {spec.train.sample_prompt!r}")
    if result.wandb_dir is not None:
        where = "offline run" if result.wandb_mode == "offline" else "run (synced online)"
        print(f"W&B {where}: {result.wandb_dir}")
        if result.wandb_mode == "offline":
            # A resumed run writes one offline-run-* folder per session: upload them all. The run id comes
            # from the folder's run-<id>.wandb: W&B names a folder ...-DATE_TIME-RUNID-1 when a session starts
            # in the same second as the last, so the folder name's last part is not always the id.
            run_id = next((f.stem[len("run-"):] for f in result.wandb_dir.glob("run-*.wandb")),
                          result.wandb_dir.name.rsplit("-", 1)[-1])
            pattern = f"offline-run-*-{run_id}*"
            segments = list(result.wandb_dir.parent.glob(pattern))
            what = result.wandb_dir if len(segments) <= 1 else result.wandb_dir.parent / pattern
            print(f"  upload it with: wandb sync {what}")
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: minigpt train --resume "
              f"{result.checkpoint or result.run_dir}")
        return 130
    return 0


# -- sample ---------------------------------------------------------------------------------
MAX_SAMPLES = 1000  # more is almost certainly a typo; generate in several runs (other --seed)
MAX_NEW_TOKENS = 100_000  # hours on a CPU; the text is printed as it comes in any case
_SAMPLE_BATCH = 64  # samples generated together: bounds memory whatever --num-samples is


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise MinigptError(f"--threads must be >= 1, not {n}.")
        torch.set_num_threads(n)





def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_WHICH)
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="answer an instruction: formatted with the checkpoint's prompt template, generated up to "
                        "the end-of-text token; prints only the response")
    p.add_argument("--input", default="", metavar="TEXT", help="with --instruction: the instruction's input")
    p.add_argument("--template", default=None, metavar="NAME",
                   help="with --instruction: a registered template (default: the checkpoint's, else book.alpaca)")
    # --max-tokens too: the name `attention` uses for its (read) tokens, easy to type here by habit
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=100,
                   help=f"tokens to generate, at most {MAX_NEW_TOKENS:,} (--max-tokens: the same)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, 0 < p <= 1")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a different sample each time)")
    p.add_argument("--num-samples", type=int, default=1, help=f"1 to {MAX_SAMPLES}")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for several samples")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step (pays off for long generations)")
    _quantize_arg(p)


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantize the model's linear layers to int8 after loading, for CPU inference: int8-dynamic "
                        "or int8-weight (docs/quantize.md); `minigpt quantize` saves the result instead")


class _Stream:
    """Prints one sample's tokens as they come, holding back ids that end inside a character."""

    def __init__(self, tokenizer, eos_id: int | None = None):
        self.tokenizer, self.pending, self.eos_id, self.ended = tokenizer, [], eos_id, False

    def __call__(self, next_id) -> None:
        self.ended = self.ended or int(next_id[0, 0]) == self.eos_id
        if self.ended:  # an instruction's response ends at its end-of-text token
            return
        self.pending.append(int(next_id[0, 0]))
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) > 8:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.pending = []

    def close(self) -> None:
        if self.pending:
            sys.stdout.write(self.tokenizer.decode(self.pending))
        sys.stdout.write("\n")
        sys.stdout.flush()


@command("sample", "generate text from a checkpoint")
@arguments(_sample_args)
def _sample(args) -> int:
    import torch
    from ...base.progress import progress_bar

    from ...model.generate import check_sampling, generate

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise MinigptError(f"--num-samples must be between 1 and {MAX_SAMPLES:,}, not {args.num_samples:,}; "
                           f"for more, run sample several times with different --seed values.")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise MinigptError(f"--max-new-tokens {args.max_new_tokens:,} is more than {MAX_NEW_TOKENS:,}, which "
                           f"would run for hours; ask for fewer tokens (or continue from the end of a sample).")
    if args.instruction is None and (args.input or args.template):
        raise MinigptError("--input and --template go with --instruction \"...\" (the instruction to answer).")
    if args.instruction is not None and args.prompt:
        raise MinigptError("Give either --prompt (text to continue) or --instruction (formatted with a prompt "
                           "template), not both.")
    _threads(args.threads)
    ckpt, model, spec, tokenizer, device = _load_for_inference(args.checkpoint, args.device, file=sys.stderr,
                                                               quantize=args.quantize)
    eos, shown = None, args.prompt
    if args.instruction is not None:
        from ...tasks.instruction import instruction_prompt

        text, eos = instruction_prompt(spec, tokenizer, args.instruction, args.input, args.template)
        prompt, shown = tokenizer.encode(text), ""  # only the response is printed
    else:
        prompt = tokenizer.encode(args.prompt) if args.prompt else []
    if not prompt:
        prompt = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    gen = torch.Generator(device)
    gen.manual_seed(args.seed) if args.seed is not None else gen.seed()
    # The end-of-text id of a char tokenizer's instruction model lies just past its vocabulary.
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
              n_vocab=max(tokenizer.n_vocab, (eos or 0) + 1), eos_id=eos, compile=args.compile)
    if args.num_samples == 1:  # printed as it comes: a long generation is never silent
        stream = _Stream(tokenizer, eos)
        sys.stdout.write(shown)
        # A warning raised mid-stream (e.g. the context length passed) would land inside the text's
        # line on a terminal: hold it until the text's line has ended, then show it on its own line.
        with warnings.catch_warnings(record=True) as held:  # the filters in force stay as they are
            try:
                generate(model, torch.tensor([prompt], device=device), args.max_new_tokens, on_token=stream, **kw)
            finally:
                stream.close()
        for w in held:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return 0
    bar = progress_bar(args.num_samples * args.max_new_tokens, unit="token", enabled=not args.no_progress,
                       delay=1.0)
    done = 0
    try:
        while done < args.num_samples:
            rows = min(_SAMPLE_BATCH, args.num_samples - done)
            idx = torch.tensor([prompt] * rows, device=device)
            out = generate(model, idx, args.max_new_tokens, on_token=lambda t: bar.update(t.shape[0]), **kw)
            bar.clear()
            for row in out.tolist():
                if done:
                    print("\n" + "-" * 40)
                row = row[idx.shape[1]:]
                print(shown + tokenizer.decode(row[:row.index(eos)] if eos in row else row), flush=True)
                done += 1
    finally:
        bar.close()
    return 0


# -- eval ---------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_WHICH)
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="evaluate on all of this instead of the run's validation split: a dataset name, a "
                        "shards directory or text files / a quoted glob ('notes/*.txt')")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="params of the --data source")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    _quantize_arg(p)

    add_per_token_args(p)


@command("eval", "validation loss and perplexity of a checkpoint (on its run's validation split or other data)")
@arguments(_eval_args)
def _eval(args) -> int:
    import numpy as np
    from ...base.progress import progress_bar

    from ...tasks.evaluate import eval_windows, evaluate

    if args.batch_size < 1:
        raise MinigptError(f"--batch-size must be >= 1, not {args.batch_size}.")
    if args.max_windows is not None and args.max_windows < 1:
        raise MinigptError(f"--max-windows must be >= 1 (leave it out for all windows), not {args.max_windows}.")
    _threads(args.threads)
    ckpt, model, spec, tokenizer, device = _load_for_inference(args.checkpoint, args.device, quantize=args.quantize)
    if args.precision != "fp32" and (args.quantize or read_meta(ckpt).get("quantization")):
        raise MinigptError(f"--precision {args.precision} does not apply to an int8 model: its quantized layers "
                           f"choose their own arithmetic. Leave out --precision (fp32 for the rest of the model).")
    state = read_meta(ckpt).get("tokenizer")
    if args.data is None:
        data = load_training_data(spec, tokenizer_state=state)
        corpus, starts, length = data.split.corpus, data.split.val, data.split.length
        what = f"the validation split of {data.source}"
        t = spec.train
        logged = len(eval_windows(len(starts), t.eval_batches * t.batch_size))
        # The training log's val/loss averages a fixed subset, so the two numbers differ slightly.
        scope = (f"all of the split (the training log's val/loss: {logged:,} of them, eval_batches x "
                 f"batch_size = {t.eval_batches} x {t.batch_size}, so it differs a little)"
                 if logged < len(starts) else "all of the split, as in the training log's val/loss")
    else:
        raw = spec.model_dump(mode="json", exclude_none=True)
        raw["data"]["source"] = source_slot(args.data, args.param)
        other = parse_spec(raw)
        _, shards, desc = load_tokens(other, tokenizer_state=state)
        length = sample_length(other) + 1
        corpus = TokenCorpus(shards.parts)
        segments = [(int(corpus.offsets[i]), int(corpus.offsets[i + 1])) for i in range(len(shards.parts))]
        starts = window_starts(segments, length, length - 1)
        what = desc
        scope = "all of them"
        if len(starts) == 0:
            raise MinigptError(f"{args.data} holds {corpus.n_tokens} tokens, fewer than one window of {length}.")
    if args.max_windows and args.max_windows < len(starts):
        scope = f"{args.max_windows:,} of its {len(starts):,} windows, spread evenly (--max-windows)"
        starts = starts[eval_windows(len(starts), args.max_windows)]
    per_token = None
    if args.per_token or args.compare:  # one pass gives both the mean and each token's loss

        per_token = PerTokenEval(args, ckpt, spec, tokenizer, length)  # loads and checks --compare first
    with progress_bar(len(starts) * (2 if args.compare else 1), desc="eval", unit="window",
                      enabled=not args.no_progress) as bar:
        if per_token is not None:
            loss = per_token.run(model, corpus, np.asarray(starts), device, progress=bar.update)
        else:
            loss = evaluate(model, corpus, np.asarray(starts), length, micro_batch=args.batch_size, device=device,
                            precision=args.precision, progress=bar.update)
    print(f"{ckpt} on {what}: {len(starts):,} windows of {length - 1} tokens: {scope}")
    print(f"loss {loss:.4f} nats/token, perplexity {math.exp(min(loss, 50)):.3f}")
    if per_token is not None:
        per_token.report()
    return 0


# -- prepare ------------------------------------------------------------------------------
def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a dataset name (python-docs, hf, ...) or text files / a glob ('data/*.txt')")
    p.add_argument("out", help="new output directory for the shards")
    p.add_argument("--tokenizer", default="gpt2", help="registered tokenizer (default gpt2)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="params of the source")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: one per CPU)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")


@command("prepare", "tokenize a text source into uint16 memory-mapped shards for training (dataset 'shards')")
@arguments(_prepare_args)
def _prepare(args) -> int:
    if args.workers < 0 or args.shard_tokens <= 0:
        raise MinigptError("--workers must be >= 0 and --shard-tokens > 0.")
    # The model section only has to admit the tokenizer's vocabulary; nothing is built.
    spec = parse_spec({"tokenizer": {"name": args.tokenizer}, "model": {"vocab_size": 1 << 30},
                       "data": {"source": source_slot(args.source, args.param)}})
    source = build_source(spec)
    if isinstance(source, TokenSource):
        raise MinigptError(f"{args.source} is already tokenized; `minigpt prepare` reads text sources.")
    tokenizer = text_tokenizer(spec, source)
    shards = write_shards(source.documents(), tokenizer, Path(args.out), shard_tokens=args.shard_tokens,
                          workers=args.workers, progress=True, source=source.describe())
    print(f"{shards.n_tokens:,} tokens of {shards.meta['documents']:,} documents in {len(shards.parts)} shard(s) "
          f"({shards.meta['dtype']}) under {args.out}, tokenizer {tokenizer.name}")
    print(f"train on them with: [data.source] name = \"shards\", params = {{ path = \"{args.out}\" }}")
    return 0
