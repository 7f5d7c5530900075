"""Background processes: ``spawn``, and the table of what runs on whoever is connected."""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time

import limits
import protocol as P
from commands import Commands, direct_argv
from wire import Failure, Port, read_available

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any


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


class Processes(Commands):
    MAX_BACKGROUND = 64  # processes kept in the table, running or exited

    def __init__(self) -> None:
        super().__init__()
        self.procs: dict[int, Background] = {}
        self.procs_lock = threading.Lock()

    def op_spawn(self, rid: int, msg: dict[str, Any]) -> None:
        cmd = self._cmd(msg)
        env, cwd, identity = self._command_env(msg)
        direct = direct_argv(cmd, env["PATH"])
        with self.procs_lock:  # the check and the insert together, or racing spawns pass the limit
            running = sum(1 for p in self.procs.values() if p.exit_code is None)
            if running >= self.MAX_BACKGROUND:
                raise Failure("too_many", "%d background processes are running: kill some first" % running)
            cgroup = self._cgroup()
            try:
                proc = self._spawn(direct, ["/bin/bash", "-c", cmd], cwd, env, subprocess.DEVNULL, cgroup, identity)
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
        # Answer once the reaper has its exit code, so a status read after kill shows it ended.
        proc.done.wait(2.0)
        self.reply({"op": "ok", "id": rid, "killed": killed})
