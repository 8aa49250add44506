"""An exclusive lock on a file, held while a process lives and released by the system when it dies.

Standard library only (fcntl on POSIX, msvcrt on Windows): the output staging
folders and the feature cache entries use it to tell a live owner from a dead one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class FileLock:
    """An exclusive, non-blocking lock on `path` (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it (or removed the file meanwhile)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise FileNotFoundError(self.path)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self, remove: bool = False) -> None:
        """Give the lock up; `remove` deletes the lock file first (a waiter then locks a new file)."""
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):  # Windows keeps an open file
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_is_held(path: str | Path) -> bool:
    """True when a live process (this one included) holds the lock on `path`; False when the file is missing."""
    if not Path(path).exists():
        return False
    probe = FileLock(path)
    try:
        if probe.acquire():
            return False
    except OSError:
        return False
    finally:
        probe.release()
    return True
