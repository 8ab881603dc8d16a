"""The command table: ``@command`` adds a subcommand, ``@arguments`` its options (cli.app builds the parser).

``COMMAND_MODULES`` lists the commands of ``cli/commands/`` by name, with their one-line help and
the module that implements them, so that ``minigpt --help`` lists every command and a command
imports only its own module: ``minigpt runs`` never imports torch (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["COMMANDS", "COMMAND_MODULES", "command", "arguments"]

# name -> (help, add_arguments, run). Later modules add their commands here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

# name -> (help, module under minigpt_core.cli.commands), in the order `minigpt --help` lists them.
# The help must be the module's @command help (tests/test_startup.py compares them).
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "import-hf": ("convert a Hugging Face GPT-2 checkpoint into a minigpt checkpoint directory", "hf"),
    "export-hf": ("write a GPT-2 compatible minigpt checkpoint as a Hugging Face GPT-2 directory", "hf"),
    "check": ("run the conformance checks on registered components; prints a table, exit 1 on failure", "check"),
    "attention": ("attention maps of a text: a PNG grid of every head per layer and an offline HTML page",
                  "inspection"),
    "train": ("train the experiment's model, with checkpoints and W&B / JSONL logging (torchrun for several "
              "processes)", "train"),
    "sample": ("generate text from a checkpoint", "train"),
    "eval": ("validation loss and perplexity of a checkpoint (on its run's validation split or other data)", "train"),
    "prepare": ("tokenize a text source into uint16 memory-mapped shards for training (dataset 'shards')", "train"),
    "new-plugin": ("write a new plugin package: pyproject entry point, an example component, tests, CI",
                   "new_plugin"),
    "ablate": ("run an ablation: variants x seeds as ordinary runs, resumable, with a report at the end", "ablate"),
    "report": ("rebuild an ablation's results.csv, report.md and figures from its runs (partial ablations too)",
               "ablate"),
    "plot": ("plot train/validation loss, learning rate and tokens/s of one or more runs into a PNG", "ablate"),
    "runs": ("list runs and ablations: status, steps, validation loss, and the spec fields that differ", "runs"),
    "diff": ("the spec fields that differ between two runs, and their metrics side by side", "runs"),
    "classify": ("print a fine-tuned classifier's class and class probabilities for texts", "classify"),
    "quantize": ("write an int8 copy of a checkpoint for CPU inference (sample and eval load it)", "quantize"),
    "evaluate": ("score a checkpoint on downstream tasks with EleutherAI's lm-evaluation-harness (RUN/eval/)",
                 "evaluate"),
}


def command(name: str, help: str):
    def wrap(fn):
        def add_args(p):  # default: no arguments
            return None
        COMMANDS[name] = (help, getattr(fn, "_add_args", add_args), fn)
        return fn
    return wrap


def arguments(add_args):
    def wrap(fn):
        fn._add_args = add_args
        return fn
    return wrap


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- plugins ------------------------------------------------------------------------------
