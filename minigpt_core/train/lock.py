"""One process trains in a run directory at a time: an exclusive ``flock`` on ``RUN/.lock``.

Two processes in one run would prune each other's checkpoints and log the same steps twice.
The kernel drops an flock when its process exits, however it exits (SIGKILL included), so a
lock can only outlive its holder where the filesystem does not tell (a network filesystem
whose client machine crashed). The file keeps the holder's PID and host for the message; it is
left in place on release, because unlinking a locked file lets a third process lock a new one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from ..base.errors import MinigptError

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "lock_holder"]

LOCK_FILE = ".lock"


class RunLockedError(MinigptError):
    """Another process is training in the run directory."""


class RunLock:
    """``RunLock(run_dir).acquire()`` takes the lock or raises RunLockedError; ``release()`` drops it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not locked there
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == _TRIES - 1:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunLockedError(self._message(holder)) from None
                time.sleep(0.02)  # lock_holder() looks for an instant: not a trainer
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.now().isoformat(timespec="seconds")}).encode("utf-8"))
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:  # only for a run directory this process just made and leaves empty
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except OSError:
            pass

    def _message(self, holder: dict) -> str:
        run = self.path.parent
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = f", since {holder['started']}" if holder.get("started") else ""
        return (f"{run} is in use: process {pid} on host {host} is training in it{since}. Two processes in one "
                f"run would prune each other's checkpoints and log the same steps twice, so this one stops "
                f"without writing anything. Wait for that run to end, or stop it (kill -INT {pid} on {host} "
                f"saves a checkpoint) and resume then; to try something else without waiting, resume from one "
                f"of its earlier checkpoints (that starts a branch in a new run directory). The lock goes away "
                f"when its process exits, even if killed; only if host {host} crashed with this directory on a "
                f"shared filesystem can it stay: then delete {self.path}.")


_TRIES = 5


def lock_holder(run_dir: str | Path) -> dict | None:
    """The holder's details ({"pid", "host", "started"}, maybe empty) while a process holds the run's lock, else None.

    For ``minigpt runs``: it takes a shared lock for an instant (never creating the file), which a
    trainer starting at that moment waits out (acquire() tries again) instead of taking it for a
    trainer already in the run.
    """
    try:
        import fcntl
    except ImportError:  # Windows: runs are not locked, so none is known to be running
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no trainer ever held it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # the holder has not written its details yet
