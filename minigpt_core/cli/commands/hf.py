"""``minigpt import-hf`` and ``minigpt export-hf``: GPT-2 weights to and from Hugging Face."""

from __future__ import annotations

from pathlib import Path

from ...base.errors import CheckpointError
from ...checkpoints.checkpoint import read_meta, save_model
from ...checkpoints.state import pick_checkpoint
from ...spec import BOOK_COMPONENTS, ExperimentSpec
from ..parser import arguments, command

__all__ = ["import_hf_command", "export_hf_command"]


def _fresh_output(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not an empty directory; it is left untouched. Choose a new "
            f"output directory (or remove this one yourself)."
        )
    return out


def _import_args(p):
    p.add_argument("source", help="Hugging Face GPT-2 directory (config.json + model.safetensors or "
                                  "pytorch_model.bin), or a hub id such as gpt2 / gpt2-medium (needs network)")
    p.add_argument("out", help="new minigpt checkpoint directory")
    p.add_argument("--attention", default=None,
                   help="any attention with the gpt2 capability (default torch.sdpa; book.multihead with --book)")
    p.add_argument("--book", action="store_true",
                   help="the book's classes (book.multihead, book.layernorm, book.gelu) instead of the same "
                        "function on PyTorch's fused kernels (torch.sdpa, torch.layernorm, torch.gelu_tanh)")
    p.add_argument("--name", default=None, help="run name stored in the spec (default: the source's name)")


@command("import-hf", "convert a Hugging Face GPT-2 checkpoint into a minigpt checkpoint directory")
@arguments(_import_args)
def import_hf_command(args) -> int:
    from ...pretrained import import_hf

    out = _fresh_output(args.out)
    name = args.name or Path(args.source.rstrip("/")).name or "gpt2-import"
    model, spec = import_hf(args.source, base=ExperimentSpec(name=name),
                            attention={"name": args.attention} if args.attention else None,
                            components=BOOK_COMPONENTS if args.book else None)
    save_model(model, spec, out, meta={"imported_from": args.source})
    m = spec.model
    print(f"imported {args.source} -> {out} ({m.n_layers} layers, emb {m.emb_dim}, {m.n_heads} heads, "
          f"vocab {m.vocab_size}, context {m.context_length}, attention {m.attention.name})")
    return 0


def _export_args(p):
    p.add_argument("checkpoint", help="minigpt checkpoint directory, or a run / experiment directory "
                                      "(its best checkpoint, else its latest)")
    p.add_argument("out", help="new directory for transformers' GPT2LMHeadModel.from_pretrained")


@command("export-hf", "write a GPT-2 compatible minigpt checkpoint as a Hugging Face GPT-2 directory")
@arguments(_export_args)
def export_hf_command(args) -> int:
    from ...assembly import load_model
    from ...pretrained import export_hf

    out = _fresh_output(args.out)
    ckpt, which = pick_checkpoint(args.checkpoint)
    print(f"checkpoint: {ckpt} ({which})", flush=True)
    model, spec = load_model(ckpt)
    from ...tasks import require_lm

    require_lm(spec, ckpt, "a Hugging Face GPT-2 export")
    export_hf(model, spec, out, tokenizer_state=read_meta(ckpt).get("tokenizer"))
    print(f"exported {ckpt} -> {out} (load with transformers.GPT2LMHeadModel.from_pretrained)")
    return 0
