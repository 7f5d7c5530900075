"""SmolVM guest agent: runs inside the sandbox, serves the host over virtio-serial.

Standard library only. Started by the guest's init (see init.sh), restarted
if it dies. It speaks the protocol in protocol.py, which the image build
places beside it. Each of its PORTS virtio-serial ports serves one host connection at a
time: when a port's host leaves (or a SYNC with a new nonce shows another
came), whatever it left running in the foreground is ended. Background
processes (``spawn``) belong to no connection and run on.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P
from files import Files
from processes import Processes
from terminal import Terminals
from watch import Watch
from wire import Failure, Input, Port

READ_PAGES = 64
HANG_UP_GRACE = 1.0  # seconds a port must stay without a host before its foreground work is ended
IDLE_LOOK = 0.25  # seconds between looks at ports with no host, besides the SIGIO a connect raises
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


TRUST_DIR = "/run/smolvm/trust"


class Agent(Terminals, Processes, Files, Watch):
    """Reads every port and hands each request to the room that serves it: commands,
    terminals and background processes (commands.py, terminal.py, processes.py)
    or files (files.py). What they share, answering on the right port, is wire.py."""

    # Operations that may take long run in a thread of their own; the rest are
    # answered by the reader, in order with the data frames that follow them.
    THREADED = frozenset(
        ("exec", "read_file", "disk_data", "spawn", "proc_output", "proc_wait", "proc_kill", "pty", "sync_disks")
        + ("list", "remove", "untar", "tar_out", "watch")
    )

    def __init__(self, ports: list[Port]) -> None:
        super().__init__()
        self.ports = ports

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
            # A rested port is looked at again at least this often: a connect whose SIGIO
            # went missing (seen under QEMU 10, about one call in a hundred) then costs a
            # quarter of a second, not a whole one.
            wait = IDLE_LOOK if idle else None
            if suspects:
                wait = max(0.0, min(wait or IDLE_LOOK, min(suspects.values()) - time.monotonic()))
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
        for event in port.cancels.values():
            event.set()
        self.drop_transfers(port)

    # -- lifecycle ------------------------------------------------------
    def op_identity(self, rid: int, msg: dict[str, Any]) -> None:
        """Make a sandbox its own, at every start (a resumed one holds the saved machine's):
        name, clock, randomness, machine id and the MAC of its network card."""
        import binascii
        import fcntl
        import struct

        name, machine_id, mac = msg.get("hostname"), msg.get("machine_id"), msg.get("mac")
        if not isinstance(name, str) or not 0 < len(name) <= 63:
            raise Failure("invalid", "bad hostname")
        if not isinstance(machine_id, str) or not re.fullmatch(r"[0-9a-f]{32}", machine_id):
            raise Failure("invalid", "bad machine id")
        if not isinstance(mac, str) or not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise Failure("invalid", "bad MAC address")
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(name)
        time.clock_settime(time.CLOCK_REALTIME, float(msg.get("time", 0)))
        # Every clone resumes with the saved random state: mix in the host's
        # fresh bytes and reseed now (RNDADDENTROPY, RNDRESEEDCRNG).
        seed = binascii.a2b_base64(str(msg.get("entropy", "")))
        if len(seed) < 32:
            raise Failure("invalid", "too little entropy")
        with open("/dev/random", "wb") as f:
            fcntl.ioctl(f, 0x40085203, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(f, 0x5207)
        tmp = "/etc/.machine-id.tmp"
        with open(tmp, "w") as f:
            f.write(machine_id + "\n")
        os.chmod(tmp, 0o444)
        os.replace(tmp, "/etc/machine-id")
        set_mac("eth0", bytes.fromhex(mac.replace(":", "")))
        self.reply({"op": "ok", "id": rid})

    def op_trust(self, rid: int, msg: dict[str, Any]) -> None:
        """Trust the host's certificate authorities (PEM text; empty: trust none of them),
        at every start. Kept in /run only, so no disk or image keeps them (a full snapshot's
        memory does, and each copy is sent them again, or none, at its start): a
        bundle of the system's authorities and the host's, which commands are pointed at
        (OpenSSL and Python, curl, git, pip, requests, apt, and node for the host's)."""
        pem = msg.get("certs", "")
        if not isinstance(pem, str) or len(pem) > P.MAX_TRUSTED_PEM or not P.PEM_CERTS.fullmatch(pem):
            raise Failure("invalid", "certs must be PEM certificates")
        os.makedirs(TRUST_DIR, mode=0o755, exist_ok=True)
        if not pem:
            for name in ("host-cas.pem", "ca-bundle.pem", "apt.conf"):
                try:
                    os.unlink(os.path.join(TRUST_DIR, name))
                except FileNotFoundError:
                    pass
            self.trust_env = {}
            self.reply({"op": "ok", "id": rid})
            return
        try:
            with open("/etc/ssl/certs/ca-certificates.crt") as f:
                system = f.read()
        except OSError:
            system = ""
        bundle = os.path.join(TRUST_DIR, "ca-bundle.pem")
        for name, text in (("host-cas.pem", pem), ("ca-bundle.pem", system.rstrip("\n") + "\n" + pem),
                           ("apt.conf", 'Acquire::https::CaInfo "%s";\n' % bundle)):  # fmt: skip
            tmp = os.path.join(TRUST_DIR, "." + name)
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(TRUST_DIR, name))
        names = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
        self.trust_env = {name: bundle for name in names}
        self.trust_env["NODE_EXTRA_CA_CERTS"] = os.path.join(TRUST_DIR, "host-cas.pem")
        self.trust_env["APT_CONFIG"] = os.path.join(TRUST_DIR, "apt.conf")
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


def set_mac(device: str, mac: bytes) -> None:
    """Give ``device`` this hardware address (SIOCSIFHWADDR; virtio-net takes it while up)
    and announce it (arp_notify: a gratuitous ARP), so QEMU's user network, which
    learnt the old one, sends to the new."""
    import fcntl
    import socket
    import struct

    if not os.path.exists(f"/sys/class/net/{device}"):
        return
    with open(f"/sys/class/net/{device}/address") as f:
        if f.read().strip() == mac.hex(":"):
            return
    with open(f"/proc/sys/net/ipv4/conf/{device}/arp_notify", "w") as f:
        f.write("1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, 0x8924, struct.pack("16sH6s8x", device.encode(), 1, mac))


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
