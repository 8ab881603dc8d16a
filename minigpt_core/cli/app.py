"""The ``minigpt`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from typing import Callable

from ..base.errors import MinigptError, CheckpointError
from ..base.hookspecs import PROJECT_NAME
from ..base.loader import ENTRY_POINT_GROUP, PLUGINS_ENV_VAR, get_registry, load_local_plugins
from ..spec import ExperimentSpec, describe_components, load_spec, spec_warnings
from .parser import COMMAND_MODULES, COMMANDS, _print_table, arguments, command

__all__ = ["main", "COMMANDS", "load_command_module"]

def _plugins_args(p):
    p.add_argument("--trace", action="store_true",
                   help="also show each plugin's hook implementations and the components it registered")


def _hook_names(plugin) -> list[str] | None:
    """The minigpt hooks a loaded plugin implements, read from its module (None: not importable by name)."""
    import importlib
    import importlib.metadata as md

    import pluggy

    eps = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP, name=plugin.name) if ep.value == plugin.module]
    try:  # already imported by the loader: this only looks it up
        obj = eps[0].load() if eps else sys.modules.get(plugin.module) or importlib.import_module(plugin.module)
    except Exception:  # noqa: BLE001 - e.g. an object registered from a notebook
        return None
    pm = pluggy.PluginManager(PROJECT_NAME)
    return sorted(n for n in dir(obj) if n.startswith("minigpt_") and pm.parse_hookimpl_opts(obj, n) is not None)


def _print_trace(reg) -> None:
    for p in reg.plugins:
        hooks = _hook_names(p)
        origin = f"{p.distribution} {p.version}, " if p.distribution else ""
        print(f"\n{p.name}  ({origin}module {p.module})")
        print(f"  hooks: {', '.join(hooks) if hooks else '?' if hooks is None else 'none'}")
        entries = [e for e in reg.entries() if e.plugin == p.name]
        kinds = dict.fromkeys(e.kind for e in entries)
        for kind in kinds:
            print(textwrap.fill(", ".join(e.name for e in entries if e.kind == kind), 96,
                                initial_indent=f"  {kind}: ", subsequent_indent=" " * (len(kind) + 4)))
        for u in reg.unavailable:
            if u.plugin == p.name:
                print(f"  unavailable {u.kind}: {u.name} ({u.reason})")


@command("plugins", "list loaded plugins, their distributions, and plugins that failed to load")
@arguments(_plugins_args)
def _plugins(args) -> int:
    reg = get_registry()
    rows = [[p.name, p.distribution or "-", p.version or "-", str(p.components), p.module] for p in reg.plugins]
    _print_table(rows, ["plugin", "distribution", "version", "components", "module"])
    if getattr(args, "trace", False):
        _print_trace(reg)
    for f in reg.failures:
        print(f"\nFAILED: {f.message()}")
    if os.environ.get(PLUGINS_ENV_VAR) is not None:
        print(f"\n({PLUGINS_ENV_VAR}={os.environ[PLUGINS_ENV_VAR]!r} restricts loading)")
    return 0


# -- components ---------------------------------------------------------------------------
def _components_args(p):
    p.add_argument("kind", nargs="?", help="attention, norm, activation, feedforward, positional, block, init, ...")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'book.*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("components", "list registered components with description, params, capabilities and source plugin")
@arguments(_components_args)
def _components(args) -> int:
    import fnmatch

    reg = get_registry()
    entries = reg.entries(args.kind, args.pattern)
    absent = [u for u in reg.unavailable
              if args.kind in (None, u.kind) and fnmatch.fnmatchcase(u.name, args.pattern)]
    if args.json:
        print(json.dumps([{
            "kind": e.kind, "name": e.name, "description": e.description,
            "capabilities": sorted(e.capabilities), "plugin": e.plugin,
            "distribution": e.distribution, "version": e.version,
            "params": e.params.model_json_schema().get("properties", {}),
            "not_for_lm": e.not_for_lm, "not_compilable": e.not_compilable,
        } for e in entries], indent=2))
        return 0
    if not entries and not absent:
        print(f"no {args.kind or ''} components match {args.pattern!r}".replace("  ", " "))
    # Kind by kind, an unavailable component under its own kind (after the available ones).
    from ..base.contracts import KINDS

    shown = {e.kind for e in entries} | {u.kind for u in absent}
    for kind in (k for k in KINDS if k in shown):
        print(f"\n[{kind}]")
        for e in entries:
            if e.kind == kind:
                _print_entry(e)
        for u in absent:
            if u.kind == kind:
                print(f"  {u.name}  UNAVAILABLE")
                print(textwrap.fill(f"{u.reason} [plugin {u.plugin}]", 96, initial_indent="      ",
                                    subsequent_indent="      "))
    return 0


def _print_entry(e) -> None:
    print(f"  {e.name}")
    print(textwrap.fill(e.description, 96, initial_indent="      ", subsequent_indent="      "))
    caps = ", ".join(sorted(e.capabilities)) or "-"
    print(f"      capabilities: {caps}")
    props = e.params.model_json_schema().get("properties", {})
    if props:
        shown = ", ".join(f"{k}={v.get('default', '?')!r}" for k, v in props.items())
        print(f"      params: {shown}")
    if e.not_for_lm:
        print(f"      NOT FOR LANGUAGE MODELS: {e.not_for_lm.split(':')[0]}")
    if e.not_compilable:
        print(f"      NOT COMPILABLE (train.compile): {e.not_compilable}")
    print(f"      from: {e.source}")


# -- validate / summary / schema ----------------------------------------------------------
def _file_args(p, what: str = "experiment TOML file"):
    p.add_argument("file", help=what)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set model.n_layers=4 (repeatable)")


@command("validate", "check an experiment file (structure, components, params) without building anything")
@arguments(_file_args)
def _validate(args) -> int:
    spec = load_spec(args.file, overrides=args.overrides)
    m = spec.model
    origin = ""
    if spec.init_from is not None:
        from ..pretrained import init_from_model

        m = init_from_model(spec)
        origin = f", shape from init_from {spec.init_from}"
    print(f"{args.file}: OK ({spec.name}: {m.n_layers} layers, emb {m.emb_dim}, {m.n_heads} heads, "
          f"vocab {m.vocab_size}, context {m.context_length}{origin}; {describe_components(m)})")
    for w in spec_warnings(spec):
        print(f"warning: {w}", file=sys.stderr)
    return 0



def _summary_args(p):
    _file_args(p, "experiment TOML file, or a checkpoint directory (its spec.toml)")


@command("summary", "per-component and total parameter counts and training FLOPs per token")
@arguments(_summary_args)
def _summary(args) -> int:
    from pathlib import Path

    from ..assembly import summarize_spec
    from ..checkpoints.checkpoint import SPEC_FILE

    path = Path(args.file)
    if path.is_dir():  # a checkpoint directory: its resolved spec describes the model
        if not (path / SPEC_FILE).is_file():
            raise CheckpointError(f"{path} is a directory without {SPEC_FILE}; it is not a minigpt checkpoint.")
        path = path / SPEC_FILE
    spec = load_spec(path, overrides=args.overrides)
    print(f"{spec.name} ({args.file})")
    print(summarize_spec(spec).format())
    from ..finetune import finetune_active
    from ..assembly import count_trainable

    if finetune_active(spec):  # a fine-tuning spec: what its [finetune] section leaves trainable
        print(f"fine-tuning {count_trainable(spec).describe()}")
    return 0


def _schema_args(p):
    p.add_argument("--ablation", action="store_true", help="the schema of ablation files instead")


@command("schema", "print the JSON schema of experiment files (--ablation: of ablation files)")
@arguments(_schema_args)
def _schema(args) -> int:
    if getattr(args, "ablation", False):
        from ..ablation import AblationFile

        print(json.dumps(AblationFile.model_json_schema(), indent=2))
        return 0
    print(json.dumps(ExperimentSpec.model_json_schema(), indent=2))
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``argv``, only the module of the command it names is
    imported, and the other commands are listed (name and help) without their options."""
    _load_command_modules(argv)
    parser = argparse.ArgumentParser(
        prog="minigpt",
        description="Assemble GPT-style language models from plugin components, train and inspect them.",
        epilog="Run `minigpt COMMAND --help` for a command's options.",
    )
    _plugin_option(parser, "plugins_before")
    common = argparse.ArgumentParser(add_help=False)
    _plugin_option(common, "plugins_after")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [*(n for n in COMMANDS if n not in COMMAND_MODULES), *COMMAND_MODULES]:
        if name in COMMANDS:
            help_, add_args, _ = COMMANDS[name]
        else:  # not loaded: argv names another command
            help_, add_args = COMMAND_MODULES[name][0], None
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        if add_args is not None:
            add_args(p)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The command argv names: its first word that is neither an option nor --plugin's value
    ("" when that word is not a command, e.g. an abbreviated --plugin took the next word as value)."""
    words = iter(argv)
    for word in words:
        if word == "--plugin":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS or word in COMMAND_MODULES else ""
    return None


def _plugin_option(parser: argparse.ArgumentParser, dest: str) -> None:
    # Accepted before and after the command; separate dests because a subcommand's defaults
    # would overwrite what was given before it.
    parser.add_argument("--plugin", dest=dest, action="append", default=argparse.SUPPRESS,
                        metavar="PATH_OR_MODULE",
                        help="also load this plugin: a .py file or an importable module (repeatable; "
                             "more in MINIGPT_PLUGIN_PATH, separated by os.pathsep)")


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an option the subcommand does not know is reported with the subcommand's
    usage (argparse leaves unknown options to the top-level parser, whose usage lists only the commands)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        owner = subparsers.choices.get(args.command) if subparsers and args.command else None
        (owner or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _load_requested_plugins(args: argparse.Namespace) -> None:
    """--plugin: loaded before the command runs (a broken one is an error), and put in
    MINIGPT_PLUGIN_PATH for the processes the command starts."""
    refs = [*getattr(args, "plugins_before", []), *getattr(args, "plugins_after", [])]
    if refs:
        load_local_plugins(refs, where="--plugin")


def load_command_module(argv: list[str]) -> None:
    """Import the module of the command ``argv`` names (torch with most of them), ahead of ``main``: the
    console script does it while it only notes Ctrl-C, since a KeyboardInterrupt raised inside a C
    extension's import can be swallowed by the library it interrupts (the run then went on, exit 0)."""
    _load_command_modules(argv)


