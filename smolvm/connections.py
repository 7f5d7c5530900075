"""A sandbox handle's connections to its agent: a free port under its lock, kept between calls.

QEMU serves each of the agent's ports to one client at a time, so the host
takes any free one under a file lock per port (``agent-N.lock`` in the
sandbox directory). Connecting and synchronising costs about as much as a
small command, so a handle keeps its last connection and reuses it; once
idle for KEEP_IDLE seconds it lets the port go, so other processes (there
are PORTS of them) still get one. A connection that saw any error is not
kept: what is still on its wire is unknown.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import locks
from .agent_client import AgentConnection
from .exceptions import OperationTimeoutError

KEEP_IDLE = 2.0  # seconds an unused connection keeps its port
POLL = 0.05  # seconds between looks for a free port when all are busy


class Kept:
    """An open connection and the port lock it holds."""

    def __init__(self, conn: AgentConnection, lock: int, qemu_pid: int) -> None:
        self.conn, self.lock, self.qemu_pid = conn, lock, qemu_pid
        self.timer: threading.Timer | None = None

    def reusable(self, qemu_pid: int) -> bool:
        """Still the same machine, nothing left in flight, and nothing unasked for (late
        frames, a hang-up, an answer sent ahead for the next request) waiting on it."""
        if self.qemu_pid != qemu_pid or self.conn.broken or self.conn.decoder.buffered:
            return False
        try:
            return not select.select([self.conn.sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.conn.close()
        locks.unlock(self.lock)


class Connections:
    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.mutex = threading.Lock()
        self.kept: Kept | None = None
        ALL.add(self)

    def _forget_in_child(self) -> None:
        """After a fork, in the child: the copy of a kept connection's socket and port lock
        is closed (the parent's stay theirs), or the port would stay locked for the child's life."""
        kept, self.kept = self.kept, None
        self.mutex = threading.Lock()
        if kept is not None:
            for close in (kept.conn.sock.close, lambda: os.close(kept.lock)):
                try:
                    close()
                except OSError:
                    pass

    @contextmanager
    def port(self, sockets: tuple[Path, ...], wait: float) -> Iterator[Path]:
        """The socket of a free port, held until the block ends."""
        lock, sock = self._take_port(sockets, wait)
        try:
            yield sock
        finally:
            locks.unlock(lock)

    def _take_port(self, sockets: tuple[Path, ...], wait: float) -> tuple[int, Path]:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        order = random.sample(range(len(sockets)), len(sockets))
        deadline = time.monotonic() + wait
        while True:
            for i in order:
                lock = locks.try_lock(self.directory / f"agent-{i}.lock")
                if lock is not None:
                    return lock, sockets[i]
            # Every port is busy (long waits, shells): take the first one that frees up.
            if time.monotonic() >= deadline:
                raise OperationTimeoutError(
                    f"sandbox {self.name!r} is busy on all its {len(sockets)} connections: "
                    "try again when something finishes"
                )
            time.sleep(POLL)

    @contextmanager
    def connection(
        self, sockets: tuple[Path, ...], qemu_pid: int, timeout: float, wait: float
    ) -> Iterator[AgentConnection]:
        """A synchronised connection: the kept one if it is free and sound, else a new one.
        It is kept again afterwards if the block ended without an error."""
        kept = self._take(qemu_pid)
        if kept is None:
            lock, sock = self._take_port(sockets, wait)
            try:
                kept = Kept(AgentConnection.open(sock, timeout), lock, qemu_pid)
            except BaseException:
                locks.unlock(lock)
                raise
        try:
            yield kept.conn
        except BaseException:
            kept.close()
            raise
        self._keep(kept)

    def _take(self, qemu_pid: int) -> Kept | None:
        with self.mutex:
            kept, self.kept = self.kept, None
        if kept is None:
            return None
        if kept.timer is not None:
            kept.timer.cancel()
        if not kept.reusable(qemu_pid):
            kept.close()
            return None
        return kept

    def _keep(self, kept: Kept) -> None:
        with self.mutex:
            if self.kept is not None:  # another thread kept one meanwhile: one is enough
                kept.close()
                return
            self.kept = kept
            kept.timer = threading.Timer(KEEP_IDLE, self._expire, (kept,))
            kept.timer.daemon = True
            kept.timer.start()

    def _expire(self, kept: Kept) -> None:
        with self.mutex:
            if self.kept is not kept:
                return  # taken for use meanwhile
            self.kept = None
        kept.close()

    def release(self) -> None:
        """Let the kept connection and its port go now."""
        with self.mutex:
            kept, self.kept = self.kept, None
        if kept is not None:
            kept.close()


ALL: weakref.WeakSet[Connections] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connections in list(ALL):
        connections._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
