"""Advisory lock files that keep two sweeps sharing a results folder from training one configuration
(or making one teacher) at the same time."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["ConfigLock"]


class ConfigLock:
    """An advisory lock file (``fcntl.flock``): held by the process that trains a configuration (or makes
    a teacher), so that two sweeps sharing an output folder never train the same thing at once.

    The kernel drops the lock when the holder exits or is killed (SIGKILL included), so a crash never
    leaves a stale lock. The file holds ``host pid`` of the holder, for messages. Works on local file
    systems and on NFS (Linux emulates ``flock`` with POSIX locks there).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _took(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free; returns whether this process holds it now."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._took(fd)
        return True

    def acquire(self) -> None:
        """Take the lock, waiting as long as another process holds it."""
        if self._fd is not None:
            return
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._took(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str:
        """``host pid N`` of the holder, as written in the lock file (best effort)."""
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def __enter__(self) -> "ConfigLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
