"""File locks between threads and processes, including a lock file its holder removes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from smolvm import locks


def test_a_held_lock_is_not_free(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    fd = locks.try_lock(path)
    assert fd is not None
    assert locks.try_lock(path) is None  # a fresh open file, so another thread is excluded too
    locks.unlock(fd)
    again = locks.try_lock(path)
    assert again is not None
    locks.unlock(again)


def test_a_wait_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    fd = locks.lock(path, 1)
    try:
        with pytest.raises(TimeoutError):
            locks.lock(path, 0.1)
    finally:
        locks.unlock(fd)


def test_a_lock_on_a_file_its_holder_removed_is_taken_again(tmp_path: Path) -> None:
    """What deleting a sandbox does to its lifecycle lock: whoever waited gets a lock
    that still means something, on the file the path names now."""
    path = tmp_path / "x.lock"
    held = locks.lock(path, 1)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(locks.lock(path, 10)))
    waiter.start()
    path.unlink()
    locks.unlock(held)
    waiter.join(10)
    assert got, "the waiter never got the lock"
    assert os.fstat(got[0]).st_ino == path.stat().st_ino
    assert locks.try_lock(path) is None  # and it excludes others
    locks.unlock(got[0])
