"""The host's side of the guest agent wire: one connection per operation.

The agent listens on PORTS virtio-serial ports; QEMU serves each as a unix
socket to one client at a time, so a connection is held for one operation
on one port, under that port's file lock. Everything the guest sends is
treated as hostile: frame sizes are bounded by the protocol, message fields
are type- and range-checked here, and the total the host accepts for any
one request is capped.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import secrets
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO, cast

from . import protocol as P
from .exceptions import (
    GuestError,
    GuestFileNotFoundError,
    HostError,
    OperationTimeoutError,
    OutputLimitError,
    ProcessNotFoundError,
    SmolVMError,
    ValidationError,
)
from .trees import MAX_TIME, member_parts

log = logging.getLogger("smolvm")
SYNC_RETRY = 2.0  # seconds to wait for SYNC_OK before padding out a half-sent frame
MAX_STALE = 64 << 20  # bytes of garbage, or of frames for other requests, we skip before giving up
MAX_IDLE_FRAMES = 4096  # frames of one request that carry nothing (empty, for another, unknown) before giving up
OUTPUT_LIMIT = (
    "the command wrote more than {} bytes of output and was stopped; "
    "redirect its output to a file in the sandbox and download that instead"
)
GRACE = 0.5  # seconds past a command's own timeout that the host waits for the guest to say it ended
MAX_OUTPUT = 128 << 20  # default cap on one command's stdout + stderr
CANCEL_POLL = 0.2  # seconds between looks at a command's cancel event
MAX_DOWNLOAD = 64 << 30
TRANSFER_WINDOW = 64 << 20  # the transfer disk's size: one window of a file at a time
MAX_APART_NAMES = 16 << 20  # bytes of names of the big files a downloaded tree sends apart from its stream


def create_transfer_disk(path: Path) -> None:
    """The sparse file a sandbox sees as its transfer disk: costs no space until used."""
    with open(path, "wb") as f:
        f.truncate(TRANSFER_WINDOW)


def copy_bytes(src_fd: int, dst_fd: int, count: int, src_offset: int, dst_offset: int | None) -> None:
    """Copy ``count`` bytes between files, in the kernel where it can (``dst_offset`` None: append)."""
    done = 0
    while done < count:
        dst = None if dst_offset is None else dst_offset + done
        try:
            n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # Across filesystems (tmpfs, another mount) the kernel will not: copy by hand.
            data = os.pread(src_fd, min(count - done, 1 << 20), src_offset + done)
            n = os.pwrite(dst_fd, data, dst) if dst is not None else os.write(dst_fd, data)
        if n == 0:
            raise GuestError("a file is shorter than announced")
        done += n


@contextmanager
def partial_file(local: Path, size: int, guest_path: str) -> Iterator[BinaryIO]:
    """A file to write a download of ``size`` bytes into, beside ``local``, once there is
    room for it. It becomes ``local`` only if the block ends with exactly ``size`` bytes
    written; otherwise it is removed and ``local`` is left as it was."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fs = os.statvfs(local.parent)
    if size > fs.f_bavail * fs.f_frsize:
        raise HostError(f"{guest_path} is {size} bytes, more than the free space at {local.parent}")
    tmp = local.parent / f".{local.name}.smolvm-part-{secrets.token_hex(4)}"
    try:
        st: os.stat_result | None = local.stat()
    except FileNotFoundError:
        st = None  # a new file gets what the umask allows, never the guest's mode bits
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValidationError(f"{local} is not a regular file: give a file name to write to")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if st is not None else 0o666)
        with open(fd, "wb") as f:
            if st is not None:
                os.fchmod(fd, st.st_mode & 0o777)
                try:
                    os.fchown(fd, -1, st.st_gid)  # and its group, where we may
                except OSError:
                    pass
            yield f
        got = tmp.stat().st_size
        if got != size:
            raise GuestError(f"{guest_path} arrived with {got} of {size} bytes")
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fill_window(f: BinaryIO, disk: BinaryIO, count: int) -> None:
    """Write the next ``count`` bytes of a reader without a file descriptor at the disk's start."""
    done = 0
    while done < count:
        data = f.read(min(count - done, P.TRANSFER_BLOCK))
        if not data:
            raise GuestError("a file is shorter than announced")
        os.pwrite(disk.fileno(), data, done)
        done += len(data)


def _name(f: BinaryIO) -> str:
    name = getattr(f, "name", None)
    return str(name) if isinstance(name, (str, Path)) else "the data"


def check_alive(alive: Callable[[], bool] | None) -> None:
    if alive is not None and not alive():
        raise HostError("the sandbox's QEMU process exited; 'smolvm sandbox logs NAME' may show why")


