"""``minigpt classify``: a fine-tuned classifier's class and probabilities for new texts."""

from __future__ import annotations

import sys

from ...base.errors import MinigptError
from ...checkpoints.checkpoint import read_meta
from ...checkpoints.state import pick_checkpoint
from ...model.tokenizers import tokenizer_from_state
from ..parser import arguments, command

__all__ = ["classify_texts", "classify_command"]


def _classify_args(p):
    p.add_argument("checkpoint", help="a classification run or checkpoint directory (a run: its best "
                                      "checkpoint, else its latest)")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--file", help="a UTF-8 file with one text per line ('-': standard input)")


def classify_texts(model, spec, tokenizer, texts: list[str]) -> list[list[float]]:
    """Class probabilities of each text, in ``spec.classification.classes`` order, read as training read them."""
    import torch

    from ...tasks import get_task
    from ...tasks.classification import encode_for_classification

    cs = spec.classification
    pad_id = cs.pad_id if cs.pad_id is not None else (tokenizer.eot_id if tokenizer.eot_id is not None else 0)
    task = get_task(spec)
    rows = torch.from_numpy(encode_for_classification(tokenizer, texts, cs.max_length, pad_id))
    model.eval()
    with torch.no_grad():
        logits = task.pooled(model(task.inputs(rows)), rows)
    return torch.softmax(logits, -1).tolist()


@command("classify", "print a fine-tuned classifier's class and class probabilities for texts")
@arguments(_classify_args)
def classify_command(args) -> int:
    from ...assembly import load_model

    texts = list(args.text)
    if args.file:
        try:
            source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
            with source:
                texts += [line.rstrip("\n") for line in source if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise MinigptError(f"cannot read --file {args.file}: {exc}") from None
    if not texts:
        raise MinigptError("Nothing to classify: give --text \"...\" (repeatable) or --file FILE (one text a line).")
    ckpt, which = pick_checkpoint(args.checkpoint)
    model, spec = load_model(ckpt)
    if spec.task != "classification":
        raise MinigptError(f"{ckpt} is a language model (task {spec.task!r}), not a classifier; `minigpt "
                           f"classify` needs a run trained with task = \"classification\" (docs/finetune.md). "
                           f"Use `minigpt sample` for a language model.")
    tokenizer = tokenizer_from_state(read_meta(ckpt)["tokenizer"], spec.registry)
    classes = spec.classification.classes
    print(f"checkpoint {ckpt} ({which}); classes {classes}", file=sys.stderr)
    for text, probs in zip(texts, classify_texts(model, spec, tokenizer, texts)):
        best = max(range(len(classes)), key=probs.__getitem__)
        shown = ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, probs))
        print(f"{classes[best]}\t{shown}\t{text if len(text) <= 60 else text[:57] + '...'}")
    return 0
