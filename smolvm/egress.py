"""A sandbox's egress proxy as a process: started with its machine, ended with it.

The proxy itself is ``smolvm/netproxy.py``, run by path with the standard
library only. A sandbox that may reach nothing (``allowed_domains=[]`` and no
host ports) has none: no process, no forward. Otherwise ``start`` runs it
just before QEMU, so it is on the net port by the time a resumed machine
runs; ``forwarded`` tells it the host port of the one forward to the guest's
NET_RELAY_PORT. It detaches (the pid file in the sandbox's directory names
it), and writes ``netproxy.pid.ready`` once the agent has taken its hello;
``wait_ready`` waits for that. It ends
by itself when QEMU goes; ``stop`` ends it by pid, only if that pid is still
this sandbox's proxy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import netproxy, procfs
from .backends.base import LaunchSpec
from .exceptions import HostError
from .types import InternetSettings

PIDFILE = "netproxy.pid"


def needed(settings: InternetSettings) -> bool:
    """Whether a sandbox with these settings can reach anything at all."""
    return settings.allowed_domains != [] or bool(settings.allow_host_ports)


class EgressProxy:
    def __init__(self, spec: LaunchSpec, proc: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self.proc = proc

    @classmethod
    def start(cls, spec: LaunchSpec, policy: Path, host_ports: tuple[int, ...] | list[int]) -> EgressProxy:
        pidfile = spec.home / PIDFILE
        for stale in (pidfile, spec.home / (PIDFILE + ".ready")):
            stale.unlink(missing_ok=True)
        argv = [sys.executable, "-I", "-S", str(Path(netproxy.__file__)), "--policy", str(policy)]
        argv += ["--net-socket", str(spec.net_socket), "--pidfile", str(pidfile)]
        for port in host_ports:
            argv += ["--host-port", str(port)]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True, cwd="/",
            )  # fmt: skip
        except OSError as exc:
            raise HostError(f"could not start the sandbox's egress proxy: {exc}") from None
        return cls(spec, proc)

    def forwarded(self, forward: int) -> None:
        """Hand the proxy the host port of its forward into the guest."""
        assert self.proc.stdin is not None
        try:
            self.proc.wait(10)  # it detaches at once: what stays is its child
            self.proc.stdin.write(f"{forward}\n".encode())
            self.proc.stdin.close()
        except (OSError, subprocess.TimeoutExpired):
            self.end()
            raise HostError("the sandbox's egress proxy did not start; 'smolvm doctor' checks the host") from None

    def wait_ready(self, timeout: float = 10.0) -> int:
        """Wait until the guest's agent has taken the proxy's hello (the proxy writes
        ``netproxy.pid.ready`` then); its pid. Then the guest's programs can reach what
        the sandbox allows."""
        ready = self.spec.home / (PIDFILE + ".ready")
        deadline = time.monotonic() + timeout
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        pid = pid_of(self.spec)
        if pid is None or not ready.exists():
            self.end()
            raise HostError("the guest never took its egress proxy's hello; 'smolvm doctor' checks the host")
        return pid

    def end(self) -> None:
        """Give up on it (QEMU did not start): its stdin closes, so it exits; and it is ended."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        stop(self.spec)


def owns(spec: LaunchSpec, pid: int) -> bool:
    """Whether ``pid`` is this sandbox's proxy (not a reused pid), and not a zombie."""
    try:
        if procfs.stat(pid)[0] == b"Z":
            return False
        cmdline = procfs.cmdline(pid)
    except (OSError, IndexError):
        return False
    return str(spec.net_socket).encode() in cmdline and any(arg.endswith(b"netproxy.py") for arg in cmdline)


def pid_of(spec: LaunchSpec) -> int | None:
    """The running proxy's pid, or None."""
    try:
        pid = int((spec.home / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    return pid if owns(spec, pid) else None


def stop(spec: LaunchSpec, timeout: float = 2.0) -> None:
    """End the sandbox's proxy if it still runs (it ends by itself when QEMU goes)."""
    pid = pid_of(spec)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while owns(spec, pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if owns(spec, pid):
            os.kill(pid, signal.SIGKILL)
    for name in (PIDFILE, PIDFILE + ".ready"):
        (spec.home / name).unlink(missing_ok=True)