def message(frame: P.Frame) -> dict[str, Any]:
    """A frame's message; what is not a valid one is the guest's fault, and said so."""
    try:
        return frame.msg()
    except P.ProtocolError as exc:
        raise GuestError(f"the guest agent sent a malformed message: {exc}") from None


def guest_text(value: object, field: str, limit: int = 1 << 20) -> str:
    """A string the guest sent, checked: text that encodes (no lone surrogates), bounded."""
    if not isinstance(value, str) or len(value) > limit:
        raise GuestError(f"the guest agent sent a bad {field}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise GuestError(f"the guest agent sent a {field} that is not valid text") from None
    return value


def guest_number(value: object, field: str, low: float, high: float) -> float:
    """A number the guest sent, checked to be finite and within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GuestError(f"the guest agent sent a bad {field}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not low <= number <= high:  # also false for nan and the infinities
        raise GuestError(f"the guest agent sent a {field} out of range")
    return number


def clean(text: object, limit: int = 2000) -> str:
    """Guest text made safe to print: bounded, without control characters."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(text)[:limit])


class AgentConnection:
    """A synchronised connection to a running sandbox's agent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = P.Decoder()
        # Ids differ across connections too, so nothing late from an earlier
        # connection can pass for an answer on this one.
        self.next_id = secrets.randbelow(1 << 30) + 1
        self.guest_info: dict[str, Any] = {}
        self.send_lock = threading.Lock()  # a feeder thread sends input beside the caller
        self.idle_frames = 0  # of the request being read: see skip()
        self.cut_short: float | None = None  # an earlier deadline the request being read has come to
        self.broken = False  # something may still be in flight on it: not to be used again

    # -- set-up ---------------------------------------------------------
    @classmethod
    def open(
        cls, path: Path, timeout: float, *, booting: bool = False, alive: Callable[[], bool] | None = None
    ) -> AgentConnection:
        """Connect and synchronise. ``booting`` waits for the agent to come up at all;
        ``alive`` says whether the hypervisor still runs, so a dead one fails at once."""
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                check_alive(alive)
                if time.monotonic() >= deadline:
                    sock.close()
                    raise OperationTimeoutError(
                        "the sandbox's agent socket is not there: the sandbox is not running "
                        "('smolvm sandbox start NAME' starts it)"
                    ) from None
                time.sleep(0.01)
        conn = cls(sock)
        try:
            conn._sync(deadline, booting, alive)
        except BaseException:
            sock.close()
            raise
        return conn

    def _sync(self, deadline: float, booting: bool, alive: Callable[[], bool] | None) -> None:
        nonce = secrets.token_hex(8)
        hello = P.encode_msg({"op": "sync", "id": 0, "nonce": nonce, "version": P.VERSION})
        self._send(hello, deadline)
        retry_at = time.monotonic() + SYNC_RETRY
        while True:
            check_alive(alive)
            now = time.monotonic()
            if now >= deadline:
                raise OperationTimeoutError(
                    "the guest agent did not answer in time: the sandbox may be overloaded or broken; "
                    "'smolvm sandbox logs NAME' shows its console"
                )
            frame = self._recv_until(min(deadline, retry_at, now + 0.5))
            if frame is None:
                if time.monotonic() < retry_at:
                    continue
                # Booting: the agent may have restarted and lost our hello. Otherwise
                # the previous host may have died mid-frame, leaving the agent waiting
                # for the rest: complete that with padding first.
                self._send(hello if booting else P.PAD + hello, deadline)
                retry_at = time.monotonic() + SYNC_RETRY
                continue
            if frame.kind == P.MSG:
                try:
                    msg = frame.msg()
                except P.ProtocolError:
                    continue  # stale bytes from before this connection
                if msg.get("op") == "sync_ok" and msg.get("nonce") == nonce:
                    version = msg.get("version")
                    if version != P.VERSION:
                        raise GuestError(
                            f"the guest agent speaks protocol {version!r}, this host {P.VERSION}: "
                            "rebuild the image with 'smolvm image build' and create the sandbox anew"
                        )
                    self.guest_info = msg
                    return

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames ---------------------------------------------------------
    def _send(self, data: bytes, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        # A feeder stuck in a send to a guest that stopped reading holds the lock: wait no longer than our own deadline.
        if not self.send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise OperationTimeoutError("the guest agent stopped reading: the sandbox may be hung")
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except TimeoutError:
            raise OperationTimeoutError("the guest agent stopped reading: the sandbox may be hung") from None
        except OSError as exc:
            raise GuestError(f"lost the connection to the guest agent: {exc}") from None
        finally:
            self.send_lock.release()

    def send_msg(self, msg: dict[str, Any], deadline: float | None = None) -> None:
        self._send(P.encode_msg(msg), deadline)

    def new_id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid

    def _recv_until(self, deadline: float | None) -> P.Frame | None:
        """The next frame, or None when ``deadline`` passes first (a past deadline still
        polls once). Bytes that keep coming without making a frame do not hold it open."""
        polled = False
        while True:
            for frame in self.decoder.frames():
                return frame
            if polled and deadline is not None and time.monotonic() >= deadline:
                return None
            polled = True
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return None  # deadline passed
            try:
                data = self.sock.recv(P.MAX_PAYLOAD)
            except OSError as exc:
                raise GuestError(f"lost the connection to the guest agent: {exc}") from None
            if not data:
                raise GuestError("the guest agent closed the connection (the sandbox stopped?)")
            self.decoder.feed(data)
            if self.decoder.skipped > MAX_STALE:
                raise GuestError("the guest agent sends bytes that are not frames; giving up")

    def frames(self, rid: int, deadline: float | None, what: str, paced: bool = False) -> Iterator[P.Frame]:
        """Frames for request ``rid`` until ``deadline``, however fast the guest sends:
        frames for anything else, and empty ones, are skipped within a budget.
        ``paced``: the caller's own time between frames moves the deadline on (a watch
        read by a slow loop): only time spent waiting on the guest counts."""
        self.idle_frames = 0
        self.decoder.skipped = 0
        self.cut_short = None
        while True:
            if self.cut_short is not None:
                deadline = self.cut_short if deadline is None else min(deadline, self.cut_short)
            if deadline is not None and time.monotonic() >= deadline:
                raise OperationTimeoutError(f"{what} did not finish in time")
            frame = self._recv_until(deadline)
            if frame is None:
                raise OperationTimeoutError(f"{what} did not finish in time")
            if frame.stream != rid or (frame.kind == P.DATA and not frame.payload):
                self.skip(frame)
                continue
            handed = time.monotonic()
            yield frame
            if paced and deadline is not None:
                deadline += time.monotonic() - handed

    def skip(self, frame: P.Frame) -> None:
        """Count a frame that carries nothing for the request being read (stale, empty,
        an op the caller has no use for); a guest that sends too many is given up on."""
        self.idle_frames += 1
        self.decoder.skipped += P.HEADER.size + len(frame.payload)
        if self.idle_frames > MAX_IDLE_FRAMES or self.decoder.skipped > MAX_STALE:
            raise GuestError("the guest agent sends frames nobody asked for; giving up")

    def reply(self, rid: int, deadline: float | None, what: str) -> dict[str, Any]:
        """The final message for ``rid``: 'ok' comes back, 'error' is raised."""
        for frame in self.frames(rid, deadline, what):
            if frame.kind != P.MSG:
                self.skip(frame)
                continue
            msg = message(frame)
            check_error(msg, what)
            return msg
        raise AssertionError("unreachable")

    # -- operations -----------------------------------------------------
    def exec(
        self,
        cmd: str,
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        max_output: int = MAX_OUTPUT,
        on_output: Callable[[int, bytes], None] | None = None,
        stdin: BinaryIO | None = None,
        deadline: float | None = None,
        user: str | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run ``cmd`` (as ``user``, root if None); (exit code, stdout, stderr). Raises
        OperationTimeoutError by ``deadline`` (default: ``timeout`` plus GRACE from now)
        whatever the guest sends. Setting ``cancel`` (from another thread) has the guest
        kill the command; its exit comes back as usual."""
        rid = self.new_id()
        msg: dict[str, Any] = {"op": "exec", "id": rid, "cmd": cmd, "timeout": timeout}
        if env:
            msg["env"] = env
        if cwd:
            msg["cwd"] = cwd
        if user:
            msg["user"] = user
        if stdin is not None:
            msg["stdin"] = True
        # The guest enforces ``timeout``; the host waits GRACE longer for it to say so,
        # and then gives up itself (closing the connection ends the command).
        if deadline is None:
            deadline = time.monotonic() + timeout + GRACE
        self.send_msg(msg, deadline)
        with (
            Feeder(self, rid, stdin, deadline) if stdin is not None else nullcontext() as feeder,
            Canceller(self, rid, cancel, deadline) if cancel is not None else nullcontext(),
        ):
            try:
                result = self._exec_result(rid, cmd, timeout, deadline, max_output, on_output, feeder)
            except OperationTimeoutError:
                if self.cut_short is None:
                    raise
                result = None  # stopped for its output and never said it ended: that is what to report
        if result is None:
            raise OutputLimitError(OUTPUT_LIMIT.format(max_output))
        if feeder is not None:
            if feeder.thread.is_alive():
                self.broken = True  # still inside a send: what it leaves on the wire is unknown
            feeder.check()
        return result

    def _exec_result(
        self,
        rid: int,
        cmd: str,
        timeout: float,
        deadline: float,
        max_output: int,
        on_output: Callable[[int, bytes], None] | None,
        feeder: Feeder | None,
    ) -> tuple[int, bytes, bytes]:
        # One buffer per stream, not one object per frame: memory stays within
        # max_output however finely the guest cuts its output.
        out: dict[int, bytearray] = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
        total = 0
        over = False
        for frame in self.frames(rid, deadline, f"command {cmd!r}"):
            if frame.kind == P.DATA:
                if frame.channel not in out:
                    raise GuestError(f"the guest agent sent output on unknown channel {frame.channel}")
                total += len(frame.payload)
                if total > max_output:
                    if not over:
                        over = True
                        self.send_msg({"op": "cancel", "id": self.new_id(), "target": rid}, deadline)
                        self.cut_short = time.monotonic() + GRACE  # its exit, or we give up soon
                    continue
                out[frame.channel] += frame.payload
                if on_output is not None:
                    on_output(frame.channel, frame.payload)
                continue
            reply = message(frame)
            check_error(reply, f"command {cmd!r}")
            if reply.get("op") == "credit" and feeder is not None:
                feeder.credit(reply.get("bytes"))
                continue
            if reply.get("op") != "exit":
                self.skip(frame)
                continue
            if over:
                raise OutputLimitError(OUTPUT_LIMIT.format(max_output))
            if reply.get("timed_out") is True:
                raise OperationTimeoutError(
                    f"command timed out after {timeout:g}s and was killed (the sandbox is still usable): {cmd!r}"
                )
            return exit_status(reply.get("exit_code")), bytes(out[P.STDOUT]), bytes(out[P.STDERR])
        raise AssertionError("unreachable")

    def terminal(
        self,
        keys: int | BinaryIO,
        screen: Callable[[bytes], object],
        size: Callable[[], tuple[int, int]],
        *,
        cmd: str | None = None,
        term: str = "xterm-256color",
        resized: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run a login shell (or ``cmd``) on a terminal in the guest until it exits; return its status.

        ``keys`` (an fd or a file) is sent as typed; the guest's screen output goes
        to ``screen``; whenever ``resized()`` says so, ``size()`` (rows, cols) is
        sent on, and the guest's programs get SIGWINCH.
        """
        rid = self.new_id()
        rows, cols = size()
        msg: dict[str, Any] = {"op": "pty", "id": rid, "rows": rows, "cols": cols, "term": term}
        if cmd is not None:
            msg["cmd"] = cmd
        self.send_msg(msg, time.monotonic() + 30)
        self.idle_frames = 0
        with Feeder(self, rid, keys, None) as feeder:
            while True:
                frame = self._recv_until(time.monotonic() + 0.2)
                if resized():
                    rows, cols = size()
                    self.send_msg({"op": "resize", "id": self.new_id(), "target": rid, "rows": rows, "cols": cols})
                if frame is None:
                    continue
                if frame.stream != rid or (frame.kind == P.DATA and not frame.payload):
                    self.skip(frame)
                    continue
                if frame.kind == P.DATA:
                    screen(frame.payload)
                    continue
                reply = message(frame)
                check_error(reply, "the shell")
                if reply.get("op") == "credit":
                    feeder.credit(reply.get("bytes"))
                elif reply.get("op") == "exit":
                    return exit_status(reply.get("exit_code"))
                else:
                    self.skip(frame)

    def process_output(self, pid: int, timeout: float = 60) -> tuple[bytes, bytes, dict[str, Any]]:
        """A background process's kept output and its state."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        self.send_msg({"op": "proc_output", "id": rid, "pid": pid}, deadline)
        out: dict[int, bytearray] = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
        for frame in self.frames(rid, deadline, f"output of process {pid}"):
            if frame.kind == P.DATA:
                buf = out.get(frame.channel)
                if buf is None or len(buf) + len(frame.payload) > P.RING:
                    raise GuestError(f"the guest agent sent more output for process {pid} than it keeps")
                buf += frame.payload
                continue
            reply = message(frame)
            check_error(reply, f"output of process {pid}")
            return bytes(out[P.STDOUT]), bytes(out[P.STDERR]), reply
        raise AssertionError("unreachable")

    def write_file(
        self, local: Path, guest_path: str, timeout: float, xfer: Path | None = None, keep_mtime: bool = False
    ) -> None:
        """Upload ``local``: through the transfer disk ``xfer`` when given and the
        file is large, else as data frames on the wire; with its mtime if asked."""
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            mtime = int(st.st_mtime) if keep_mtime else None
            self.write_stream(f, st.st_size, st.st_mode & 0o777, guest_path, timeout, xfer, mtime)

    def write_stream(
        self,
        f: BinaryIO,
        size: int,
        mode: int,
        guest_path: str,
        timeout: float,
        xfer: Path | None = None,
        mtime: int | None = None,
    ) -> None:
        """Upload the next ``size`` bytes of ``f`` to ``guest_path`` (written beside it, then
        renamed: never half there). ``f`` may be any binary reader; one with a file
        descriptor goes through the transfer disk in the kernel."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        what = f"upload to {guest_path}"
        msg: dict[str, Any] = {"op": "write_file", "id": rid, "path": guest_path, "size": size, "mode": mode}
        if mtime is not None:
            msg["mtime"] = mtime
        if xfer is not None and size > P.TRANSFER_BLOCK:
            self.send_msg({**msg, "via": "disk", "window": TRANSFER_WINDOW}, deadline)
            self._upload_via_disk(f, size, rid, xfer, deadline, what)
            return
        self.send_msg(msg, deadline)
        sent = 0
        while sent < size:
            chunk = f.read(min(P.CHUNK, size - sent))
            if not chunk:
                raise ValidationError(f"{_name(f)} shrank while it was being uploaded; nothing was written")
            self._send(P.encode(P.DATA, chunk, rid, P.FILE), deadline)
            sent += len(chunk)
            early = self._recv_until(time.monotonic())  # an error may come before we finish
            if early is not None and early.stream == rid and early.kind == P.MSG:
                check_error(message(early), what)
                if sent < size:
                    raise GuestError(f"the guest agent answered the {what} before it had all of it")
                return  # the answer to the last chunk, already here: taken, not waited for
            if early is not None:
                self.skip(early)
        self.reply(rid, deadline, what)

    def _upload_via_disk(self, f: BinaryIO, size: int, rid: int, xfer: Path, deadline: float, what: str) -> None:
        try:
            src: int | None = f.fileno()
            start = f.tell()
        except (OSError, AttributeError, io.UnsupportedOperation):
            src, start = None, 0
        with open(xfer, "r+b") as disk:
            sent = 0
            while sent < size:
                chunk = min(TRANSFER_WINDOW, size - sent)
                try:
                    if src is not None:
                        copy_bytes(src, disk.fileno(), chunk, start + sent, 0)
                    else:
                        fill_window(f, disk, chunk)
                except GuestError:
                    shrank = f"{_name(f)} shrank while it was being uploaded; nothing was written"
                    raise ValidationError(shrank) from None
                self.send_msg({"op": "disk_data", "id": rid, "size": chunk}, deadline)
                answer = self.reply(rid, deadline, what).get("op")
                sent += chunk
                if answer == "ok" and sent == size:
                    return
                if answer != "taken" or sent >= size:
                    raise GuestError(f"the guest agent answered {answer!r} during {what}")

    def write_tree(
        self,
        pack: Callable[[BinaryIO], None],
        guest_path: str,
        size: int,
        timeout: float,
        xfer: Path,
        big: Sequence[tuple[str, Path]] = (),
    ) -> None:
        """Upload a tree: its ``big`` files (name in the tree, host path) one by one as
        files are, then the tar stream ``pack`` writes of the rest, through the transfer
        disk a window at a time straight into tar in the guest, which builds the tree
        beside ``guest_path`` and puts it there (``size``: the bytes its files hold,
        checked against the free space first)."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        what = f"upload to {guest_path}"
        msg = {"op": "untar", "id": rid, "path": guest_path, "via": "disk", "window": TRANSFER_WINDOW, "size": size}
        self.send_msg(msg, deadline)
        ready = self.reply(rid, deadline, what)
        parent, name = guest_path.rsplit("/", 1)
        stage = ready.get("stage")
        if ready.get("op") != "ready" or not isinstance(stage, str) or stage.rsplit("/", 1)[0] != parent:
            raise GuestError(f"the guest agent answered {clean(ready.get('op'), 40)!r} to the {what}")
        for rel, path in big:  # written straight into place: tar's copies through pipes cost more
            left = max(0.0, deadline - time.monotonic())
            try:
                self.write_file(path, f"{stage}/{rel}", left, xfer, keep_mtime=True)
            except SmolVMError:
                raise
            except OSError as exc:
                raise ValidationError(f"reading {path} failed, nothing was uploaded: {exc}") from None
        with open(xfer, "r+b") as disk:
            windows = DiskWindows(self, rid, disk.fileno(), deadline, what)
            pack(cast(BinaryIO, windows))  # a writer is all tarfile needs
            windows.hand(last=True)
        done = self.reply(rid, deadline, what).get("op")
        if done != "ok":
            raise GuestError(f"the guest agent answered {clean(done, 40)!r} at the end of the {what}")

    def read_file(
        self, guest_path: str, local: Path, timeout: float, xfer: Path | None = None, max_size: int = MAX_DOWNLOAD
    ) -> int:
        size, chunks = self.read_stream(guest_path, timeout, xfer, max_size)
        with partial_file(local, size, guest_path) as f:
            for chunk in chunks:
                f.write(chunk)
        return size

    def read_stream(
        self,
        guest_path: str,
        timeout: float,
        xfer: Path | None = None,
        max_size: int = MAX_DOWNLOAD,
        follow: bool = True,
    ) -> tuple[int, Iterator[bytes]]:
        """The size of a sandbox file, and its bytes in chunks of at most 1 MiB: exactly
        that many, or an error (``follow=False``: ``not_file`` for a symlink). The
        connection is busy until the chunks are all read."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        what = f"download of {guest_path}"
        msg: dict[str, Any] = {"op": "read_file", "id": rid, "path": guest_path}
        if not follow:
            msg["nofollow"] = True
        if xfer is not None:
            msg.update(via="disk", window=TRANSFER_WINDOW)
        self.send_msg(msg, deadline)
        head = self.reply(rid, deadline, what)
        size = head.get("size")
        if head.get("op") != "file" or not isinstance(size, int) or not 0 <= size <= max_size:
            raise GuestError(f"the guest agent announced a bad file size {size!r} for {guest_path}")

        def chunks() -> Iterator[bytes]:
            got = 0
            for frame in self.frames(rid, deadline, what):
                if frame.kind == P.DATA:
                    got += len(frame.payload)
                    if frame.channel != P.FILE or got > size:
                        raise GuestError(f"the guest agent sent more than the {size} bytes of {guest_path}")
                    yield frame.payload
                    continue
                msg = message(frame)
                check_error(msg, what)
                if msg.get("op") == "disk_data" and xfer is not None:
                    for chunk in self._take_window(msg, xfer, size - got, rid, deadline):
                        got += len(chunk)
                        yield chunk
                elif msg.get("op") == "ok":
                    if got != size:
                        raise GuestError(f"{guest_path} arrived with {got} of {size} bytes")
                    return
                else:
                    self.skip(frame)

        return size, chunks()

    def _take_window(self, msg: dict[str, Any], xfer: Path, room: int, rid: int, deadline: float) -> Iterator[bytes]:
        """The bytes the guest put on the transfer disk (at most ``room``), then the window is given back."""
        window = msg.get("size")
        if not isinstance(window, int) or not 0 < window <= min(TRANSFER_WINDOW, room):
            raise GuestError(f"the guest agent announced a bad transfer of {window!r} bytes")
        with open(xfer, "rb") as disk:
            for offset in range(0, window, P.TRANSFER_BLOCK):
                yield os.pread(disk.fileno(), min(P.TRANSFER_BLOCK, window - offset), offset)
        self.send_msg({"op": "taken", "id": rid}, deadline)

    def tree_stream(
        self,
        guest_path: str,
        timeout: float,
        xfer: Path | None = None,
        max_size: int = MAX_DOWNLOAD,
        apart: list[tuple[str, int, float]] | None = None,
    ) -> Iterator[bytes]:
        """The tree under ``guest_path`` as the guest's tar stream, in chunks (through the
        transfer disk ``xfer`` when given); ends once the guest says its tar succeeded
        (exit 1, files changed while read, is taken as success). With the disk, the
        guest leaves its big files out of the stream and names them (name in the tree,
        mode, mtime) in ``apart``, to be read one by one afterwards."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        what = f"download of {guest_path}"
        msg: dict[str, Any] = {"op": "tar_out", "id": rid, "path": guest_path}
        if xfer is not None:
            msg.update(via="disk", window=TRANSFER_WINDOW)
        self.send_msg(msg, deadline)
        got = 0
        names_left = MAX_APART_NAMES
        too_big = f"the {what} is larger than {max_size} bytes: refused"
        for frame in self.frames(rid, deadline, what):
            if frame.kind == P.DATA:
                got += len(frame.payload)
                if frame.channel != P.FILE or got > max_size:
                    raise GuestError(too_big)
                yield frame.payload
                continue
            msg = message(frame)
            check_error(msg, what)
            if msg.get("op") == "disk_data" and xfer is not None:
                if got >= max_size:
                    raise GuestError(too_big)
                for chunk in self._take_window(msg, xfer, max_size - got, rid, deadline):
                    got += len(chunk)
                    yield chunk
                continue
            if msg.get("op") == "apart" and apart is not None:
                batch = apart_files(msg.get("files"), names_left, what)
                names_left -= sum(len(name.encode()) for name, _, _ in batch)
                apart.extend(batch)
                continue
            if msg.get("op") != "ok":
                self.skip(frame)
                continue
            code = msg.get("exit_code")
            if code not in (0, 1):
                raise GuestError(f"{what} failed in the sandbox: {clean(msg.get('errors'), 500)}")
            return

    def batches(
        self, rid: int, deadline: float, what: str, op: str, paced: bool = False
    ) -> Generator[list[Any], None, dict[str, Any]]:
        """The lists in ``{"op": op, op: [...]}`` messages for ``rid``; returns its 'ok'."""
        for frame in self.frames(rid, deadline, what, paced):
            if frame.kind != P.MSG:
                self.skip(frame)
                continue
            msg = message(frame)
            check_error(msg, what)
            if msg.get("op") == "ok":
                return msg
            batch = msg.get(op)
            if msg.get("op") != op or not isinstance(batch, list):
                raise GuestError(f"the guest agent answered the {what} with {clean(msg.get('op'), 40)!r}")
            yield batch
        raise AssertionError("unreachable")  # frames() ends only by raising

    def entries(self, guest_path: str, depth: int, timeout: float, limit: int) -> Iterator[dict[str, Any]]:
        """The raw entries of a listing (checked by the caller), at most ``limit``."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        what = f"listing of {guest_path}"
        self.send_msg({"op": "list", "id": rid, "path": guest_path, "depth": depth}, deadline)
        count = 0
        for batch in self.batches(rid, deadline, what, "entries"):
            count += len(batch)
            if count > limit:
                raise GuestError(f"the {what} has more than {limit} entries: list a smaller part, or less deep")
            yield from batch

    def watch(self, guest_path: str, recursive: bool, timeout: float) -> Iterator[dict[str, Any]]:
        """Raw events under ``guest_path`` (checked by the caller) for ``timeout`` seconds.
        Returns once the guest watches, so nothing that happens after the call is missed."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout + GRACE + 5  # the guest ends it at timeout
        what = f"watch of {guest_path}"
        self.send_msg(
            {"op": "watch", "id": rid, "path": guest_path, "recursive": recursive, "timeout": timeout}, deadline
        )
        first = self.reply(rid, deadline, what)
        if first.get("op") != "watching":
            raise GuestError(f"the guest agent answered the {what} with {clean(first.get('op'), 40)!r}")
        return self._events(self.batches(rid, deadline, what, "events", paced=True), what)

    @staticmethod
    def _events(batches: Generator[list[Any], None, dict[str, Any]], what: str) -> Iterator[dict[str, Any]]:
        """The events of a watch's batches; a watch that lost some says so when it ends."""
        while True:
            try:
                batch = next(batches)
            except StopIteration as stop:
                if isinstance(stop.value, dict) and stop.value.get("overflowed") is True:
                    log.warning("smolvm: the %s missed events: more came at once than the guest kept", what)
                return
            yield from batch

    def call(self, op: str, timeout: float = 30, *, what: str | None = None, **fields: Any) -> dict[str, Any]:
        """A request answered by one message; ``what`` names it in errors."""
        rid = self.new_id()
        deadline = time.monotonic() + timeout
        self.send_msg({"op": op, "id": rid, **fields}, deadline)
        return self.reply(rid, deadline, what or op)


