"""The QEMU backend: builds the command line, starts QEMU detached, controls it over QMP.

QEMU never starts a process of its own: no -daemonize (this module detaches it),
no exec: migration (saved state moves through file descriptors we open), so its
seccomp filter can deny spawn and privilege changes for the machine's whole life."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from .. import cgroups, jail, mounts, procfs, protocol
from ..exceptions import HostError, OperationTimeoutError, SmolVMError
from .base import LaunchSpec

log = logging.getLogger("smolvm")
# qemu.qmp logs each failed connection of ours (client "smolvm") at ERROR; every
# failure reaches us as an exception, which says it better, and a start polls QMP
# until QEMU serves it. Other users of qemu.qmp in the process keep their logs.
logging.getLogger("qemu.qmp.protocol.smolvm").setLevel(logging.CRITICAL)

QEMU_BINARY = "qemu-system-x86_64"
# qboot, which microvm used by default until QEMU 8 (Debian's later ones take SeaBIOS's
# microvm build, which does not boot a direct kernel here): found in QEMU's data directory.
FIRMWARE = "qboot.rom"
CONSOLE_RING = 1 << 20  # bytes of console output QEMU keeps for `sandbox logs`
# Bumped whenever the devices a guest sees change: a saved template only
# resumes on the same layout.
MACHINE_LAYOUT = 3
NETDEV = "net0"
# What QEMU's seccomp filter denies, besides its default set: obsolete calls,
# starting processes, changing its ids or capabilities, and resource controls
# (nice, affinity, scheduler), so a compromised device model cannot use them.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# A jailed QEMU (see smolvm/jail.py) starts under SmolVM's own filter of the set*id
# calls instead (setid_filter.py): QEMU installs its filter before -run-with changes
# its uid, and its own deny kills it there (SIGSYS, measured on 7.2 and 10).
SECCOMP_JAILED = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
# Disks keep the descriptors opened at start: by default QEMU reopens a disk by
# its name when its use changes (a migration's end makes it read-only), which a
# jailed QEMU cannot do (measured: saving a state failed in bdrv_inactivate_all).
KEEP_OPEN = "auto-read-only=off"
INCOMING_FD = "state"  # the QMP name of the file a machine state is saved to
# QEMU's environment: nothing of this process's (its secrets stay here), and at most
# two malloc arenas, so its address space stays near its memory (glibc reserves
# 64 MiB per arena, up to eight per core, as QEMU's I/O threads come and go).
QEMU_ENV = {"MALLOC_ARENA_MAX": "2"}
# What QEMU may map beyond the guest's memory: TCG's translation cache (1 GiB,
# reserved rather than used), its libraries, two arenas, and the stacks of up to
# 64 I/O threads. Measured: 1.3 GiB beyond it at rest, for 512 MiB and 2 GiB guests.
ADDRESS_OVERHEAD_MIB = 2560
START_TIMEOUT = 60.0
STDERR_KEPT = 64 * 1024  # of QEMU's start-up errors, for the message


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed: run 'smolvm setup' as root (Debian package qemu-system-x86)")
    return path


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str) -> tuple[int, int]:
    """QEMU's major and minor version, from ``--version`` (7.2 if it will not say)."""
    try:
        first = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"version (\d+)\.(\d+)", first)
    except (OSError, subprocess.SubprocessError):
        match = None
    return (int(match.group(1)), int(match.group(2))) if match else (7, 2)


def create_overlay(base: Path, dest: Path, size_mib: int | None = None, *, unsafe: bool = False) -> None:
    """A qcow2 disk at ``dest`` that reads through to ``base`` and keeps its own writes.
    ``unsafe`` (with ``size_mib``): without opening ``base`` at all, for a base a running
    guest's QEMU may be rewriting (qemu-img would follow whatever its header names)."""
    size = [f"{size_mib}M"] if size_mib else []
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *(["-u"] if unsafe else []), "-b", str(base), "-F", "qcow2",
            str(dest), *size]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HostError("qemu-img is not installed: run 'smolvm setup' as root") from None
    if proc.returncode != 0:
        raise HostError(f"could not create a disk: {proc.stderr.strip()}")


