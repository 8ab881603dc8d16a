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
    _signal_ready()
    try:
        try:
            from minigpt_core.cli.app import load_command_module
            from minigpt_core.cli.app import main as cli_main

            load_command_module(sys.argv[1:])  # the heavy imports, still under the noting handler
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, signal.SIG_IGN if pressed else previous)
        if pressed:
            print("interrupted", file=sys.stderr)
            return 130
        status = cli_main()
        _skip_final_collections()
        return status
    except KeyboardInterrupt:  # between our handlers: once Python's own handler is back, before main's
        if previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
        print("interrupted", file=sys.stderr)
        return 130


def _skip_final_collections() -> None:
    """The process ends next. Its shutdown would run the garbage collector over every object the
    command made and every module it imported: after `minigpt check` about 4,000 modules (torch.compile's,
    PEFT's, torchao's, transformers') and half a million objects, 1.6 s of CPU on an idle machine and
    8-12 s after the last line on a busy one. Frozen objects are left out of those collections; the
    operating system takes the memory back anyway."""
    import gc

    gc.freeze()


READY_FD_ENV_VAR = "MINIGPT_TEST_READY_FD"


def _signal_ready() -> None:
    """Test hook: with MINIGPT_TEST_READY_FD=N (an inherited pipe), write "ready" to fd N once Ctrl-C
    is ours to handle, then close it. A test can then interrupt start-up without racing the
    interpreter's own start (before our handler, Ctrl-C is Python's business, not ours)."""
    import os

    fd = os.environ.pop(READY_FD_ENV_VAR, None)  # popped: the processes this one starts must not write
    if not fd:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):  # not an open fd: the hook is for tests, never a reason to fail
        pass