def _load_command_modules(argv: list[str] | None) -> None:
    """Import the module of the command argv names: none for app's own commands and for no command
    (`minigpt --help`), every module for a word that is not a command, or when there is no argv.

    Imported by name (importlib), so that a command pays only for what its own module imports."""
    import importlib

    name = "" if argv is None else _command_named(argv)
    if name is None or name in COMMANDS:
        modules = []
    elif name in COMMAND_MODULES:
        modules = [COMMAND_MODULES[name][1]]
    else:
        modules = list(dict.fromkeys(m for _, m in COMMAND_MODULES.values()))
    for module in modules:
        importlib.import_module(f"{__package__}.commands.{module}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _interrupted() -> int:
    import signal

    try:  # a second Ctrl-C while we report the first must not end in a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    print("interrupted", file=sys.stderr)
    return 130


def _broken_pipe() -> int:
    # `minigpt schema | head`: the reader left. Point stdout at /dev/null so the flush at exit stays quiet.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a program the pipe ended


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser(argv)
        args = _parse_args(parser, argv)
        if not args.command:
            parser.print_help()
            return 2
        warnings.showwarning = _show_warning
        try:
            _load_requested_plugins(args)
            status = COMMANDS[args.command][2](args) or 0
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return status
        except MinigptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:
        return _broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
