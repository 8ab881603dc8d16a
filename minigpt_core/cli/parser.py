"""The command table: ``@command`` adds a subcommand, ``@arguments`` its options (cli.app builds the parser)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["COMMANDS", "command", "arguments"]

# name -> (help, add_arguments, run). Later modules add their commands here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


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
