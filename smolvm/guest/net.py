"""The guest's end of the way out: it hands each connection a guest program makes
to the proxy address (or to an allowed host port) to the host's egress proxy.

Standard library only; the agent runs ``serve`` in a thread of its own once eth0
is up. The proxy address and HOST_ADDRESS live on ``lo``, where this module
listens. For each connection it accepts, it asks the host over the
``org.smolvm.net`` virtio-serial port (``open``, with a connection id); the
host either answers ``refuse`` or connects to NET_RELAY_PORT here, through the
one forward it set up, sending its token and that id first. The two
connections are then joined. Nothing else gets through: a connection to
NET_RELAY_PORT without the token of the current host, or for no connection
waiting, is closed. Without a host on the port (a sandbox with no egress) a
connection is refused at once; with one that has not said hello yet, it waits
HELLO_WAIT.

What the host says (its token, the host ports this sandbox may reach) comes in
its ``hello``, so a sandbox resumed from a saved template learns its own.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import protocol as P

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HELLO_WAIT = 3.0  # a connection made before the host's hello waits this long for it
OPEN_WAIT = 10.0  # and, once opened, this long for the host's connection
PREAMBLE_WAIT = 2.0  # a connection to NET_RELAY_PORT must say who it is within this
MAX_PENDING = 256  # connections waiting for the host; more are refused here, costing the host nothing
NO_HOST_CHECK = 5.0  # seconds between looks for a host on the port, besides the driver's wake-up
PREAMBLE = struct.Struct("!%dsI" % P.NET_TOKEN)
CHUNK = 256 * 1024


def find_port() -> str | None:
    """The /dev node of the net port, or None (an image run on an older machine layout)."""
    base = "/sys/class/virtio-ports"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "name")) as f:
                if f.read().strip() == P.NET_PORT_NAME:
                    return "/dev/" + entry
    except OSError:
        pass
    return None


def refusal(reason: str) -> bytes:
    body = ("smolvm: %s\n" % reason).encode()
    head = "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return (head % len(body)).encode() + body


def join(guest: socket.socket, host: socket.socket) -> None:
    """Copy both ways until both are done, an end of one direction passed on; then close both."""

    def copy(src: socket.socket, dst: socket.socket) -> None:
        # One buffer for the connection's life: a fresh one per read would be mapped and
        # faulted in anew each time, which under emulation costs more than the copy.
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(view[:n])
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    for sock in (guest, host):
        sock.setblocking(True)
    other = threading.Thread(target=copy, args=(host, guest), daemon=True)
    other.start()
    copy(guest, host)
    other.join()
    guest.close()
    host.close()


class Waiting:
    """A guest connection the host has not taken yet."""

    __slots__ = ("deadline", "port", "sock")

    def __init__(self, sock: socket.socket, port: int, deadline: float) -> None:
        self.sock, self.port, self.deadline = sock, port, deadline


class Relay:
    """The listeners, the port and the connections in between, all served by one thread."""

    def __init__(self, port_fd: int, address: str) -> None:
        self.fd = port_fd
        os.set_blocking(port_fd, False)
        # Edge-triggered: a port without a host polls as hung up all the time, but the
        # driver wakes its pollers when a host comes, and that edge is what we wait for.
        self.poller = select.epoll()
        self.poller.register(port_fd, select.EPOLLIN | select.EPOLLET)
        self.decoder = P.Decoder()
        self.host = False  # a host is connected to the port
        self.next_look = 0.0
        self.token: bytes | None = None  # the current host's, from its hello
        self.listeners: dict[int, tuple[socket.socket, int]] = {}  # fd -> (socket, the port it is for)
        proxy = self.listen(*P.PROXY_ADDRESS)
        self.listeners[proxy.fileno()] = (proxy, P.PROXY_ADDRESS[1])
        self.host_ports: dict[int, socket.socket] = {}
        self.inbound_listener = self.listen(address, P.NET_RELAY_PORT)
        self.before_hello: list[Waiting] = []
        self.opened: dict[int, Waiting] = {}  # connection id -> its guest connection
        self.inbound: dict[int, tuple[socket.socket, bytearray, float]] = {}  # host connections, before their preamble
        self.next_id = 1

    def listen(self, address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
        self.poller.register(sock.fileno(), select.EPOLLIN)
        return sock

    def forget(self, sock: socket.socket) -> None:
        try:
            self.poller.unregister(sock.fileno())
        except (OSError, ValueError):
            pass
        sock.close()

    # -- the port ------------------------------------------------------------
    def look_for_host(self, now: float) -> None:
        """Whether a host is on the port now (no POLLHUP); its coming and going are acted on."""
        self.next_look = now + NO_HOST_CHECK
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        there = not any(events & select.POLLHUP for _, events in poller.poll(0))
        if there and not self.host:
            self.host = True
            self.decoder = P.Decoder()
            self.read_port()
            if self.host and self.token is None:
                # A host that said hello before we listened (this agent was restarted): again.
                self.send({"op": "want_hello", "id": 0})
        elif not there and self.host:
            self.host_left()

    def host_left(self) -> None:
        self.host = False
        self.token = None
        self.set_host_ports([])
        for waiting in [*self.before_hello, *self.opened.values()]:
            self.refuse(waiting, "the host's proxy has gone")
        self.before_hello.clear()
        self.opened.clear()

    def send(self, msg: dict[str, Any]) -> bool:
        view = memoryview(P.encode_msg(msg))
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                if any(events & select.POLLHUP for _, events in poller.poll(1000)):
                    return False
            except OSError:
                return False
        return True

    def read_port(self) -> None:
        """Everything the host has sent (the port is edge-triggered: read until there is no more)."""
        while self.host:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.host_left()
                return
            self.decoder.feed(data)
            self.take_frames()

    def take_frames(self) -> None:
        for frame in self.decoder.frames():
            try:
                msg = frame.msg()
            except P.ProtocolError:
                continue
            if msg["op"] == "hello":
                self.hello(msg)
            elif msg["op"] == "refuse" and isinstance(msg.get("id"), int):
                waiting = self.opened.pop(msg["id"], None)
                if waiting is not None:
                    self.refuse(waiting, str(msg.get("reason", "refused by the host"))[:500])

    def hello(self, msg: dict[str, Any]) -> None:
        token = bytes.fromhex(str(msg.get("token", "")))
        if len(token) != P.NET_TOKEN:
            return
        if token != self.token:  # a new host: what the last one owed will not come
            for waiting in self.opened.values():
                self.refuse(waiting, "the host's proxy was restarted")
            self.opened.clear()
        self.token = token
        ports = msg.get("host_ports")
        ports = ports if isinstance(ports, list) else []
        self.set_host_ports([p for p in ports if isinstance(p, int) and 0 < p < 65536])
        self.send({"op": "ready", "id": 0})  # the listeners are up: the host's start() may return
        waiting_list, self.before_hello = self.before_hello, []
        for waiting in waiting_list:
            self.open(waiting)

    def set_host_ports(self, ports: list[int]) -> None:
        for port in list(self.host_ports):
            if port not in ports:
                sock = self.host_ports.pop(port)
                self.listeners.pop(sock.fileno(), None)
                self.forget(sock)
        for port in ports:
            if port not in self.host_ports:
                try:
                    sock = self.listen(P.HOST_ADDRESS, port)
                except OSError:
                    continue
                self.host_ports[port] = sock
                self.listeners[sock.fileno()] = (sock, port)

    # -- guest connections ---------------------------------------------------
    def accepted(self, sock: socket.socket, port: int, now: float) -> None:
        self.look_for_host(now)
        waiting = Waiting(sock, port, now + HELLO_WAIT)
        if not self.host:
            self.refuse(waiting, "this sandbox may reach nothing on the network")
        elif len(self.before_hello) + len(self.opened) >= MAX_PENDING:
            self.refuse(waiting, "too many connections are being opened at once")
        elif self.token is None:
            self.before_hello.append(waiting)
        else:
            self.open(waiting)

    def open(self, waiting: Waiting) -> None:
        cid = self.next_id
        self.next_id = self.next_id % 0xFFFFFFFF + 1
        waiting.deadline = time.monotonic() + OPEN_WAIT
        self.opened[cid] = waiting
        if not self.send({"op": "open", "id": cid, "port": waiting.port}):
            self.host_left()

    def refuse(self, waiting: Waiting, reason: str) -> None:
        if waiting.port == P.PROXY_ADDRESS[1]:
            try:
                waiting.sock.send(refusal(reason))  # small: fits a fresh socket's buffer
            except OSError:
                pass
        waiting.sock.close()

    # -- the host's connections ----------------------------------------------
    def read_inbound(self, fd: int) -> None:
        sock, got, deadline = self.inbound[fd]
        try:
            data = sock.recv(PREAMBLE.size - len(got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.inbound[fd]
            self.forget(sock)
            return
        got += data
        if len(got) < PREAMBLE.size:
            return
        del self.inbound[fd]
        self.poller.unregister(fd)
        token, cid = PREAMBLE.unpack(bytes(got))
        waiting = self.opened.get(cid) if self.token is not None and token == self.token else None
        if waiting is None:
            sock.close()  # not the host, or for nothing that waits
            return
        del self.opened[cid]
        threading.Thread(target=join, args=(waiting.sock, sock), daemon=True).start()

    def expire(self, now: float) -> None:
        for waiting in [w for w in self.before_hello if w.deadline <= now]:
            self.before_hello.remove(waiting)
            self.refuse(waiting, "the host's proxy did not answer")
        for cid in [c for c, w in self.opened.items() if w.deadline <= now]:
            self.refuse(self.opened.pop(cid), "the host's proxy did not answer")
        for fd in [fd for fd, (_, _, due) in self.inbound.items() if due <= now]:
            self.forget(self.inbound.pop(fd)[0])

    def serve(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self.next_look:
                self.look_for_host(now)
            deadlines = [w.deadline for w in self.before_hello] + [w.deadline for w in self.opened.values()]
            deadlines += [due for _, _, due in self.inbound.values()]
            wait = max(0.0, min([self.next_look, *deadlines]) - now)
            ready = self.poller.poll(wait)
            now = time.monotonic()
            for fd, _ in ready:
                if fd == self.fd:
                    if self.host:
                        self.read_port()
                    else:
                        self.look_for_host(now)
                elif fd == self.inbound_listener.fileno():
                    self.accept_inbound(now)
                elif fd in self.inbound:
                    self.read_inbound(fd)
                elif fd in self.listeners:
                    sock, port = self.listeners[fd]
                    try:
                        conn, _ = sock.accept()
                    except OSError:
                        continue
                    self.accepted(conn, port, now)
            self.expire(now)

    def accept_inbound(self, now: float) -> None:
        try:
            conn, _ = self.inbound_listener.accept()
        except OSError:
            return
        if len(self.inbound) >= MAX_PENDING:
            conn.close()
            return
        conn.setblocking(False)
        self.inbound[conn.fileno()] = (conn, bytearray(), now + PREAMBLE_WAIT)
        self.poller.register(conn.fileno(), select.EPOLLIN)


def serve(address: str) -> None:
    """Run the guest's end of the egress path for the life of the agent (if the machine has
    the port); the host's connections come to ``address`` (eth0's)."""
    dev = find_port()
    if dev is None:
        return
    Relay(os.open(dev, os.O_RDWR), address).serve()
