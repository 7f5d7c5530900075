"""File locks between threads and processes: ``flock`` on a file opened afresh each time.

A lock file may be removed by the one holding it (deleting a sandbox takes
its lifecycle lock with it), so whoever then gets the lock on the removed
file has got nothing: a lock counts only while the path still names the
file that was locked, and is otherwise taken again from the path.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

POLL = 0.02  # seconds between tries while a lock is held elsewhere


def try_lock(path: Path, read_only: bool = False) -> int | None:
    """The lock at ``path`` if it is free now: a descriptor to give to ``unlock``; else None.
    ``read_only``: for a descriptor handed to a process that must not write the file."""
    access = os.O_RDONLY if read_only else os.O_RDWR
    while True:
        fd = os.open(path, access | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed (and perhaps made anew) by its last holder: try the path again


def lock(path: Path, wait: float) -> int:
    """The lock at ``path``, waiting up to ``wait`` seconds; TimeoutError if it stays held."""
    deadline = time.monotonic() + wait
    while (fd := try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} is locked")
        time.sleep(POLL)
    return fd


def unlock(fd: int) -> None:
    os.close(fd)
