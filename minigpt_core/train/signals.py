"""Ctrl-C and SIGTERM stop a run cleanly: the loop ends after the current step and saves a checkpoint.
A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["CaughtSignals", "StopRequest"]


class CaughtSignals:
    """SIGINT and SIGTERM go to ``self._handle`` between ``install()`` and ``uninstall()`` (which puts the
    previous handlers back); subclasses say what a signal means."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopRequest(CaughtSignals):
    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
