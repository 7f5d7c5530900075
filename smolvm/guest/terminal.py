"""Terminals: ``pty`` (a shell or a command on a terminal of its own) and ``resize``."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import protocol as P
from commands import Commands
from wire import Failure, Port

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminals(Commands):
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
        env, cwd, identity = self._command_env(msg)
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
            proc = subprocess.Popen(
                ["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, **identity
            )
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
