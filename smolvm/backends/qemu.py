"""The QEMU backend: builds the command line, starts QEMU detached, controls it over QMP."""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from .. import protocol
from ..exceptions import HostError, OperationTimeoutError, SmolVMError
from .base import LaunchSpec

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_RING = 1 << 20  # bytes of console output QEMU keeps for `sandbox logs`
# Bumped whenever the devices a guest sees change: a saved template only
# resumes on the same layout.
MACHINE_LAYOUT = 3
NETDEV = "net0"


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed: run 'smolvm setup' as root (Debian package qemu-system-x86)")
    return path


def create_overlay(base: Path, dest: Path, size_mib: int | None = None) -> None:
    """A qcow2 disk at ``dest`` that reads through to ``base`` and keeps its own writes."""
    size = [f"{size_mib}M"] if size_mib else []
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(dest), *size]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HostError("qemu-img is not installed: run 'smolvm setup' as root") from None
    if proc.returncode != 0:
        raise HostError(f"could not create a disk: {proc.stderr.strip()}")


def tsc_khz(
    cpuinfo: Path = Path("/proc/cpuinfo"), sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
) -> int | None:
    """The host's TSC rate: under TCG the guest's TSC ticks at it, and the
    kernel's own calibration against the emulated PIT sometimes hangs. The
    kernel's own figure when it exports one, else cpuinfo's (the TSC rate on
    virtual machines, which do not scale their clock)."""
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def kernel_cmdline(spec: LaunchSpec, khz: int | None) -> str:
    args = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", f"smolvm.hostname={spec.vm_id}"]
    # Skip what a single-tenant, emulated guest pays for and does not need:
    # speculation mitigations, crypto self-tests, LSMs, audit, a PCI scan.
    args += ["mitigations=off", "cryptomgr.notests", "lsm=capability", "audit=0", "pci=off", "8250.nr_uarts=1"]
    args += ["random.trust_cpu=on", "nowatchdog", "no_timer_check"]
    args += ["initcall_blacklist=init_kprobe_trace,crypto_kdf108_init"]  # ~0.15 s of boot, unused here
    if spec.accel == "tcg":
        args += ["tsc=reliable"] + ([f"tsc_early_khz={khz}"] if khz else [])
    if spec.resize_disk:
        args.append("smolvm.resize=1")
    return " ".join(args)


def opt(value: object) -> str:
    """A value inside a QEMU option string, where a comma would start the next option."""
    return str(value).replace(",", ",,")


def transfer_disk_args(spec: LaunchSpec) -> list[str]:
    """The bulk-transfer disk, after the root disk so the guest still sees root as vda."""
    if spec.transfer_disk is None:
        return []
    return [
        "-drive", f"id=xfer,file={opt(spec.transfer_disk)},format=raw,if=none,cache=writeback",
        "-device", f"virtio-blk-device,drive=xfer,serial={protocol.TRANSFER_SERIAL}",
    ]  # fmt: skip


def network_args(spec: LaunchSpec) -> list[str]:
    """User-mode networking (slirp) in its closed form: the guest reaches nothing by
    itself, not even the host, and no rule here lets it out. Its way out is the
    egress proxy (smolvm/netproxy.py), which SmolVM starts for a sandbox with
    egress and reaches the guest through a forward added at run time; the host
    reaches the guest only through such forwards, on 127.0.0.1."""
    netdev = f"user,id={NETDEV},restrict=on,ipv6=off"
    return ["-netdev", netdev, "-device", f"virtio-net-device,netdev={NETDEV}"]


def agent_port_args(spec: LaunchSpec) -> list[str]:
    """The agent's virtio-serial ports, each a unix socket QEMU serves to one client at a
    time, then the net port the egress proxy connects to (there in every sandbox, so a
    saved template resumes with or without egress)."""
    ports = len(spec.agent_sockets) + 2  # port 0 is a console's
    args = ["-device", f"virtio-serial-device,max_ports={ports}"]
    for i, sock in enumerate(spec.agent_sockets):
        args += ["-chardev", f"socket,id=agent{i},path={opt(sock)},server=on,wait=off"]
        args += ["-device", f"virtserialport,chardev=agent{i},name={protocol.PORT_NAME}.{i}"]
    args += ["-chardev", f"socket,id=net,path={opt(spec.net_socket)},server=on,wait=off"]
    args += ["-device", f"virtserialport,chardev=net,name={protocol.NET_PORT_NAME}"]
    return args


def qmp_arg(spec: LaunchSpec) -> str:
    return f"unix:{opt(spec.control_socket)},server=on,wait=off"


def qemu_argv(spec: LaunchSpec, binary: str = QEMU_BINARY, khz: int | None = None) -> list[str]:
    """The full QEMU command line for one sandbox. Pure: no I/O."""
    cpu = "host" if spec.accel == "kvm" else "max"
    return [
        binary,
        "-name", f"smolvm-{spec.vm_id}",
        "-M", f"microvm,accel={spec.accel}",
        "-cpu", cpu,
        "-m", str(spec.memory),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec, khz),
        "-chardev", f"ringbuf,id=console,size={CONSOLE_RING}",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={opt(spec.disk)},format=qcow2,if=none,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        *transfer_disk_args(spec),
        *agent_port_args(spec),
        *network_args(spec),
        "-device", "virtio-rng-device",
        "-qmp", qmp_arg(spec),
        "-sandbox", "on,obsolete=deny,resourcecontrol=deny",  # spawn= and elevateprivileges= deny break -daemonize,
        "-daemonize",
        "-pidfile", str(spec.pidfile),
        *(["-incoming", f"exec:cat {shlex.quote(str(spec.incoming))}"] if spec.incoming else []),
    ]  # fmt: skip