class DiskWindows(io.RawIOBase):
    """A writer (tarfile writes a tree into it) that fills the transfer disk and hands it
    to the guest whenever a window is full, waiting until the guest has taken it."""

    def __init__(self, conn: AgentConnection, rid: int, fd: int, deadline: float, what: str) -> None:
        super().__init__()
        self.conn, self.rid, self.fd, self.deadline, self.what = conn, rid, fd, deadline, what
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = min(len(view), TRANSFER_WINDOW - self.pos)
            try:
                written = os.pwrite(self.fd, view[:n], self.pos)
            except OSError as exc:
                raise HostError(f"writing the transfer disk failed during the {self.what}: {exc}") from None
            self.pos += written
            view = view[written:]
            if self.pos == TRANSFER_WINDOW:
                self.hand(last=False)
        return total

    def hand(self, last: bool) -> None:
        """Give the guest what the disk holds; the last window's answer is the upload's own."""
        self.conn.send_msg({"op": "disk_data", "id": self.rid, "size": self.pos, "last": last}, self.deadline)
        self.pos = 0
        if not last:
            answer = self.conn.reply(self.rid, self.deadline, self.what).get("op")
            if answer != "taken":
                raise GuestError(f"the guest agent answered {clean(answer, 40)!r} during the {self.what}")


