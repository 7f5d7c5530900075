"""SmolVM guest agent: runs inside the sandbox, serves the host over virtio-serial.

Standard library only. Started by the guest's init (see init.sh), restarted
if it dies. It speaks the protocol in protocol.py, which the image build
places beside it. One host connection at a time: a SYNC with a new nonce
means a new host connection, and whatever the previous one left running in
the foreground is cancelled.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P

ENV_FILE = "/etc/smolvm/env.json"
PROFILE_FILE = "/etc/profile.d/zz-smolvm-env.sh"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
# Bash builtins and keywords: a command starting with one needs the shell.
# (true and false are left out: their programs behave the same.)
SHELL_WORDS = frozenset(
    "alias bg bind break builtin caller case cd command compgen complete compopt continue coproc declare dirs "
    "disown do done echo elif else enable esac eval exec exit export fc fg fi for function getopts hash help "
    "history if in jobs kill let local logout mapfile popd printf pushd pwd read readarray readonly return "
    "select set shift shopt source suspend test then time times trap type typeset ulimit umask unalias unset "
    "until wait while [ [[ ]] { } ! .".split()
)
PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
READ_PAGES = 64


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


START_UPTIME = uptime()


def boot_marks() -> dict[str, float]:
    """Uptimes at which the initramfs, the root filesystem and init were reached."""
    marks: dict[str, float] = {}
    try:
        with open("/run/smolvm-boot") as f:
            words = f.read().split()
        for key, value in zip(words[::2], words[1::2], strict=False):
            marks[key] = float(value)
    except (OSError, ValueError):
        pass
    return marks


def direct_argv(cmd: str, path: str) -> list[str] | None:
    """[program path, argv...] to exec without a shell when ``cmd`` is one plain simple command.

    Bash would exec such a command as it is; skipping bash saves its start-up
    (about 50 ms under emulation). Anything a shell would interpret, a
    builtin, or a program not on PATH goes through bash as usual.
    """
    words = cmd.split()
    if not words or "\n" in cmd or not all(PLAIN_WORD.fullmatch(w) for w in words):
        return None
    prog = words[0]
    if prog in SHELL_WORDS or "=" in prog or "/" in prog:
        return None
    for directory in path.split(":"):
        candidate = os.path.join(directory, prog)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return [candidate, *words]
    return None


def find_xfer_disk() -> str | None:
    """The /dev node of the host's transfer disk, if it gave us one."""
    try:
        for name in os.listdir("/sys/block"):
            try:
                with open("/sys/block/%s/serial" % name) as f:
                    if f.read().strip() == P.TRANSFER_SERIAL:
                        return "/dev/" + name
            except OSError:
                continue
    except OSError:
        pass
    return None


def round_up(n: int) -> int:
    return (n + 4095) & ~4095