def freeze_root_disk(control_socket: Path, overlay: Path, index: int) -> None:
    """Make the running machine's root disk read-only as it is now: from here on its
    writes go to ``overlay``, an empty qcow2 disk made over the current top (an external
    snapshot, which the guest does not notice). QEMU gets the new file as a descriptor
    (``add-fd``), which a jailed QEMU can use where it could open no path. ``index``:
    distinct for each call on one QEMU (it names the fd set and the node)."""
    fd = os.open(overlay, os.O_RDWR | os.O_CLOEXEC)
    try:
        qmp_session(
            control_socket,
            [
                ("add-fd", {"fdset-id": index}),
                ("blockdev-add", {
                    "driver": "qcow2", "node-name": f"top{index}", "backing": None,
                    "file": {"driver": "file", "filename": f"/dev/fdset/{index}"},
                }),
                ("blockdev-snapshot", {"node": "root", "overlay": f"top{index}"}),
            ],
            timeout=30,
            fd=fd,
        )  # fmt: skip
    finally:
        os.close(fd)


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
        "-drive", f"id=xfer,file={opt(spec.transfer_disk)},format=raw,if=none,cache=writeback,{KEEP_OPEN}",
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


def boot_args(spec: LaunchSpec, khz: int | None, incoming_fd: int | None) -> list[str]:
    """The kernel to boot; none for a saved state, whose memory holds the running
    kernel already (QEMU would read and place one only for the state to overwrite)."""
    if incoming_fd is not None:
        return []
    return ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", kernel_cmdline(spec, khz)]


def memory_args(spec: LaunchSpec) -> list[str]:
    """The guest's memory: anonymous, or a file (see ``LaunchSpec.ram``). Mapped private,
    the file is opened read-only (``readonly=on``) yet writable in the guest (``rom=off``,
    QEMU 8.2 on): a QEMU that is taken over cannot change what other machines map."""
    if spec.ram is None:
        return ["-m", str(spec.memory)]
    how = "share=on" if spec.ram_fill else "share=off,readonly=on,rom=off"
    backend = f"memory-backend-file,id={RAM_ID},size={spec.memory}M,mem-path={opt(spec.ram)},{how}"
    return ["-m", str(spec.memory), "-object", backend]


def incoming_args(spec: LaunchSpec, incoming_fd: int | None) -> list[str]:
    """A saved state to load: at once from its descriptor, or, when the memory is mapped
    from a file, once QMP has said that the state leaves it out (``_start_incoming``)."""
    if incoming_fd is None:
        return []
    return ["-incoming", "defer" if spec.ram is not None and not spec.ram_fill else f"fd:{incoming_fd}"]


# QEMU before 8.2 opens a memory file writable even to map it private, which a jailed
# QEMU must not hold (smolvm/snapshots.py); Debian 12 ships 7.2, its backports 10.0.
MAPPED_MEMORY_QEMU = (8, 2)


def mapped_memory_supported(binary: str | None = None) -> bool:
    """Whether this QEMU can map a memory file private through a read-only descriptor."""
    try:
        return qemu_version(binary or qemu_binary()) >= MAPPED_MEMORY_QEMU
    except HostError:
        return False


def machine_key(major: object, minor: object) -> dict[str, Any]:
    """What a saved state loads into only: the QEMU version, device layout and agent protocol."""
    return {"qemu": f"{major}.{minor}", "layout": MACHINE_LAYOUT, "protocol": protocol.VERSION}


RAM_ID = "microvm.ram"  # the name of the guest's memory in a saved state, whatever backs it


def ignore_shared(on: bool) -> list[dict[str, Any]]:
    """The migration capability that leaves memory in a shared file out of a saved state."""
    return [{"capability": "x-ignore-shared", "state": on}]


def qmp_arg(spec: LaunchSpec) -> str:
    return f"unix:{opt(spec.control_socket)},server=on,wait=off"


def qemu_argv(
    spec: LaunchSpec,
    binary: str = QEMU_BINARY,
    khz: int | None = None,
    incoming_fd: int | None = None,
    cell: jail.Jail | None = None,
    share_fds: list[int] | None = None,
    version: tuple[int, int] = (7, 2),
) -> list[str]:
    """The full QEMU command line for one sandbox. Pure: no I/O. ``incoming_fd``: an
    inherited descriptor of ``spec.incoming``, the state to load instead of booting;
    ``cell``: the jail it drops into once it has opened its files."""
    cpu = "host" if spec.accel == "kvm" else "max"
    return [
        binary,
        "-name", f"smolvm-{spec.vm_id}",
        "-M", f"microvm,accel={spec.accel}" + (f",memory-backend={RAM_ID}" if spec.ram else ""),
        "-cpu", cpu,
        *memory_args(spec),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-bios", FIRMWARE,
        *boot_args(spec, khz, incoming_fd),
        "-chardev", f"ringbuf,id=console,size={CONSOLE_RING}",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={opt(spec.disk)},format=qcow2,if=none,discard=unmap,{KEEP_OPEN}",
        "-device", "virtio-blk-device,drive=root",
        *transfer_disk_args(spec),
        *agent_port_args(spec),
        *network_args(spec),
        "-device", "virtio-rng-device",
        *mounts.qemu_args(spec.mounts, share_fds),
        "-qmp", qmp_arg(spec),
        "-sandbox", SECCOMP if cell is None else SECCOMP_JAILED,
        *(cell.args(version) if cell else []),
        *incoming_args(spec, incoming_fd),
    ]  # fmt: skip


