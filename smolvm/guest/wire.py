"""The agent's side of the wire: its ports, the frames it sends, the input it takes.

Standard library only, like every module here: the image build copies them
to /opt/smolvm, beside protocol.py. ``Wire`` is the base of every room of the
agent (commands, terminals, processes, files): it knows where the request
being served came from and answers there, unless that host has gone.
"""

from __future__ import annotations

import os
import select
import threading

import protocol as P

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any


BATCH_BYTES = P.MAX_PAYLOAD // 2  # bytes of names one batch of entries or events may take, at most


def weight(item: dict[str, Any]) -> int:
    """At most how many bytes an entry or event takes as JSON: a character of a name may
    take six, and its name is no longer than its path."""
    return 160 + 6 * (2 * len(item["path"]) + len(item.get("target") or item.get("old_path") or ""))


def read_available(fd: int) -> bytes | None:
    """What a non-blocking pipe or terminal has now: b"" if nothing yet, None at its end."""
    try:
        return os.read(fd, P.CHUNK) or None
    except BlockingIOError:
        return b""
    except OSError:  # EIO: a terminal whose other side is closed
        return None


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Port:
    """One virtio-serial port: one host connection at a time, and what it asked for."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self.fd = fd
        self.wlock = threading.Lock()
        self.nonce: str | None = None  # the connected host's, from its sync
        self.decoder = P.Decoder()
        self.cancels: dict[int, threading.Event] = {}
        self.uploads: dict[int, dict[str, Any]] = {}
        self.taken: dict[int, threading.Event] = {}  # downloads waiting for the host to empty the window
        self.inputs: dict[int, Input] = {}  # stdin of a command, or the keyboard of a terminal
        self.terminals: dict[int, int] = {}  # pty request id -> its master fd


class Input:
    """Bytes the host sends to a command's stdin or a terminal.

    The port's reader queues them and never blocks; a thread of their own
    writes them and gives the host credit for what it wrote, so the host
    never has more than STDIN_WINDOW bytes in flight. An empty chunk is the
    end of input.
    """

    def __init__(self, agent: Wire, port: Port, conn: str | None, rid: int) -> None:
        self.agent, self.port, self.conn, self.rid = agent, port, conn, rid
        self.cond = threading.Condition()
        self.chunks: list[bytes] = []
        self.queued = 0
        self.stopped = False
        self.thread: threading.Thread | None = None

    def feed(self, data: bytes) -> None:
        with self.cond:
            if self.queued + len(data) > P.STDIN_WINDOW:
                raise P.ProtocolError("input sent beyond the credit the agent gave")
            self.chunks.append(data)
            self.queued += len(data)
            self.cond.notify()

    def start(self, fd: int, owned: bool) -> None:
        """Write to ``fd``; ``owned``: close it at the end of input (a pipe), else leave it (a terminal)."""
        self.thread = threading.Thread(target=self._run, args=(fd, owned), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(5)

    def _run(self, fd: int, owned: bool) -> None:
        self.agent.local.port, self.agent.local.conn = self.port, self.conn
        os.set_blocking(fd, False)
        closed = False  # we closed it (a pipe at the end of input)
        writable = True  # its reader is still there
        try:
            while True:
                with self.cond:
                    while not self.chunks and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                    chunk = self.chunks.pop(0)
                if not chunk:  # the end of input
                    if owned and not closed:
                        os.close(fd)
                        closed = True
                    elif not owned:
                        self._hang_up_keys(fd)
                    continue
                if writable and not closed:
                    writable = self._write(fd, chunk)  # a reader that went away: the rest is dropped
                with self.cond:
                    self.queued -= len(chunk)
                self.agent.reply({"op": "credit", "id": self.rid, "bytes": len(chunk)})
        finally:
            if owned and not closed:
                os.close(fd)

    def _hang_up_keys(self, fd: int) -> None:
        """No more keys will come to this terminal: Ctrl-D, again every half second
        until the session ends (one typed while the terminal is still in canonical
        mode, before the shell's line editor runs, is lost)."""
        while self._write(fd, b"\x04"):
            with self.cond:
                if self.cond.wait_for(lambda: self.stopped, 0.5):
                    return

    def _write(self, fd: int, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [], 0.2)
                if self.stopped:
                    return False
            except OSError:
                return False
        return True


class Wire:
    """Answers go back on the port the current request came on (``local``, per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()  # .port, .conn: where a thread's request came from

    # -- output ---------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Write one frame to the port the current request came on, unless its host has gone."""
        port: Port = self.local.port
        conn = self.local.conn
        view = memoryview(frame)
        with port.wlock:
            while view:
                if conn != port.nonce:
                    return  # the host is another now, or none: drop the rest, it resynchronises
                try:
                    n = os.write(port.fd, view)  # virtio-serial writes may be partial
                except BlockingIOError:
                    # Full, or no host at all (POLLHUP): a host that left reads nothing
                    # more, and the reader thread must not wait for it.
                    poller = select.poll()
                    poller.register(port.fd, select.POLLOUT)
                    if any(events & select.POLLHUP for _, events in poller.poll(500)):
                        return
                    continue
                view = view[n:]

    def reply(self, msg: dict[str, Any]) -> None:
        self.send(P.encode_msg(msg))

    def error(self, rid: int, code: str, message: str) -> None:
        self.reply({"op": "error", "id": rid, "code": code, "message": message[:2000]})

    def _cancel_event(self, rid: int) -> threading.Event:
        """Set when the host cancels ``rid`` or goes away."""
        port: Port = self.local.port
        cancel = threading.Event()
        port.cancels[rid] = cancel
        if self.local.conn != port.nonce:  # its host went away before we registered
            cancel.set()
        return cancel
