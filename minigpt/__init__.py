"""``python -m minigpt`` (and ``torchrun -m minigpt``) runs the minigpt CLI; the library is minigpt_core."""


def main() -> int:
    """The ``minigpt`` console script: imports the CLI (and torch) itself, so Ctrl-C while they load
    ends with one line instead of an import traceback."""
    import sys

    try:
        from minigpt_core.cli import _interrupted, main as cli_main
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # between main's own handlers
        return _interrupted()
