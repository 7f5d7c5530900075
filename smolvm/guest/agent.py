"""SmolVM guest agent: runs inside the sandbox, serves the host over virtio-serial.

Standard library only. Started by the guest's init (see init.sh), restarted
if it dies. It speaks the protocol in protocol.py, which the image build
places beside it. Each of its PORTS virtio-serial ports serves one host connection at a
time: when a port's host leaves (or a SYNC with a new nonce shows another
came), whatever it left running in the foreground is ended. Background
processes (``spawn``) belong to no connection and run on.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from collections.abc import Iterator
    from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits
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
    **P.PROXY_ENV,
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
READ_PAGES = 64
HANG_UP_GRACE = 1.0  # seconds a port must stay without a host before its foreground work is ended
GUEST_ADDRESS, GATEWAY = "10.0.2.15/24", "10.0.2.2"  # QEMU user networking's defaults


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
    if not words or "\n" in cmd or not all(P.PLAIN_WORD.fullmatch(w) for w in words):
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


def find_ports() -> list[tuple[int, str]]:
    """(index, /dev node) of our virtio-serial ports (no udev here to name them)."""
    base = "/sys/class/virtio-ports"
    found: dict[int, str] = {}
    for _ in range(500):
        try:
            for entry in os.listdir(base):
                with open(os.path.join(base, entry, "name")) as f:
                    name = f.read().strip()
                prefix, _, index = name.rpartition(".")
                if prefix == P.PORT_NAME and index.isdigit() and int(index) < P.PORTS:
                    found[int(index)] = "/dev/" + entry
        except OSError:
            pass
        if len(found) == P.PORTS:
            break
        time.sleep(0.01)
    if not found:
        raise SystemExit("smolvm-agent: virtio ports %s.N not found" % P.PORT_NAME)
    return sorted(found.items())


def process_table() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process, from /proc."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table.append((int(name), int(fields[1]), int(fields[2]), fields[0].decode()))
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int, table: list[tuple[int, int, int, str]]) -> list[int]:
    """Every descendant of ``pid`` in ``table``."""
    children: dict[int, list[int]] = {}
    for child, parent, _, _ in table:
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> bool:
    """SIGKILL the process group ``pid`` leads and every descendant of ``pid``,
    also those that left its group. False when nothing of it was alive."""
    table = process_table()
    alive = {p for p, _, _, state in table if state != "Z"}
    victims = [p for p in descendants(pid, table) if p in alive]
    victims += [p for p, _, group, _ in table if group == pid and p in alive]
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(victims)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


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

    def __init__(self, agent: Agent, port: Port, conn: str | None, rid: int) -> None:
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


class Background:
    """A command started with ``spawn``: runs on its own, whoever is connected.
    The last RING bytes of each output stream are kept; what is dropped is counted."""

    def __init__(self, proc: subprocess.Popen[bytes], cmd: str, cgroup: limits.Cgroup | None) -> None:
        self.proc = proc
        self.cmd = cmd
        self.cgroup = cgroup
        self.started = time.time()
        self.output = (bytearray(), bytearray())
        self.dropped = [0, 0]
        self.lock = threading.Lock()
        self.exit_code: int | None = None
        self.done = threading.Event()  # set once it has exited (exit_code is known)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): 0, self.proc.stderr.fileno(): 1}
        for fd in streams:
            os.set_blocking(fd, False)
        while streams or not self.done.is_set():
            ready, _, _ = select.select(list(streams), [], [], 0.5)
            for fd in ready:
                chunk = read_available(fd)
                if chunk is None:
                    del streams[fd]
                elif chunk:
                    self._keep(streams[fd], chunk)
            if not self.done.is_set():
                self._check_exit()  # once it has exited, children may still write: keep collecting
        self.proc.stdout.close()
        self.proc.stderr.close()

    def _check_exit(self) -> None:
        """Record the exit status, but leave the process a zombie (WNOWAIT): while it
        is one, its pid and process group id cannot be given to another process,
        so a later kill() cannot hit a stranger. ``forget`` reaps it."""
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
            self.exit_code = self.proc.returncode if self.proc.returncode is not None else -9
            self.done.set()
        if info is None:
            return
        exited = info.si_code == os.CLD_EXITED
        self.exit_code = info.si_status if exited else -info.si_status
        self.done.set()

    def forget(self) -> None:
        """Reap the process (it has exited): its pid may be reused from now on."""
        try:
            self.proc.wait(0)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass

    def _keep(self, stream: int, chunk: bytes) -> None:
        with self.lock:
            buf = self.output[stream]
            buf += chunk
            if len(buf) > P.RING:
                cut = len(buf) - P.RING
                del buf[:cut]
                self.dropped[stream] += cut

    def describe(self) -> dict[str, Any]:
        return {"pid": self.proc.pid, "cmd": self.cmd[:1000], "started": self.started, "exit_code": self.exit_code}


class Agent:
    MAX_BACKGROUND = 64  # processes kept in the table, running or exited
    # Operations that may take long run in a thread of their own; the rest are
    # answered by the reader, in order with the data frames that follow them.
    THREADED = frozenset(("exec", "read_file", "disk_data", "spawn", "proc_output", "proc_wait", "pty", "sync_disks"))

    def __init__(self, ports: list[Port]) -> None:
        self.ports = ports
        self.local = threading.local()  # .port, .conn: where a thread's request came from
        self.procs: dict[int, Background] = {}
        self.procs_lock = threading.Lock()
        self.xfer_lock = threading.Lock()
        self.xfer_open_lock = threading.Lock()
        self.xfer_owner: Port | None = None  # the port whose request holds xfer_lock for a window
        self._xfer: tuple[int, int, mmap.mmap] | None = None
        self.env = self._load_env()
        self.limits = limits.Limits()
        self.limits_lock = threading.Lock()
        # Ended commands' cgroups go, and the next one's is made, on a thread of
        # their own: the port that ran the command reads its next request at once.
        self.upkeep: queue.SimpleQueue[limits.Cgroup | None] = queue.SimpleQueue()
        threading.Thread(target=self._upkeep, name="cgroup-upkeep", daemon=True).start()

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

    # -- input ----------------------------------------------------------
    def serve(self) -> None:
        """Read every port from this one thread, which never blocks on anything else."""
        import fcntl

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGIO, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        for port in self.ports:
            # A port raises SIGIO when a host connects or disconnects.
            fcntl.fcntl(port.fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(port.fd, fcntl.F_SETFL, fcntl.fcntl(port.fd, fcntl.F_GETFL) | os.O_ASYNC)
            # A read of a port returns at most one page-sized virtio buffer; readv
            # of a non-blocking port takes every buffer that is ready in one call.
            os.set_blocking(port.fd, False)
        by_fd = {port.fd: port for port in self.ports}
        area = memoryview(bytearray(READ_PAGES * 4096))
        pages = [area[i : i + 4096] for i in range(0, len(area), 4096)]
        idle: set[int] = set()  # ports with no host: readable at EOF until one connects
        # A port whose host seems gone, and when to look again. The news that a host
        # left comes on another queue than the data: it may arrive after the next
        # host has already started on that port. So a hang-up waits until the
        # port still says POLLHUP a moment later.
        suspects: dict[int, float] = {}
        while True:
            watch = [fd for fd in by_fd if fd not in idle]
            wait = 1.0 if idle else None
            if suspects:
                wait = max(0.0, min(wait or 1.0, min(suspects.values()) - time.monotonic()))
            ready, _, _ = select.select([wake_r, *watch], [], [], wait)
            self._settle(suspects, by_fd)
            if wake_r in ready or not ready:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                idle.clear()  # someone connected or left somewhere: look at every port again
                continue
            for fd in ready:
                port = by_fd[fd]
                try:
                    n = os.readv(fd, pages)
                except BlockingIOError:
                    continue
                if not n:
                    # No host at the moment of the read. Rest the port until a host
                    # comes (SIGIO wakes us) only if it still has none: the next host
                    # may have come already, its SIGIO spent before this read, and a
                    # rested port would then keep its sync waiting a whole second.
                    if self._no_host(fd):
                        idle.add(fd)
                    if port.nonce is not None:
                        suspects.setdefault(fd, time.monotonic() + HANG_UP_GRACE)
                    continue
                suspects.pop(fd, None)  # its host is there: data came
                port.decoder.feed(area[:n])
                for frame in port.decoder.frames():
                    self.local.port, self.local.conn = port, port.nonce
                    try:
                        self.dispatch(port, frame)
                    except P.ProtocolError as exc:
                        self.error(frame.stream, "protocol", str(exc))

    @staticmethod
    def _no_host(fd: int) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def _settle(self, suspects: dict[int, float], by_fd: dict[int, Port]) -> None:
        """Hang up the suspected ports whose grace is over and that still have no host."""
        now = time.monotonic()
        for fd, due in list(suspects.items()):
            if due > now:
                continue
            del suspects[fd]
            if self._no_host(fd):
                port = by_fd[fd]
                self.local.port, self.local.conn = port, None
                self.hang_up(port)
                port.decoder = P.Decoder()  # half a frame from a host that left means nothing

    def dispatch(self, port: Port, frame: P.Frame) -> None:
        if frame.kind == P.DATA:
            if frame.channel == P.STDIN:
                target = port.inputs.get(frame.stream)
                if target is not None:
                    target.feed(frame.payload)
            else:
                self.upload_data(frame)
            return
        msg = frame.msg()
        op = msg["op"]
        rid = msg.get("id", 0)
        if not isinstance(rid, int):
            raise P.ProtocolError("id must be an integer")
        if op == "sync":
            self.sync(port, msg)
            return
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            self.error(rid, "unknown_op", "unknown operation %r" % op)
            return
        if op == "pty" or (op == "exec" and msg.get("stdin") is True):
            # Registered now, so input that follows at once is not lost.
            port.inputs[rid] = Input(self, port, port.nonce, rid)
        if op in self.THREADED:
            threading.Thread(target=self._guarded, args=(handler, port, rid, msg, port.nonce), daemon=True).start()
        else:
            self._guarded(handler, port, rid, msg, port.nonce)

    def _guarded(self, handler: Any, port: Port, rid: int, msg: dict[str, Any], conn: str | None) -> None:
        self.local.port, self.local.conn = port, conn
        try:
            handler(rid, msg)
        except Failure as exc:
            self.error(rid, exc.code, str(exc))
        except OSError as exc:
            self.error(rid, "os", "%s: %s" % (exc.strerror or exc, exc.filename or ""))
        except Exception as exc:  # keep serving whatever one request does
            self.error(rid, "internal", "%s: %s" % (type(exc).__name__, exc))
        finally:
            port.inputs.pop(rid, None)

    def sync(self, port: Port, msg: dict[str, Any]) -> None:
        nonce = str(msg.get("nonce", ""))
        if nonce != port.nonce:
            self.hang_up(port)
            port.nonce = nonce
        self.local.conn = nonce
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

    def hang_up(self, port: Port) -> None:
        """The port's host is gone: end what it left in the foreground (commands,
        terminals, uploads), and answer it nothing more. Background processes stay.
        The nonce changes first, without waiting for the write lock: a writer
        for the old host gives up as soon as it sees it."""
        port.nonce = None
        for event in [*port.cancels.values(), *port.taken.values()]:
            event.set()
        for up in port.uploads.values():
            self._abort_upload(up)
        port.uploads.clear()
        if self.xfer_owner is port:
            with self.xfer_lock:
                pass  # a window being written for the old host is done or abandoned

    # -- commands -------------------------------------------------------
    def _command_env(self, msg: dict[str, Any]) -> tuple[dict[str, str], str]:
        """The environment and working directory a request asks for, on top of the sandbox's."""
        env = dict(BASE_ENV)
        env.update(self.env)
        extra = msg.get("env") or {}
        if not isinstance(extra, dict):
            raise Failure("invalid", "env must be an object")
        env.update({str(k): str(v) for k, v in extra.items()})
        cwd = msg.get("cwd") or env["HOME"]
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            raise Failure("not_found", "working directory %s does not exist in the sandbox" % cwd)
        return env, cwd

    @staticmethod
    def _cmd(msg: dict[str, Any]) -> str:
        cmd = msg.get("cmd")
        if not isinstance(cmd, str) or "\0" in cmd:
            raise Failure("invalid", "cmd must be a string")
        return cmd

    def _cgroup(self) -> limits.Cgroup | None:
        with self.limits_lock:
            return self.limits.new()

    def _cgroup_done(self, cgroup: limits.Cgroup | None) -> None:
        self.upkeep.put(cgroup)

    def _upkeep(self) -> None:
        while True:
            cgroup = self.upkeep.get()
            try:
                with self.limits_lock:
                    self.limits.done(cgroup)
                    self.limits.refill()
            except Exception as exc:  # the next command makes its own cgroup then
                print("smolvm-agent: cgroup upkeep failed: %s" % exc, file=sys.stderr, flush=True)

    @staticmethod
    def _end(proc: subprocess.Popen[bytes], cgroup: limits.Cgroup | None) -> bool:
        """Kill a command with everything it started; False if nothing of it was left.
        The cgroup at once, and the process tree too: what the command started before
        it was moved into its cgroup is only found that way."""
        killed = cgroup.kill() if cgroup is not None else False
        return kill_tree(proc.pid) or killed

    def _cancel_event(self, rid: int) -> threading.Event:
        """Set when the host cancels ``rid`` or goes away."""
        port: Port = self.local.port
        cancel = threading.Event()
        port.cancels[rid] = cancel
        if self.local.conn != port.nonce:  # its host went away before we registered
            cancel.set()
        return cancel

    def op_exec(self, rid: int, msg: dict[str, Any]) -> None:
        port: Port = self.local.port
        cmd = self._cmd(msg)
        env, cwd = self._command_env(msg)
        timeout = float(msg.get("timeout") or 0) or None
        shell = msg.get("shell") or "/bin/bash"
        direct = direct_argv(cmd, env["PATH"]) if "shell" not in msg else None
        feed = port.inputs.get(rid)
        cancel = self._cancel_event(rid)
        cgroup = self._cgroup()
        try:
            if feed is None:
                proc = self._spawn(direct, [shell, "-c", cmd], cwd, env, subprocess.DEVNULL, cgroup)
            else:
                stdin_r, stdin_w = os.pipe()
                try:
                    proc = self._spawn(direct, [shell, "-c", cmd], cwd, env, stdin_r, cgroup)
                except BaseException:
                    os.close(stdin_w)
                    raise
                finally:
                    os.close(stdin_r)
                feed.start(stdin_w, owned=True)
            assert proc.stdout is not None and proc.stderr is not None
            try:
                outputs = {proc.stdout.fileno(): P.STDOUT, proc.stderr.fileno(): P.STDERR}
                timed_out = self._pump(rid, proc, outputs, cancel, timeout, cgroup)
            finally:
                if feed is not None:
                    feed.stop()
                proc.stdout.close()
                proc.stderr.close()
                proc.wait()
            port.cancels.pop(rid, None)
            self.reply({"op": "exit", "id": rid, "exit_code": proc.returncode, "timed_out": timed_out})
        finally:
            port.cancels.pop(rid, None)
            self._cgroup_done(cgroup)  # after the answer: the host need not wait for the cgroup's upkeep

    @staticmethod
    def _spawn(
        direct: list[str] | None,
        shell_argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin: int,
        cgroup: limits.Cgroup | None,
    ) -> subprocess.Popen[bytes]:
        """Start a command in a session and a cgroup of its own: exec'd directly when it is a
        plain one, else through the shell. What the direct exec cannot run (no shebang, a
        missing interpreter) gets the shell's say."""
        options: dict[str, Any] = dict(
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
        )  # fmt: skip
        proc = None
        if direct is not None:
            try:
                proc = subprocess.Popen(direct[1:], executable=direct[0], **options)
            except OSError:
                pass
        if proc is None:
            try:
                proc = subprocess.Popen(shell_argv, **options)
            except FileNotFoundError:
                raise Failure("not_found", "shell %s not found in the sandbox" % shell_argv[0]) from None
        if cgroup is not None:
            cgroup.add(proc.pid)
        return proc

    def _pump(
        self,
        rid: int,
        proc: subprocess.Popen[bytes],
        channels: dict[int, int],
        cancel: threading.Event,
        timeout: float | None = None,
        cgroup: limits.Cgroup | None = None,
    ) -> bool:
        """Stream what the process writes to ``channels`` (fd -> channel) until it exits;
        kill its tree on timeout or cancel. True if it timed out."""
        channels = dict(channels)
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
                chunk = read_available(fd)
                if chunk is None:
                    del channels[fd]
                elif chunk:
                    self.send(P.encode(P.DATA, chunk, rid, channels[fd]))
            if cancel.is_set() or (deadline is not None and time.monotonic() >= deadline):
                timed_out = not cancel.is_set()
                self._end(proc, cgroup)
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            # The shell exited but a background child still holds the pipes (or
            # the terminal): deliver what is already there, then stop waiting for EOF.
            if exited_at is not None and not ready and time.monotonic() - exited_at > 0.05:
                break
        return timed_out

    def op_cancel(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.local.port.cancels.get(int(msg.get("target", -1)))
        if event is not None:
            event.set()

    # -- terminals ------------------------------------------------------
    @staticmethod
    def _winsize(msg: dict[str, Any]) -> tuple[int, int]:
        rows, cols = msg.get("rows", 24), msg.get("cols", 80)
        if not (isinstance(rows, int) and isinstance(cols, int) and 0 < rows < 10000 and 0 < cols < 10000):
            raise Failure("invalid", "rows and cols must be integers from 1 to 9999")
        return rows, cols

    def op_pty(self, rid: int, msg: dict[str, Any]) -> None:
        """A login shell (or ``cmd``) on a terminal of its own; the host's keys come as
        stdin data, the screen goes back on stdout, ``resize`` follows the host's window."""
        port: Port = self.local.port
        rows, cols = self._winsize(msg)
        env, cwd = self._command_env(msg)
        term = msg.get("term") or "xterm-256color"
        if not isinstance(term, str) or not P.PLAIN_WORD.fullmatch(term) or len(term) > 64:
            raise Failure("invalid", "bad terminal type %r" % term)
        env["TERM"] = term
        argv = ["/bin/bash", "-l"] if msg.get("cmd") is None else ["/bin/bash", "-lc", self._cmd(msg)]
        feed = port.inputs[rid]
        master, slave = os.openpty()
        cgroup = self._cgroup()
        try:
            set_winsize(master, rows, cols)
            # setsid -c: a session of its own, with this terminal as its controlling one.
            proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
            if cgroup is not None:
                cgroup.add(proc.pid)
        except BaseException:
            os.close(master)
            self._cgroup_done(cgroup)
            raise
        finally:
            os.close(slave)
        cancel = self._cancel_event(rid)
        port.terminals[rid] = master
        feed.start(master, owned=False)
        try:
            self._pump(rid, proc, {master: P.STDOUT}, cancel, None, cgroup)
        finally:
            port.terminals.pop(rid, None)
            port.cancels.pop(rid, None)
            feed.stop()
            try:
                os.killpg(proc.pid, signal.SIGHUP)  # as a terminal that hangs up does
            except (ProcessLookupError, PermissionError):
                pass
            # Its host went away, or the terminal is gone while the shell runs on
            # (it closed its side): the session ends here either way.
            if cancel.is_set() or proc.poll() is None:
                time.sleep(0.05)
                if proc.poll() is None or cancel.is_set():
                    self._end(proc, cgroup)
            os.close(master)
            proc.wait()
            self._cgroup_done(cgroup)
        self.reply({"op": "exit", "id": rid, "exit_code": proc.returncode, "timed_out": False})

    def op_resize(self, rid: int, msg: dict[str, Any]) -> None:
        rows, cols = self._winsize(msg)
        fd = self.local.port.terminals.get(int(msg.get("target", -1)))
        if fd is None:
            return  # its program has exited meanwhile: nothing to resize
        try:
            set_winsize(fd, rows, cols)  # the kernel signals SIGWINCH to the foreground job
        except OSError:
            pass

    # -- background processes --------------------------------------------
    def op_spawn(self, rid: int, msg: dict[str, Any]) -> None:
        cmd = self._cmd(msg)
        env, cwd = self._command_env(msg)
        direct = direct_argv(cmd, env["PATH"])
        with self.procs_lock:  # the check and the insert together, or racing spawns pass the limit
            running = sum(1 for p in self.procs.values() if p.exit_code is None)
            if running >= self.MAX_BACKGROUND:
                raise Failure("too_many", "%d background processes are running: kill some first" % running)
            cgroup = self._cgroup()
            try:
                proc = self._spawn(direct, ["/bin/bash", "-c", cmd], cwd, env, subprocess.DEVNULL, cgroup)
            except BaseException:
                self._cgroup_done(cgroup)
                raise
            self.procs[proc.pid] = Background(proc, cmd, cgroup)
            # Forget the oldest exited ones beyond the table's size.
            exited = sorted((p for p in self.procs.values() if p.done.is_set()), key=lambda p: p.started)
            for old in exited[: max(0, len(self.procs) - self.MAX_BACKGROUND)]:
                del self.procs[old.proc.pid]
                old.forget()
                self._cgroup_done(old.cgroup)
        self.reply({"op": "ok", "id": rid, "pid": proc.pid})

    def _background(self, msg: dict[str, Any]) -> Background:
        pid = msg.get("pid")
        with self.procs_lock:
            found = self.procs.get(pid) if isinstance(pid, int) else None
        if found is None:
            raise Failure(
                "no_process",
                "it is not a background process started through smolvm in this sandbox "
                "(the agent keeps the last %d)" % self.MAX_BACKGROUND,
            )
        return found

    def op_procs(self, rid: int, msg: dict[str, Any]) -> None:
        with self.procs_lock:
            table = [p.describe() for p in self.procs.values()]
        self.reply({"op": "ok", "id": rid, "procs": table})

    def op_proc_output(self, rid: int, msg: dict[str, Any]) -> None:
        proc = self._background(msg)
        with proc.lock:
            out, err = bytes(proc.output[0]), bytes(proc.output[1])
            dropped = list(proc.dropped)
            code = proc.exit_code
        for channel, data in ((P.STDOUT, out), (P.STDERR, err)):
            for frame in P.encode_data(rid, channel, data):
                self.send(frame)
        self.reply({"op": "ok", "id": rid, **proc.describe(), "exit_code": code, "dropped": dropped})

    def op_proc_wait(self, rid: int, msg: dict[str, Any]) -> None:
        proc = self._background(msg)
        port: Port = self.local.port
        wait = msg.get("wait") or 0
        if not isinstance(wait, (int, float)) or not 0 <= wait <= 3600:
            raise Failure("invalid", "wait must be 0 to 3600 seconds")
        deadline = time.monotonic() + wait
        while not proc.done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or self.local.conn != port.nonce:
                break
        self.reply({"op": "ok", "id": rid, **proc.describe()})

    def op_proc_kill(self, rid: int, msg: dict[str, Any]) -> None:
        proc = self._background(msg)
        # A group outlives its leader while children of it run: kill those too.
        killed = self._end(proc.proc, proc.cgroup)
        self.reply({"op": "ok", "id": rid, "killed": killed})

    # -- files ----------------------------------------------------------
    @staticmethod
    def _guest_path(msg: dict[str, Any]) -> str:
        path = msg.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise Failure("invalid", "path must be absolute")
        return path

    def xfer(self) -> tuple[int, int, mmap.mmap] | None:
        """(fd, size, aligned buffer) of the transfer disk, opened for direct I/O."""
        with self.xfer_open_lock:  # not xfer_lock: a window may hold that for a while
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
        up = {
            "path": path, "tmp": tmp, "fd": fd, "left": size, "mode": mode, "window": 0,
            "lock": threading.Lock(),  # held by a thread copying a window into it
            "aborted": False, "closed": False,
        }  # fmt: skip
        if msg.get("via") == "disk":
            xfer = self.xfer()
            if xfer is None:
                os.close(fd)
                os.unlink(tmp)
                raise Failure("no_disk", "this sandbox has no transfer disk")
            up["window"] = self._window(msg, xfer[1])
        self.local.port.uploads[rid] = up
        if size == 0:
            self._finish_upload(rid, up)

    def upload_data(self, frame: P.Frame) -> None:
        up = self.local.port.uploads.get(frame.stream)
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
            self.local.port.uploads.pop(frame.stream, None)
            self._abort_upload(up)
            code = exc.code if isinstance(exc, Failure) else "os"
            self.error(frame.stream, code, str(exc))

    def op_disk_data(self, rid: int, msg: dict[str, Any]) -> None:
        """The host put the next ``size`` bytes of an upload at the start of the transfer disk."""
        up = self.local.port.uploads.get(rid)
        if up is None:
            return  # cancelled meanwhile
        try:
            with up["lock"]:
                if up["aborted"]:
                    self._discard_upload(up)  # its host left while we waited
                    return
                size = int(msg.get("size", -1))
                if not 0 < size <= min(up["window"], up["left"]):
                    raise Failure("invalid", "bad transfer size %r" % size)
                with self._holding_disk() as (fd, _, buf):
                    view = memoryview(buf)
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
                if up["aborted"]:
                    self._discard_upload(up)
                    return
                if up["left"] == 0:
                    self._finish_upload(rid, up)
                    return
            self.reply({"op": "taken", "id": rid})
        except (OSError, Failure) as exc:
            self.local.port.uploads.pop(rid, None)
            self._abort_upload(up)
            self.error(rid, exc.code if isinstance(exc, Failure) else "os", str(exc))

    @contextmanager
    def _holding_disk(self) -> Iterator[tuple[int, int, mmap.mmap]]:
        """The transfer disk, for this port's request alone while the block runs."""
        xfer = self.xfer()
        if xfer is None:
            raise Failure("no_disk", "this sandbox has no transfer disk")
        with self.xfer_lock:
            self.xfer_owner = self.local.port
            try:
                yield xfer
            finally:
                self.xfer_owner = None

    def op_taken(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.local.port.taken.get(rid)
        if event is not None:
            event.set()

    def _finish_upload(self, rid: int, up: dict[str, Any]) -> None:
        self.local.port.uploads.pop(rid, None)
        up["closed"] = True
        os.fchmod(up["fd"], up["mode"])
        os.close(up["fd"])
        os.replace(up["tmp"], up["path"])
        self.reply({"op": "ok", "id": rid})

    def _abort_upload(self, up: dict[str, Any]) -> None:
        """Close and remove a half-written upload. A thread copying into it right now
        does that itself when its window is done: the reader thread never waits."""
        up["aborted"] = True  # before the try: the copying thread checks it under the lock
        if up["lock"].acquire(blocking=False):
            try:
                self._discard_upload(up)
            finally:
                up["lock"].release()

    @staticmethod
    def _discard_upload(up: dict[str, Any]) -> None:
        if up["closed"]:
            return
        up["closed"] = True
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
        self.local.port.taken[rid] = event
        conn = self.local.conn
        port: Port = self.local.port
        try:
            pos = 0
            while pos < size:
                chunk = min(window, size - pos)
                with self._holding_disk():
                    done = 0
                    while done < chunk:
                        if conn != port.nonce:
                            raise Failure("cancelled", "the host went away")
                        n = min(P.TRANSFER_BLOCK, chunk - done)
                        if os.preadv(src, [view[:n]], pos + done) < n:
                            raise Failure("changed", "file shrank while it was read")
                        os.pwritev(fd, [view[: round_up(n)]], done)
                        done += n
                event.clear()
                if conn != port.nonce:  # sync() sets the nonce before the event
                    raise Failure("cancelled", "the host went away")
                self.reply({"op": "disk_data", "id": rid, "size": chunk})
                if not event.wait(120) or conn != port.nonce:
                    raise Failure("cancelled", "the host stopped taking the file")
                pos += chunk
        finally:
            self.local.port.taken.pop(rid, None)

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


def network_up() -> None:
    """eth0 on QEMU's user network, which reaches nothing by itself; then, for the life of
    the agent, the guest's end of the egress proxy (net.py), at addresses on lo."""
    if not os.path.exists("/sys/class/net/eth0"):
        return
    script = "link set eth0 up\naddr add %s dev eth0\nroute add default via %s\n" % (GUEST_ADDRESS, GATEWAY)
    script += "addr add %s/32 dev lo\naddr add %s/32 dev lo\n" % (P.PROXY_ADDRESS[0], P.HOST_ADDRESS)
    subprocess.run(["ip", "-batch", "-"], input=script.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import net

    net.serve(GUEST_ADDRESS.split("/")[0])


def main() -> None:
    setup_system()
    threading.Thread(target=network_up, daemon=True).start()
    Agent([Port(index, os.open(dev, os.O_RDWR)) for index, dev in find_ports()]).serve()


if __name__ == "__main__":
    main()
