"""Lifetimes: a sandbox that ends itself, with no Python process of the user's left.

``SmolVM(timeout=..., idle_timeout=...)`` writes the sandbox's ``lifetime.json``
at each start, and leaves behind this small watchdog: a detached process that
sleeps, reads that file again, and deletes the sandbox when its deadline has
passed or it has not been used for ``idle`` seconds. A call holds ``in-use``
shared while it talks to the sandbox and touches it on the way in and out, so a
long command is use. ``set_timeout`` rewrites the deadline; the watchdog sees it
within a poll. It ends when the sandbox is gone.

Run by path (``python watchdog.py DIR ID``), not as ``-m smolvm.watchdog``: only
the standard library is loaded until the sandbox is to be deleted, which keeps
the process small (about 10 MB).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LIFETIME = "lifetime.json"
IN_USE = "in-use"  # held shared during a call, touched at its start and end
PIDFILE = "watchdog.pid"
POLL = 2.0  # seconds at most between looks at the lifetime file
MAX_LIFETIME = 30 * 24 * 3600.0


@dataclass(frozen=True)
class Lifetime:
    deadline: float | None = None  # seconds since the epoch
    idle: float | None = None  # seconds without a call

    def due(self, last_used: float) -> float | None:
        """When the sandbox is to go, by the host's clock; None for never."""
        times = [t for t in (self.deadline, None if self.idle is None else last_used + self.idle) if t is not None]
        return min(times) if times else None


def check_seconds(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_LIFETIME:
        raise ValueError(f"{what} must be a number of seconds above 0 and at most {MAX_LIFETIME:.0f}, not {value!r}")
    return float(value)


def read(directory: Path) -> Lifetime:
    """The lifetime written for the sandbox; one that cannot be read is none (the
    file is the host's own, in a 0700 directory, but a torn write must not kill)."""
    try:
        with open(directory / LIFETIME, "rb") as f:
            raw = json.loads(f.read(4096))
        deadline, idle = raw.get("deadline"), raw.get("idle")
        ok = all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in (deadline, idle))
        return Lifetime(deadline, idle) if ok else Lifetime()
    except (OSError, ValueError, AttributeError):
        return Lifetime()


def write(directory: Path, lifetime: Lifetime) -> None:
    tmp = directory / (LIFETIME + ".tmp")
    tmp.write_text(json.dumps({"deadline": lifetime.deadline, "idle": lifetime.idle}))
    os.replace(tmp, directory / LIFETIME)


@contextlib.contextmanager
def in_use(directory: Path) -> Iterator[None]:
    """Marks a call to the sandbox: the watchdog never ends a sandbox that is busy."""
    try:
        fd = os.open(directory / IN_USE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # the sandbox is being deleted: the call itself will say so
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(fd)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.utime(fd)
    finally:
        os.close(fd)


def idle_since(directory: Path) -> float | None:
    """When the last call ended; None while one runs."""
    path = directory / IN_USE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    else:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def running(directory: Path) -> bool:
    """Whether this sandbox's watchdog runs (its pid file names a live process of ours)."""
    try:
        pid = int((directory / PIDFILE).read_text(encoding="ascii")[:16])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return __file__.encode() in cmdline and str(directory).encode() in cmdline


def ensure(directory: Path, vm_id: str) -> None:
    """Leave a watchdog behind for the sandbox unless one runs. It detaches at once
    (its own session, no terminal), so it outlives this process and leaves no zombie."""
    if running(directory):
        return
    subprocess.run(
        [sys.executable, __file__, str(directory), vm_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        check=True,
        timeout=30,
    )


def watch(directory: Path, vm_id: str) -> None:
    while directory.is_dir():
        lifetime = read(directory)
        if lifetime.deadline is None and lifetime.idle is None:
            time.sleep(POLL)
            continue
        last = idle_since(directory)
        now = time.time()
        due = lifetime.due(now if last is None else last)  # a call under way is use now
        if due is not None and due <= now:
            end(vm_id)
            return
        time.sleep(POLL if due is None else min(POLL, max(0.05, due - now)))


def end(vm_id: str) -> None:
    from smolvm.exceptions import SmolVMError
    from smolvm.sandbox import SmolVM

    try:
        SmolVM.from_id(vm_id).delete()
    except SmolVMError:
        pass  # deleted meanwhile, or its data directory is gone


def main(argv: list[str]) -> None:
    directory, vm_id = Path(argv[1]), argv[2]
    if os.fork() != 0:
        os._exit(0)  # the caller waits for this one: the watchdog itself is init's child
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    pidfile = directory / PIDFILE
    tmp = directory / (PIDFILE + f".{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, pidfile)
    try:
        watch(directory, vm_id)
    finally:
        with contextlib.suppress(OSError):
            if pidfile.read_text() == str(os.getpid()):
                pidfile.unlink()


if __name__ == "__main__":
    main(sys.argv)
