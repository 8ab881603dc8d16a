"""What a run prints: the terminal (above the progress bar) and the run's console.log.

Lines written before the run directory's console.log is open are kept and written when it opens;
only rank 0 prints or keeps anything. console.log is a convenience: if it cannot be written the
run goes on (metrics.jsonl has the numbers).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import IO, Callable

from tqdm.auto import tqdm

from ..base.disk import DiskFullError
from ..base.progress import stderr_is_terminal
from ..base.errors import MinigptError

__all__ = ["CONSOLE_FILE", "Console", "append_console", "failure_message"]

CONSOLE_FILE = "console.log"  # what the run printed (every session appends), without the progress bar


def append_console(run_dir: str | Path, text: str) -> None:
    """Add lines to the run's console.log (best effort: the terminal and metrics.jsonl have them too)."""
    with contextlib.suppress(OSError), open(Path(run_dir) / CONSOLE_FILE, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def failure_message(exc: BaseException) -> str | None:
    """What a failed run records of ``exc`` (metrics.jsonl, console.log); None for a full disk, where a
    line cut short would spoil the next one."""
    if isinstance(exc, DiskFullError):
        return None
    return str(exc) if isinstance(exc, MinigptError) else f"{type(exc).__name__}: {exc}"


class Console:
    """``write(text)``: print a line (through ``out`` if given) and keep it in console.log."""

    def __init__(self, out: Callable[[str], None] | None, is_main: bool, progress_bar: bool = True):
        self._is_main = is_main
        self._show_bar = progress_bar and is_main
        self._out = out or self._print
        self._log: list[str] | IO[str] | None = []  # lines kept until open() opens RUN/console.log
        self._bar: tqdm | None = None

    def write(self, text: str) -> None:
        self._out(text)
        if self._is_main:
            self._keep(text)

    def _print(self, text: str) -> None:
        if not self._is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _keep(self, text: str) -> None:
        if isinstance(self._log, list):
            self._log.append(text)
        elif self._log is not None:
            try:
                self._log.write(text + "\n")
                self._log.flush()
            except OSError as exc:  # the log is a convenience: training goes on (metrics.jsonl has the numbers)
                self.close()
                self._out(f"warning: {CONSOLE_FILE} is no longer written ({exc})")

    def open(self, run_dir: Path) -> None:
        lines, self._log = self._log, None
        try:
            self._log = open(run_dir / CONSOLE_FILE, "a", encoding="utf-8")
        except OSError as exc:
            self._out(f"warning: {run_dir / CONSOLE_FILE} cannot be written ({exc}); the console output "
                      f"is not saved")
            return
        for line in lines:
            self._keep(line)

    def close(self) -> None:
        log, self._log = self._log, None
        if log is not None and not isinstance(log, list):
            with contextlib.suppress(OSError):
                log.close()

    def keep(self, text: str) -> None:
        """A line for console.log only (not printed)."""
        self._keep(text)

    # -- the progress bar -----------------------------------------------------------------------------
    @property
    def shows_bar(self) -> bool:
        """Whether this process draws progress bars (rank 0, unless --no-progress)."""
        return self._show_bar

    def open_bar(self, total: int, initial: int) -> tqdm:
        # Only on a terminal: in a log file or a pipe it is a wall of carriage returns (the lines say it all).
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=not (self._show_bar and stderr_is_terminal()), file=sys.stderr, mininterval=1.0)
        return self._bar

    def postfix(self, **values: str) -> None:
        self._bar.set_postfix(**values, refresh=False)

    def close_bar(self) -> None:
        self._bar.close()
        self._bar = None
