"""``python -m minigpt`` (and ``torchrun -m minigpt``) runs the minigpt CLI; the library is minigpt_core."""


def main() -> int:
    """The ``minigpt`` console script: imports the CLI (and torch) itself, so Ctrl-C while they load
    ends with one line instead of an import traceback."""
    import signal
    import sys

    # A KeyboardInterrupt raised inside a C extension's import (numpy under torch) leaves it half
    # loaded, and libraries that guard optional imports may then swallow what follows: so Ctrl-C is
    # only noted while the CLI loads, and acted on once it has.
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous = None
    try:
        from minigpt_core.cli.app import _interrupted, main as cli_main
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN if pressed else previous)
    if pressed:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # between main's own handlers
        return _interrupted()