def qmp(socket: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Run one QMP command against a sandbox's QEMU and return its result."""
    return qmp_session(socket, [(command, args)], timeout)[-1]


def qmp_session(
    socket: Path, commands: list[tuple[str, dict[str, Any] | None]], timeout: float = 5.0, fd: int | None = None
) -> list[Any]:
    """Run QMP commands in order on one connection (``fd``, if given, is passed to
    QEMU first, for a ``getfd`` among them: it belongs to this connection's monitor)."""
    names = ", ".join(repr(name) for name, _ in commands)

    async def go() -> list[Any]:
        client = QMPClient("smolvm")
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        try:
            if fd is not None:
                client.send_fd_scm(fd)
            return [await asyncio.wait_for(client.execute(name, args), timeout) for name, args in commands]
        finally:
            await client.disconnect()

    result: list[list[Any]] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(asyncio.run(go()))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    # A thread of its own, so callers already inside an event loop can use it too.
    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    thread.join(timeout * (len(commands) + 1) + 1)
    if thread.is_alive():
        raise OperationTimeoutError(f"QEMU did not answer {names} within {timeout:.0f}s")
    if error:
        exc = error[0]
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            raise OperationTimeoutError(f"QEMU did not answer {names} within {timeout:.0f}s") from None
        raise SmolVMError(f"QEMU refused {names}: {exc}") from exc
    return result[0]


def _open_state(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as exc:  # a HostError: the caller boots cold instead
        raise HostError(f"cannot read the saved machine state {path}: {exc.strerror}") from None


SETID_FILTER = Path(__file__).with_name("setid_filter.py")


def limited(argv: list[str], memory_mib: int, cell: jail.Jail | None = None) -> list[str]:
    """``argv`` under a hard cap of its address space, set before QEMU runs (it sets it
    on itself, then becomes QEMU): what QEMU maps bounds what it can take from the host,
    and it cannot raise a hard limit (as a normal user, or jailed with no capabilities).
    Works without cgroups, rootless included. Unjailed, util-linux's ``prlimit`` sets it;
    jailed, ``setid_filter.py`` also loads the filter that keeps QEMU's ids to its jail's
    (15 ms against prlimit's 2, measured), which QEMU's own cannot do there."""
    limit = (memory_mib + ADDRESS_OVERHEAD_MIB) << 20
    if cell is not None:
        return [sys.executable, "-I", "-S", str(SETID_FILTER), str(limit), str(cell.uid), str(cell.gid), *argv]
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise HostError("prlimit is not installed: install util-linux")
    return [prlimit, f"--as={limit}:{limit}", "--", *argv]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cpu_cells(spec: LaunchSpec) -> cgroups.Tree | None:
    """Where the new QEMU's CPU cap goes (smolvm/cgroups.py). A cap asked for that this
    host cannot set is refused before anything starts; the default one's absence is
    said by doctor."""
    cells = cgroups.tree()
    if isinstance(cells, str):
        if spec.cpu_limit is not None:
            raise HostError(
                f"cannot cap sandbox {spec.vm_id!r} at {spec.cpu_limit:g} cores on this host: {cells}; "
                "leave cpu_limit unset, or run SmolVM as root on a cgroup v1 host"
            )
        return None
    return cells


def _cap_cpu(cells: cgroups.Tree, pid: int, spec: LaunchSpec) -> None:
    cells.sweep()
    try:
        cells.place(pid, spec.cpu_limit if spec.cpu_limit is not None else float(spec.vcpus))
    except Exception as exc:  # a thread's: said here, never raised into nothing
        if pid_alive(pid):  # else QEMU failed to start, which launch() says
            log.warning("smolvm: sandbox %s runs with its CPU NOT capped: %s (%s)", spec.vm_id, cells.root, exc)


def _uncap_cpu(pid: int) -> None:
    cells = cgroups.tree()
    if not isinstance(cells, str):
        cgroups.release(cells, pid)


class QemuBackend:
    name = "qemu"

    def launch(self, spec: LaunchSpec) -> int:
        binary = qemu_binary()
        cells = _cpu_cells(spec)
        for sock in (*spec.agent_sockets, spec.net_socket, spec.control_socket):
            sock.unlink(missing_ok=True)
        khz = tsc_khz() if spec.accel == "tcg" else None
        with contextlib.ExitStack() as stack:
            # The jail's uid is reserved by a lock QEMU inherits and holds for its life.
            cell = None
            if self._jailed():
                owner = mounts.qemu_identity(spec.mounts)  # who may read the folders it serves
                # Serving a folder, QEMU needs /proc (9p sets modes through /proc/self/fd),
                # and the folder's descriptor would lead out of any chroot through "..".
                chroot = not spec.mounts
                cell = stack.enter_context(jail.taken_for(spec.home, str(spec.home), owner=owner, chroot=chroot))
            state = stack.enter_context(_open_state(spec.incoming)) if spec.incoming else None
            shares = []
            for mount in spec.mounts:
                shares.append(mounts.open_folder(mount))
                stack.callback(os.close, shares[-1])  # QEMU has its own copy
            argv = qemu_argv(
                spec, binary, khz, incoming_fd=state.fileno() if state else None, cell=cell, share_fds=shares,
                version=qemu_version(binary),
            )  # fmt: skip
            inherited = [state.fileno()] if state else []
            inherited += shares
            inherited += cell.inherited if cell else []
            # A session of its own, so the sandbox outlives this process and a
            # terminal's signals do not reach it; its stderr is read until it runs.
            proc = subprocess.Popen(
                limited(argv, spec.memory, cell), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=inherited, start_new_session=True, env=QEMU_ENV, cwd="/",
            )  # fmt: skip
            jail.record(spec.home, cell)
            if spec.pid_file is not None:
                spec.pid_file.write_text(str(proc.pid))
            # Moving a process into a new cgroup waits on the kernel (15 ms, measured): done
            # while QEMU starts, which is not reaped before (its pid cannot pass on meanwhile).
            capping = None
            if cells is not None:
                capping = threading.Thread(target=_cap_cpu, args=(cells, proc.pid, spec), name="smolvm-cpu-cap")
                capping.start()
            try:
                self._wait_running(spec, proc, settle=capping)
                if spec.incoming is not None:
                    if spec.ram is not None and not spec.ram_fill:
                        assert state is not None
                        self._start_incoming(spec, state.fileno())
                    self._resume_incoming(spec, proc.pid)
            except BaseException:
                if capping is not None:
                    capping.join()
                proc.kill()  # nothing would record or end it otherwise
                proc.wait()
                _uncap_cpu(proc.pid)
                jail.record(spec.home, None)
                if proc.stderr is not None:
                    proc.stderr.close()
                raise
        return proc.pid

    @staticmethod
    def _jailed() -> bool:
        """Whether to jail QEMU: as root, unless this root cannot (then loudly, each start)."""
        if not jail.wanted():
            return False
        reason = jail.blocker()
        if reason is not None:
            log.warning("smolvm: QEMU runs NOT jailed, as root: %s; 'smolvm doctor' says more", reason)
            return False
        return True

    def _wait_running(
        self,
        spec: LaunchSpec,
        proc: subprocess.Popen[bytes],
        timeout: float = START_TIMEOUT,
        settle: threading.Thread | None = None,
    ) -> None:
        """Until QEMU answers on QMP (its machine is built and its main loop runs),
        or it exits, with its own words in the error. It is not reaped (nor its pid
        freed) before ``settle``, a thread acting on that pid, has ended."""
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        while (settle is not None and settle.is_alive()) or proc.poll() is None:
            if spec.control_socket.exists():
                try:
                    qmp(spec.control_socket, "query-status", timeout=1.0)
                    break
                except (SmolVMError, OSError):
                    pass  # listening, but not serving yet
            if time.monotonic() > deadline:  # launch() ends it
                raise HostError("QEMU took over a minute to start; 'smolvm doctor' checks the host")
            time.sleep(0.005)
        if settle is not None:
            settle.join()
        if proc.poll() is not None:
            words = proc.stderr.read(STDERR_KEPT).decode(errors="replace").strip()
            proc.stderr.close()
            how = f"killed by {signal.strsignal(-proc.returncode)}" if proc.returncode < 0 else ""
            said = "; ".join(part for part in (words[-1500:], how) if part) or f"exit status {proc.returncode}"
            raise HostError(f"QEMU failed to start: {said}; 'smolvm doctor' checks the host")
        # Its later words go nowhere, as they would after -daemonize: QEMU ignores
        # SIGPIPE, so a guest that makes it complain cannot fill a disk or block it.
        proc.stderr.close()
        threading.Thread(target=proc.wait, name=f"reap-qemu-{proc.pid}", daemon=True).start()

    @staticmethod
    def _start_incoming(spec: LaunchSpec, fd: int) -> None:
        """Load a state saved without its memory, which QEMU maps from ``spec.ram``."""
        steps: list[tuple[str, dict[str, Any] | None]] = [
            ("migrate-set-capabilities", {"capabilities": ignore_shared(True)}),
            ("migrate-incoming", {"uri": f"fd:{fd}"}),
        ]
        qmp_session(spec.control_socket, steps)

    def _resume_incoming(self, spec: LaunchSpec, pid: int, timeout: float = 60.0) -> None:
        """Wait until the saved state is loaded, then run the machine (it was saved stopped),
        unless it is to be held paused."""
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
        if not spec.hold:
            qmp(spec.control_socket, "cont")

    def save(self, spec: LaunchSpec, dest: Path, ram_apart: bool = False, timeout: float = 120.0) -> None:
        qmp(spec.control_socket, "stop")
        with dest.open("wb") as out:  # QEMU writes through its own copy of the descriptor
            steps: list[tuple[str, dict[str, Any] | None]] = [
                # Set either way: a machine that was itself loaded without its memory has it on.
                ("migrate-set-capabilities", {"capabilities": ignore_shared(ram_apart)}),
                ("getfd", {"fdname": INCOMING_FD}),
                ("migrate", {"uri": f"fd:{INCOMING_FD}"}),
            ]
            qmp_session(spec.control_socket, steps, fd=out.fileno())
        deadline = time.monotonic() + timeout + spec.memory / 100  # a second per 100 MiB beyond
        while True:
            info = qmp(spec.control_socket, "query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                self._cancel_save(spec)
                raise HostError(f"saving the machine state failed: {info.get('error-desc', status)}")
            time.sleep(0.05)

    @staticmethod
    def _cancel_save(spec: LaunchSpec, wait: float = 10.0) -> None:
        """End a save that is still going, so that the machine runs on where it was
        rather than finishing it later and stopping with its disks handed over."""
        try:
            qmp(spec.control_socket, "migrate_cancel")
            deadline = time.monotonic() + wait
            while qmp(spec.control_socket, "query-migrate").get("status") not in ("cancelled", "failed", "completed"):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
        except SmolVMError:
            pass  # not answering: the caller's error says enough

    def machine(self, spec: LaunchSpec) -> dict[str, Any]:
        """What a saved state of this running machine loads into: its QEMU's version (asked
        of it: the binary on disk may be newer), device layout and agent protocol."""
        version = qmp(spec.control_socket, "query-version").get("qemu", {})
        return machine_key(version.get("major"), version.get("minor"))

    def owns(self, spec: LaunchSpec, pid: int) -> bool:
        """By its command line, or, jailed, by its uid: a QEMU that was taken over can
        rewrite its own argv, but not change its uid (it holds no capability), and no
        other process runs as that uid (its lock keeps it this QEMU's)."""
        try:
            cmdline = procfs.cmdline(pid)
            if qmp_arg(spec).encode() in cmdline:
                return True
            uid = jail.recorded(spec.home)
            return uid is not None and cmdline != [b""] and uid in jail.process_uids(pid)
        except OSError:
            return False

    def forward(self, spec: LaunchSpec, host_port: int, guest_port: int) -> None:
        """Let 127.0.0.1:``host_port`` on the host reach ``guest_port`` in the guest."""
        rule = f"tcp:127.0.0.1:{host_port}-:{guest_port}"
        answer = qmp(spec.control_socket, "human-monitor-command", {"command-line": f"hostfwd_add {NETDEV} {rule}"})
        if isinstance(answer, str) and answer.strip():
            jailed = jail.recorded(spec.home) is not None
            hint = (
                " (a jailed QEMU is no longer root: use a port of 1024 or above)" if jailed and host_port < 1024 else ""
            )
            raise HostError(f"QEMU could not forward 127.0.0.1:{host_port}: {answer.strip()[:300]}{hint}")

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
        _uncap_cpu(pid)
        jail.record(spec.home, None)