def find_port() -> str:
    """The /dev node of our virtio-serial port (no udev here to name it)."""
    base = "/sys/class/virtio-ports"
    for _ in range(500):
        try:
            for entry in os.listdir(base):
                with open(os.path.join(base, entry, "name")) as f:
                    if f.read().strip() == P.PORT_NAME:
                        return "/dev/" + entry
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit("smolvm-agent: virtio port %s not found" % P.PORT_NAME)


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.wlock = threading.Lock()
        self.nonce: str | None = None  # the current host connection's
        self.local = threading.local()  # .conn: the connection a thread's request came on
        self.cancels: dict[int, threading.Event] = {}
        self.uploads: dict[int, dict[str, Any]] = {}
        self.taken: dict[int, threading.Event] = {}  # downloads waiting for the host to empty the window
        self.xfer_lock = threading.Lock()
        self._xfer: tuple[int, int, mmap.mmap] | None = None
        self.env = self._load_env()

    # -- output ---------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Write one frame, unless it answers a request of a host connection that has gone."""
        conn = getattr(self.local, "conn", None)
        view = memoryview(frame)
        with self.wlock:
            while view:
                if conn is not None and conn != self.nonce:
                    return  # the host is another now: drop the rest, it resynchronises
                try:
                    n = os.write(self.fd, view)  # virtio-serial writes may be partial
                except BlockingIOError:
                    select.select([], [self.fd], [], 0.5)
                    continue
                view = view[n:]

    def reply(self, msg: dict[str, Any]) -> None:
        self.send(P.encode_msg(msg))

    def error(self, rid: int, code: str, message: str) -> None:
        self.reply({"op": "error", "id": rid, "code": code, "message": message[:2000]})

    # -- input ----------------------------------------------------------
    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGIO, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        import fcntl

        # The port raises SIGIO when the host connects or disconnects.
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_ASYNC)
        # A read of the port returns at most one page-sized virtio buffer; readv
        # of a non-blocking port takes every buffer that is ready in one call.
        os.set_blocking(self.fd, False)
        area = memoryview(bytearray(READ_PAGES * 4096))
        pages = [area[i : i + 4096] for i in range(0, len(area), 4096)]
        decoder = P.Decoder()
        while True:
            select.select([self.fd], [], [])
            try:
                n = os.readv(self.fd, pages)
            except BlockingIOError:
                continue
            if not n:  # no host connected: wait for one
                select.select([wake_r], [], [], 1.0)
                try:
                    os.read(wake_r, 512) if select.select([wake_r], [], [], 0)[0] else None
                except BlockingIOError:
                    pass
                continue
            decoder.feed(area[:n])
            for frame in decoder.frames():
                try:
                    self.dispatch(frame)
                except P.ProtocolError as exc:
                    self.error(frame.stream, "protocol", str(exc))

    def dispatch(self, frame: P.Frame) -> None:
        if frame.kind == P.DATA:
            self.upload_data(frame)
            return
        msg = frame.msg()
        op = msg["op"]
        rid = msg.get("id", 0)
        if not isinstance(rid, int):
            raise P.ProtocolError("id must be an integer")
        if op == "sync":
            self.sync(msg)
            return
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            self.error(rid, "unknown_op", "unknown operation %r" % op)
            return
        if op in ("exec", "read_file"):
            threading.Thread(target=self._guarded, args=(handler, rid, msg, self.nonce), daemon=True).start()
        else:
            self._guarded(handler, rid, msg, self.nonce)

    def _guarded(self, handler: Any, rid: int, msg: dict[str, Any], conn: str | None) -> None:
        self.local.conn = conn
        try:
            handler(rid, msg)
        except Failure as exc:
            self.error(rid, exc.code, str(exc))
        except OSError as exc:
            self.error(rid, "os", "%s: %s" % (exc.strerror or exc, exc.filename or ""))
        except Exception as exc:  # keep serving whatever one request does
            self.error(rid, "internal", "%s: %s" % (type(exc).__name__, exc))

    def sync(self, msg: dict[str, Any]) -> None:
        nonce = str(msg.get("nonce", ""))
        self.local.conn = nonce
        if nonce != self.nonce:
            # A new host connection: end what the old one left in the foreground,
            # and let nothing it asked for be answered on the new one. The nonce
            # changes first, without waiting for the write lock: a writer for the
            # old host gives up as soon as it sees it.
            self.nonce = nonce
            for event in [*self.cancels.values(), *self.taken.values()]:
                event.set()
            for up in self.uploads.values():
                self._abort_upload(up)
            self.uploads.clear()
            with self.xfer_lock:
                pass  # a window being written for the old host is done or abandoned
        self.reply(
            {
                "op": "sync_ok",
                "id": 0,
                "nonce": nonce,
                "version": P.VERSION,
                "started_at": START_UPTIME,
                "boot": boot_marks(),
                "uptime": uptime(),
            }
        )

    # -- commands -------------------------------------------------------
    def op_exec(self, rid: int, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        if not isinstance(cmd, str):
            raise Failure("invalid", "cmd must be a string")
        env = dict(BASE_ENV)
        env.update(self.env)
        extra = msg.get("env") or {}
        if not isinstance(extra, dict):
            raise Failure("invalid", "env must be an object")
        env.update({str(k): str(v) for k, v in extra.items()})
        cwd = msg.get("cwd") or env["HOME"]
        timeout = float(msg.get("timeout") or 0) or None
        shell = msg.get("shell") or "/bin/bash"
        direct = direct_argv(cmd, env["PATH"]) if "shell" not in msg else None
        cancel = threading.Event()
        self.cancels[rid] = cancel
        if self.local.conn != self.nonce:  # its host went away before we registered
            cancel.set()
        try:
            proc = self._spawn(direct, [shell, "-c", cmd], cwd, env)
            timed_out = self._pump(rid, proc, cancel, timeout)
        finally:
            self.cancels.pop(rid, None)
        self.reply({"op": "exit", "id": rid, "exit_code": proc.returncode, "timed_out": timed_out})

    @staticmethod
    def _spawn(
        direct: list[str] | None, shell_argv: list[str], cwd: str, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start a command: exec'd directly when it is a plain one, else through the shell.
        Whatever the direct exec cannot run (no shebang, a missing interpreter) gets the shell's say."""
        options: dict[str, Any] = dict(
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
            start_new_session=True,
        )  # fmt: skip
        if not os.path.isdir(cwd):
            raise Failure("not_found", "working directory %s does not exist in the sandbox" % cwd)
        if direct is not None:
            try:
                return subprocess.Popen(direct[1:], executable=direct[0], **options)
            except OSError:
                pass
        try:
            return subprocess.Popen(shell_argv, **options)
        except FileNotFoundError:
            raise Failure("not_found", "shell %s not found in the sandbox" % shell_argv[0]) from None

    def _pump(self, rid: int, proc: subprocess.Popen[bytes], cancel: threading.Event, timeout: float | None) -> bool:
        """Stream the process's output until it exits; kill its group on timeout or cancel."""
        assert proc.stdout is not None and proc.stderr is not None
        channels = {proc.stdout.fileno(): P.STDOUT, proc.stderr.fileno(): P.STDERR}
        for fd in channels:
            os.set_blocking(fd, False)
        deadline = time.monotonic() + timeout if timeout else None
        timed_out = False
        exited_at: float | None = None
        while channels:
            wait = 0.05
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            ready, _, _ = select.select(list(channels), [], [], wait)
            for fd in ready:
                try:
                    chunk = os.read(fd, P.CHUNK)
                except BlockingIOError:
                    continue
                if chunk:
                    self.send(P.encode(P.DATA, chunk, rid, channels[fd]))
                else:
                    del channels[fd]
            if cancel.is_set() or (deadline is not None and time.monotonic() >= deadline):
                timed_out = not cancel.is_set()
                self._kill_group(proc)
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            # The shell exited but a background child still holds the pipes:
            # deliver what is already there, then stop waiting for EOF.
            if exited_at is not None and not ready and time.monotonic() - exited_at > 0.05:
                break
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
        return timed_out

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def op_cancel(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.cancels.get(int(msg.get("target", -1)))
        if event is not None:
            event.set()

    # -- files ----------------------------------------------------------
    @staticmethod
    def _guest_path(msg: dict[str, Any]) -> str:
        path = msg.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise Failure("invalid", "path must be absolute")
        return path

    def xfer(self) -> tuple[int, int, mmap.mmap] | None:
        """(fd, size, aligned buffer) of the transfer disk, opened for direct I/O."""
        with self.xfer_lock:
            if self._xfer is None:
                dev = find_xfer_disk()
                if dev is None:
                    return None
                fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
                size = os.lseek(fd, 0, os.SEEK_END)
                self._xfer = (fd, size, mmap.mmap(-1, P.TRANSFER_BLOCK))
            return self._xfer

    @staticmethod
    def _window(msg: dict[str, Any], disk_size: int) -> int:
        window = int(msg.get("window", 0))
        if not 0 < window <= disk_size or window % P.TRANSFER_BLOCK:
            raise Failure("invalid", "bad transfer window %r" % window)
        return window

    def op_write_file(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        size = int(msg.get("size", -1))
        mode = int(msg.get("mode", 0o644)) & 0o7777
        if size < 0:
            raise Failure("invalid", "size must be given")
        if os.path.isdir(path):
            raise Failure("is_dir", "%s is a directory" % path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, ".%s.smolvm-upload-%d" % (os.path.basename(path), rid))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        up = {"path": path, "tmp": tmp, "fd": fd, "left": size, "mode": mode, "window": 0}
        if msg.get("via") == "disk":
            xfer = self.xfer()
            if xfer is None:
                os.close(fd)
                os.unlink(tmp)
                raise Failure("no_disk", "this sandbox has no transfer disk")
            up["window"] = self._window(msg, xfer[1])
        self.uploads[rid] = up
        if size == 0:
            self._finish_upload(rid, up)

    def upload_data(self, frame: P.Frame) -> None:
        up = self.uploads.get(frame.stream)
        if up is None or frame.channel != P.FILE:
            return  # data for a request that was cancelled or failed
        try:
            if len(frame.payload) > up["left"]:
                raise Failure("invalid", "more data than announced")
            view = memoryview(frame.payload)
            while view:
                view = view[os.write(up["fd"], view) :]
            up["left"] -= len(frame.payload)
            if up["left"] == 0:
                self._finish_upload(frame.stream, up)
        except (OSError, Failure) as exc:
            self.uploads.pop(frame.stream, None)
            self._abort_upload(up)
            code = exc.code if isinstance(exc, Failure) else "os"
            self.error(frame.stream, code, str(exc))

    def op_disk_data(self, rid: int, msg: dict[str, Any]) -> None:
        """The host put the next ``size`` bytes of an upload at the start of the transfer disk."""
        up = self.uploads.get(rid)
        if up is None:
            return  # cancelled meanwhile
        try:
            size = int(msg.get("size", -1))
            if not 0 < size <= min(up["window"], up["left"]):
                raise Failure("invalid", "bad transfer size %r" % size)
            xfer = self.xfer()
            assert xfer is not None
            fd, _, buf = xfer
            view = memoryview(buf)
            with self.xfer_lock:
                done = 0
                while done < size:
                    n = min(P.TRANSFER_BLOCK, size - done)
                    got = os.preadv(fd, [view[: round_up(n)]], done)
                    if got < n:
                        raise Failure("os", "short read from the transfer disk")
                    out = view[:n]
                    while out:
                        out = out[os.write(up["fd"], out) :]
                    done += n
            up["left"] -= size
            if up["left"] == 0:
                self._finish_upload(rid, up)
            else:
                self.reply({"op": "taken", "id": rid})
        except (OSError, Failure) as exc:
            self.uploads.pop(rid, None)
            self._abort_upload(up)
            self.error(rid, exc.code if isinstance(exc, Failure) else "os", str(exc))

    def op_taken(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.taken.get(rid)
        if event is not None:
            event.set()

    def _finish_upload(self, rid: int, up: dict[str, Any]) -> None:
        self.uploads.pop(rid, None)
        os.fchmod(up["fd"], up["mode"])
        os.close(up["fd"])
        os.replace(up["tmp"], up["path"])
        self.reply({"op": "ok", "id": rid})

    @staticmethod
    def _abort_upload(up: dict[str, Any]) -> None:
        try:
            os.close(up["fd"])
        except OSError:
            pass
        try:
            os.unlink(up["tmp"])
        except OSError:
            pass

    def op_read_file(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise Failure("not_found", "%s does not exist in the sandbox" % path) from None
        except IsADirectoryError:
            raise Failure("is_dir", "%s is a directory" % path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Failure("not_file", "%s is not a regular file" % path)
            self.reply({"op": "file", "id": rid, "size": st.st_size, "mode": st.st_mode & 0o777})
            left = st.st_size
            xfer = self.xfer() if msg.get("via") == "disk" and left > P.TRANSFER_BLOCK else None
            if xfer is not None:
                self._read_via_disk(rid, fd, left, self._window(msg, xfer[1]), xfer)
                left = 0
            while left:
                chunk = os.read(fd, min(P.CHUNK, left))
                if not chunk:
                    raise Failure("changed", "%s shrank while it was read" % path)
                self.send(P.encode(P.DATA, chunk, rid, P.FILE))
                left -= len(chunk)
        finally:
            os.close(fd)
        self.reply({"op": "ok", "id": rid})

    def _read_via_disk(self, rid: int, src: int, size: int, window: int, xfer: tuple[int, int, mmap.mmap]) -> None:
        """Send a file through the transfer disk, a window at a time, each taken by the host."""
        fd, _, buf = xfer
        view = memoryview(buf)
        event = threading.Event()
        self.taken[rid] = event
        conn = self.local.conn
        try:
            pos = 0
            while pos < size:
                chunk = min(window, size - pos)
                with self.xfer_lock:
                    done = 0
                    while done < chunk:
                        if conn != self.nonce:
                            raise Failure("cancelled", "the host went away")
                        n = min(P.TRANSFER_BLOCK, chunk - done)
                        if os.preadv(src, [view[:n]], pos + done) < n:
                            raise Failure("changed", "file shrank while it was read")
                        os.pwritev(fd, [view[: round_up(n)]], done)
                        done += n
                event.clear()
                if conn != self.nonce:  # sync() sets the nonce before the event
                    raise Failure("cancelled", "the host went away")
                self.reply({"op": "disk_data", "id": rid, "size": chunk})
                if not event.wait(120) or conn != self.nonce:
                    raise Failure("cancelled", "the host stopped taking the file")
                pos += chunk
        finally:
            self.taken.pop(rid, None)

    # -- environment ----------------------------------------------------
    @staticmethod
    def _load_env() -> dict[str, str]:
        try:
            with open(ENV_FILE) as f:
                data = json.load(f)
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_env(self) -> None:
        os.makedirs(os.path.dirname(ENV_FILE), exist_ok=True)
        tmp = ENV_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.env, f)
        os.replace(tmp, ENV_FILE)
        # Login shells (ssh, an interactive shell) see the same variables.
        import shlex

        lines = ["export %s=%s\n" % (k, shlex.quote(v)) for k, v in sorted(self.env.items())]
        with open(PROFILE_FILE + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(PROFILE_FILE + ".tmp", PROFILE_FILE)

    def op_env_set(self, rid: int, msg: dict[str, Any]) -> None:
        values = msg.get("vars")
        if not isinstance(values, dict):
            raise Failure("invalid", "vars must be an object")
        for key, value in values.items():
            if not P.ENV_KEY.fullmatch(key) or not isinstance(value, str) or "\0" in value:
                raise Failure("invalid", "bad environment variable %r" % key)
        self.env.update(values)
        self._save_env()
        self.reply({"op": "ok", "id": rid})

    def op_env_unset(self, rid: int, msg: dict[str, Any]) -> None:
        keys = msg.get("keys")
        if not isinstance(keys, list):
            raise Failure("invalid", "keys must be a list")
        removed = [k for k in keys if self.env.pop(str(k), None) is not None]
        self._save_env()
        self.reply({"op": "ok", "id": rid, "removed": removed})

    def op_env_list(self, rid: int, msg: dict[str, Any]) -> None:
        self.reply({"op": "ok", "id": rid, "vars": self.env})

    # -- lifecycle ------------------------------------------------------
    def op_identity(self, rid: int, msg: dict[str, Any]) -> None:
        """Make a sandbox resumed from a saved template its own: name, clock, randomness."""
        import binascii
        import fcntl
        import struct

        name = msg.get("hostname")
        if not isinstance(name, str) or not 0 < len(name) <= 63:
            raise Failure("invalid", "bad hostname")
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(name)
        time.clock_settime(time.CLOCK_REALTIME, float(msg.get("time", 0)))
        # Every clone resumes with the template's random state: mix in the host's
        # fresh bytes and reseed now (RNDADDENTROPY, RNDRESEEDCRNG).
        seed = binascii.a2b_base64(str(msg.get("entropy", "")))
        if len(seed) < 32:
            raise Failure("invalid", "too little entropy")
        with open("/dev/random", "wb") as f:
            fcntl.ioctl(f, 0x40085203, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(f, 0x5207)
        self.reply({"op": "ok", "id": rid})

    def op_sync_disks(self, rid: int, msg: dict[str, Any]) -> None:
        os.sync()
        self.reply({"op": "ok", "id": rid})


def setup_system() -> None:
    """What the initramfs leaves to us because a process there costs more than Python here."""
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        try:
            os.symlink(target, "/dev/" + name)
        except OSError:
            pass
    try:  # bring up loopback: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
        import fcntl
        import socket
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
            fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    except OSError:
        pass


def main() -> None:
    setup_system()
    fd = os.open(find_port(), os.O_RDWR)
    Agent(fd).serve()


if __name__ == "__main__":
    main()