def qmp(socket: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Run one QMP command against a sandbox's QEMU and return its result."""

    async def go() -> Any:
        client = QMPClient("smolvm")
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        try:
            return await asyncio.wait_for(client.execute(command, args), timeout)
        finally:
            await client.disconnect()

    result: list[Any] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(asyncio.run(go()))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    # A thread of its own, so callers already inside an event loop can use it too.
    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    thread.join(timeout * 2 + 1)
    if thread.is_alive():
        raise OperationTimeoutError(f"QEMU did not answer {command!r} within {timeout:.0f}s")
    if error:
        exc = error[0]
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            raise OperationTimeoutError(f"QEMU did not answer {command!r} within {timeout:.0f}s") from None
        raise SmolVMError(f"QEMU refused {command!r}: {exc}") from exc
    return result[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QemuBackend:
    name = "qemu"

    def launch(self, spec: LaunchSpec) -> int:
        binary = qemu_binary()
        spec.pidfile.unlink(missing_ok=True)
        for sock in (*spec.agent_sockets, spec.net_socket, spec.control_socket):
            sock.unlink(missing_ok=True)
        argv = qemu_argv(spec, binary, tsc_khz() if spec.accel == "tcg" else None)
        # -daemonize: QEMU forks, and its parent exits once the machine is set up,
        # so the sandbox outlives this process and errors still reach us here.
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise HostError("QEMU took over a minute to start; 'smolvm doctor' checks the host") from None
        if proc.returncode != 0:
            raise HostError(f"QEMU failed to start: {proc.stderr.strip()[-1500:]}; 'smolvm doctor' checks the host")
        try:
            pid = int(spec.pidfile.read_text().strip())
        except (OSError, ValueError):
            raise HostError("QEMU started but wrote no pid file; 'smolvm doctor' checks the host") from None
        if spec.incoming is not None:
            self._resume_incoming(spec, pid)
        return pid

    def _resume_incoming(self, spec: LaunchSpec, pid: int, timeout: float = 60.0) -> None:
        """Wait until the saved state is loaded, then run the machine (it was saved stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = qmp(spec.control_socket, "query-status").get("status")
            except SmolVMError as exc:  # QEMU gave up on the state and is exiting under us
                self.stop(spec, pid, timeout=2)
                raise HostError(f"QEMU could not load the saved sandbox state ({exc})") from None
            if status != "inmigrate":
                break
            if time.monotonic() > deadline or not self.owns(spec, pid):
                self.stop(spec, pid, timeout=2)
                raise HostError("QEMU could not load the saved sandbox state; 'smolvm setup' makes it anew")
            time.sleep(0.01)
        if status != "paused":
            self.stop(spec, pid, timeout=2)
            raise HostError(f"QEMU loaded the saved sandbox state into an unexpected state {status!r}")
        qmp(spec.control_socket, "cont")

    def save(self, spec: LaunchSpec, dest: Path, timeout: float = 120.0) -> None:
        qmp(spec.control_socket, "stop")
        qmp(spec.control_socket, "migrate", {"uri": f"exec:cat > {shlex.quote(str(dest))}"})
        deadline = time.monotonic() + timeout
        while True:
            info = qmp(spec.control_socket, "query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise HostError(f"saving the machine state failed: {info.get('error-desc', status)}")
            time.sleep(0.05)

    def owns(self, spec: LaunchSpec, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return qmp_arg(spec).encode() in cmdline

    def forward(self, spec: LaunchSpec, host_port: int, guest_port: int) -> None:
        """Let 127.0.0.1:``host_port`` on the host reach ``guest_port`` in the guest."""
        rule = f"tcp:127.0.0.1:{host_port}-:{guest_port}"
        answer = qmp(spec.control_socket, "human-monitor-command", {"command-line": f"hostfwd_add {NETDEV} {rule}"})
        if isinstance(answer, str) and answer.strip():
            raise HostError(f"QEMU could not forward 127.0.0.1:{host_port}: {answer.strip()[:300]}")

    def unforward(self, spec: LaunchSpec, host_port: int) -> None:
        rule = f"tcp:127.0.0.1:{host_port}"
        answer = qmp(spec.control_socket, "human-monitor-command", {"command-line": f"hostfwd_remove {NETDEV} {rule}"})
        if isinstance(answer, str) and "removed" not in answer:
            raise HostError(f"QEMU could not remove the forward of 127.0.0.1:{host_port}: {answer.strip()[:300]}")

    def pause(self, spec: LaunchSpec) -> None:
        qmp(spec.control_socket, "stop")

    def resume(self, spec: LaunchSpec) -> None:
        qmp(spec.control_socket, "cont")

    def console(self, spec: LaunchSpec) -> bytes:
        data = qmp(spec.control_socket, "ringbuf-read", {"device": "console", "size": CONSOLE_RING, "format": "base64"})
        return base64.b64decode(data) if isinstance(data, str) else b""

    def stop(self, spec: LaunchSpec, pid: int | None, timeout: float = 5.0) -> None:
        try:
            qmp(spec.control_socket, "quit", timeout=timeout)
        except (SmolVMError, OSError):
            pass  # not answering: ended below
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid) and self.owns(spec, pid):
            time.sleep(0.02)
        if pid_alive(pid) and self.owns(spec, pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid) and self.owns(spec, pid):
                time.sleep(0.01)