class Canceller:
    """Asks the guest to kill request ``rid`` once ``event`` is set, from a thread of
    its own, until the request ends."""

    def __init__(self, conn: AgentConnection, rid: int, event: threading.Event, deadline: float | None) -> None:
        self.conn, self.rid, self.event, self.deadline = conn, rid, event, deadline
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Canceller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.event.wait(CANCEL_POLL):
                if not self.done.is_set():
                    try:  # the id of a cancel is never answered: 0 needs no counter shared with the reader
                        self.conn.send_msg({"op": "cancel", "id": 0, "target": self.rid}, self.deadline)
                    except SmolVMError:
                        pass  # the connection is gone, and the command with it
                return


class Feeder:
    """Sends ``source`` (a file, or an fd read as it becomes readable) to the guest
    as input of request ``rid``, from a thread of its own, never more than
    STDIN_WINDOW bytes ahead of the agent's credits; then the end of input."""

    def __init__(self, conn: AgentConnection, rid: int, source: int | BinaryIO, deadline: float | None) -> None:
        self.conn, self.rid, self.source, self.deadline = conn, rid, source, deadline
        self.window = P.STDIN_WINDOW
        self.cond = threading.Condition()
        self.stopped = False
        self.source_error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        # A file read may block (a pipe, a terminal): the thread is a daemon and
        # sends nothing once stopped.
        self.thread.join(0.5)

    def credit(self, amount: object) -> None:
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= P.STDIN_WINDOW:
            raise GuestError(f"the guest agent sent a bad input credit {amount!r}")
        with self.cond:
            self.window = min(P.STDIN_WINDOW, self.window + amount)
            self.cond.notify()

    def _read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes of input (b"" at its end), or None if stopped while waiting."""
        if isinstance(self.source, int):
            while not select.select([self.source], [], [], 0.2)[0]:
                if self.stopped:
                    return None
            try:
                return os.read(self.source, size)
            except OSError:
                return b""
        # read1: what is there now (a pipe, a terminal), not a wait for ``size`` bytes.
        read = getattr(self.source, "read1", None) or self.source.read
        return read(size) or b""

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.window <= 0 and not self.stopped:
                        self.cond.wait(0.5)
                    if self.stopped:
                        return
                    size = min(self.window, P.CHUNK)
                try:
                    chunk = self._read(size)
                    if chunk is not None and not isinstance(chunk, bytes):
                        raise TypeError(f"read() gave {type(chunk).__name__}, not bytes")
                except Exception as exc:  # the source's fault: the command gets the end of input
                    self.source_error = exc
                    chunk = b""
                if chunk is None or self.stopped:
                    return
                with self.cond:
                    self.window -= len(chunk)
                self.conn._send(P.encode(P.DATA, chunk, self.rid, P.STDIN), self.deadline)
                if not chunk:
                    return  # the end of input has been sent
        except SmolVMError:
            pass  # the connection's: the command's own outcome says what happened

    def check(self) -> None:
        """Raise what went wrong reading the input, if anything did."""
        if self.source_error is not None:
            raise ValidationError(f"reading the command's stdin failed: {self.source_error}")


def exit_status(code: object) -> int:
    """A guest exit code, checked; a command killed by signal N reports -N from the agent, shells say 128+N."""
    if not isinstance(code, int) or isinstance(code, bool) or not -255 <= code <= 255:
        raise GuestError(f"the guest agent reported a bad exit code {code!r}")
    return 128 - code if code < 0 else code


def apart_files(raw: object, room: int, what: str) -> list[tuple[str, int, float]]:
    """(name in the tree, mode, mtime) of big files a tree download sends apart, checked
    as the tree's own entries are; ``room``: the name bytes the download may still take."""
    bad = f"the guest agent sent a bad or too long list of files for the {what}"
    if not isinstance(raw, list) or len(raw) > P.APART_BATCH:
        raise GuestError(bad)
    files = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
            raise GuestError(bad)
        try:
            room -= len(item[0].encode())  # the agent names apart only files whose names are UTF-8
        except UnicodeEncodeError:
            raise GuestError(bad) from None
        if room < 0 or not member_parts(item[0]):
            raise GuestError(bad)
        mode = guest_number(item[1], "file mode", 0, 0o7777)
        mtime = guest_number(item[2], "modification time", -MAX_TIME, MAX_TIME)
        if mode != int(mode):
            raise GuestError(bad)
        files.append((item[0], int(mode), mtime))
    return files


def check_error(msg: dict[str, Any], what: str) -> None:
    if msg.get("op") != "error":
        return
    code = clean(msg.get("code", "error"), 64)
    text = clean(msg.get("message", ""))
    if code == "not_found":
        raise GuestFileNotFoundError(f"{what} failed: {text}")
    if code == "no_process":
        raise ProcessNotFoundError(f"{what} failed: {text}")
    if code in ("invalid", "is_dir", "not_file", "not_dir", "exists", "too_many", "no_space"):
        raise ValidationError(f"{what} failed: {text}")
    raise GuestError(f"{what} failed in the sandbox ({code}): {text}")


__all__ = ["AgentConnection", "SmolVMError"]
