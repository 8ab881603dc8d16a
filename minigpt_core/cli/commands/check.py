"""``minigpt check [PATTERN]``: run the conformance checks and print one row per component."""

from __future__ import annotations

import fnmatch
import sys
import textwrap

from ...base.device import DeviceError, select_device
from ...base.loader import get_registry
from ...spec import apply_overrides
from ..parser import arguments, command

__all__ = ["format_row"]

_COLUMNS = ("kind", "component", "pass", "fail", "xfail", "skip", "result")
_WIDTHS = (11, 0, 4, 4, 5, 4, 0)  # 0: computed / free


def _args(p) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style component name pattern, e.g. 'torch.*'")
    p.add_argument("--kind", action="append", help="only this kind (repeatable): attention, norm, ...")
    p.add_argument("--check", dest="checks", action="append", metavar="NAME",
                   help="only this check (repeatable); `minigpt check --list` names them")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="a component param instead of its default, e.g. --param window=3 (repeatable)")
    p.add_argument("--device", default="cpu", help="device the components run on (cpu, cuda, ...)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list skipped checks and their reasons")
    p.add_argument("--list", action="store_true", help="list the checks and exit")


def format_row(kind: str, name: str, results, name_width: int) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "xfail", "skip", "xpass")}
    bad = [r.check for r in results if not r.ok]
    if bad:
        result = "FAILED: " + ", ".join(bad)
    elif counts["xfail"]:
        result = f"ok ({counts['xfail']} expected failure{'s' * (counts['xfail'] > 1)})"
    else:
        result = "ok"
    cells = [kind.ljust(_WIDTHS[0]), name.ljust(name_width), str(counts["pass"]).rjust(4),
             str(counts["fail"] + counts["xpass"]).rjust(4), str(counts["xfail"]).rjust(5),
             str(counts["skip"]).rjust(4), result]
    return "  ".join(cells)


@command("check", "run the conformance checks on registered components; prints a table, exit 1 on failure")
@arguments(_args)
def _check(args) -> int:
    from pydantic import ValidationError

    from ...base.progress import progress_bar
    from ...testing import CHECKS, ConformanceError, applicable_checks, run_checks, select_entries

    if args.list:
        for check in CHECKS.values():
            print(f"{check.name:20} {', '.join(sorted(check.kinds)):52} {check.description}")
        return 0

    try:  # one message for a device that is not there, not a failure per check
        device = str(select_device(args.device))
    except DeviceError as exc:
        raise DeviceError(str(exc).replace('use train.device = "auto" or "cpu"', "use --device cpu").replace(
            "train.device = ", "--device ")) from None
    registry = get_registry()
    entries = select_entries(registry, args.pattern, args.kind)
    if not entries:
        raise ConformanceError(
            f"No registered component matches {args.pattern!r}"
            f"{' among kinds ' + ', '.join(args.kind) if args.kind else ''}. Patterns are shell-style "
            f"wildcards over names, e.g. 'torch.*' or 'modern.rope'; `minigpt components` lists the names."
        )
    params = apply_overrides({}, args.params)
    for e in entries if params else []:
        try:
            e.make_params(params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in exc.errors())
            raise ConformanceError(
                f"--param {' '.join(args.params)} does not fit {e.kind} '{e.name}' ({problems}). "
                f"`minigpt components {e.kind} {e.name}` lists its params; narrow the pattern to the "
                f"components that take them."
            ) from None
    width = max(len(e.name) for e in entries)
    print("  ".join([_COLUMNS[0].ljust(_WIDTHS[0]), _COLUMNS[1].ljust(width), " pass", "fail", "xfail",
                     "skip", "result"]))
    total = sum(len(applicable_checks(e, args.checks)) for e in entries)
    # A component's checks take seconds (tens on a busy machine): the bar names the one running.
    with progress_bar(total, desc="checks", unit="check") as bar:

        def on_check(entry, name: str, result) -> None:
            if result is None:
                bar.set_description(f"{entry.name}: {name}", refresh=False)
            else:
                bar.update(1)

        def on_component(entry, rs) -> None:  # the row above the bar (tqdm clears it, writes, redraws)
            bar.write(format_row(entry.kind, entry.name, rs, width), file=sys.stdout)
            sys.stdout.flush()

        results = run_checks(registry, args.pattern, kinds=args.kind, checks=args.checks, device=device,
                             params=params, on_component=on_component, on_check=on_check)

    def section(title: str, statuses: tuple[str, ...]) -> None:
        chosen = [r for r in results if r.status in statuses]
        if chosen:
            print(f"\n{title}:")
            for r in chosen:
                print(textwrap.fill(f"{r.kind} {r.component} / {r.check}: {r.message}", 100,
                                    initial_indent="  ", subsequent_indent="      "))

    section("Failures", ("fail", "xpass"))
    section("Expected failures (declared by the component)", ("xfail",))
    if args.verbose:
        section("Skipped", ("skip",))
    absent = [u for u in registry.unavailable
              if (not args.kind or u.kind in args.kind) and fnmatch.fnmatchcase(u.name, args.pattern)]
    for u in absent:
        print(f"\nnot checked: {u.kind} {u.name} is unavailable here: {u.reason}")
    failed = sum(not r.ok for r in results)
    print(f"\n{len(entries)} components, {len(results)} checks: {sum(r.status == 'pass' for r in results)} passed, "
          f"{failed} failed, {sum(r.status == 'xfail' for r in results)} expected failures, "
          f"{sum(r.status == 'skip' for r in results)} skipped")
    return 1 if failed else 0
