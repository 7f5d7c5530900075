"""Background processes in a sandbox: started by ``SmolVM.spawn``, kept by the guest agent.

The agent owns them, not a host connection: they run on when the host
process exits or its connection drops, and keep the last ``RING`` bytes of
each output stream. A ``Process`` is only a handle (sandbox and pid), so
any host process can make one again with ``SmolVM.get_process(pid)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from .agent_client import GRACE, clean, exit_status, guest_number
from .exceptions import GuestError, OperationTimeoutError
from .types import CommandResult, VMState

if TYPE_CHECKING:
    from .sandbox import SmolVM

WAIT_SLICE = 60.0  # a long wait is made of waits this long, each on a fresh connection


@dataclass(frozen=True)
class ProcessInfo:
    """One background process as the agent last saw it."""

    pid: int
    cmd: str
    started_at: float  # seconds since the epoch, by the guest's clock
    exit_code: int | None  # None while it runs

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @classmethod
    def from_guest(cls, entry: object) -> ProcessInfo:
        """An entry of the agent's process table, checked."""
        if not isinstance(entry, dict):
            raise GuestError("the guest agent sent a malformed process entry")
        pid, cmd, started, code = entry.get("pid"), entry.get("cmd"), entry.get("started"), entry.get("exit_code")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 22:
            raise GuestError(f"the guest agent sent a bad pid {pid!r}")
        return cls(
            pid=pid,
            cmd=clean(cmd, 1000),
            started_at=guest_number(started, "process start time", 0, 1e12),
            exit_code=None if code is None else exit_status(code),
        )


def _marked(data: bytes, dropped: object) -> bytes:
    """Output with a line saying how much older output the ring buffer let go."""
    if isinstance(dropped, int) and 0 < dropped < 1 << 62:
        return f"[smolvm: {dropped} bytes of earlier output dropped]\n".encode() + data
    return data


class Process:
    """A handle on a background process in a sandbox."""

    def __init__(self, vm: SmolVM, pid: int, cmd: str = "") -> None:
        self.vm = vm
        self.pid = pid
        self.cmd = cmd

    def __repr__(self) -> str:
        return f"Process(vm_id={self.vm.vm_id!r}, pid={self.pid}, cmd={self.cmd!r})"

    def _call(self, op: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        with self.vm._agent() as conn:
            return conn.call(op, timeout=timeout, what=f"process {self.pid}", pid=self.pid, **fields)

    def info(self) -> ProcessInfo:
        return ProcessInfo.from_guest(self._call("proc_wait", wait=0))

    def poll(self) -> int | None:
        """None while it runs, else its exit code (128+N if signal N ended it)."""
        return self.info().exit_code

    @overload
    def output(self, binary: Literal[False] = False) -> tuple[str, str]: ...
    @overload
    def output(self, binary: Literal[True]) -> tuple[bytes, bytes]: ...
    def output(self, binary: bool = False) -> tuple[str, str] | tuple[bytes, bytes]:
        """(stdout, stderr) so far: the last 1 MiB of each, with a marker line
        in front when older output was dropped. Invalid UTF-8 is replaced in str."""
        out, err, _ = self._output()
        if binary:
            return out, err
        return out.decode(errors="replace"), err.decode(errors="replace")

    def _output(self) -> tuple[bytes, bytes, dict[str, Any]]:
        with self.vm._agent() as conn:
            out, err, reply = conn.process_output(self.pid)
        dropped = reply.get("dropped")
        lost = dropped if isinstance(dropped, list) and len(dropped) == 2 else [0, 0]
        return _marked(out, lost[0]), _marked(err, lost[1]), reply

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for it to exit and return its exit code and kept output.
        Still running after ``timeout`` seconds: OperationTimeoutError, and it runs on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
            if self.vm.status is not VMState.RUNNING:
                raise GuestError(f"sandbox {self.vm.vm_id!r} is not running: process {self.pid} went with it")
            if ProcessInfo.from_guest(self._call("proc_wait", timeout=left + GRACE, wait=left)).exit_code is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise OperationTimeoutError(f"process {self.pid} ({self.cmd!r}) still runs after {timeout:g}s")
        out, err, reply = self._output()
        code = reply.get("exit_code")
        return CommandResult(
            exit_code=exit_status(code), stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace")
        )

    def kill(self) -> bool:
        """SIGKILL the process, its process group and its descendants.
        False if nothing of it was left to kill."""
        return self._call("proc_kill").get("killed") is True


__all__ = ["Process", "ProcessInfo"]
