"""A sandbox's only way out: one long-lived proxy per sandbox, deciding by policy.

The guest's network reaches nothing by itself (QEMU user networking with
``restrict=on``, no forwards out). The guest agent listens at
``protocol.PROXY_ADDRESS`` (and at HOST_ADDRESS for each allowed host port)
and, for each connection a guest program makes there, asks this process over
the sandbox's ``org.smolvm.net`` virtio-serial port (``open``). This process
either refuses it there and then, or connects back to the agent through the
one forward SmolVM set up (127.0.0.1:H on the host to the guest's
NET_RELAY_PORT), opening with its token and the connection id, and the agent
joins the two. On that connection it reads one HTTP proxy request (``CONNECT
host:port`` for HTTPS, an absolute ``http://`` URL for plain HTTP), checks the
name against the policy, resolves it now, checks every address it got, and
only then connects and relays; for an allowed host port it relays to the
host's 127.0.0.1 at that port. At most MAX_CONNECTIONS relay at once. It is
started by SmolVM.start() (smolvm/egress.py), run by path with the standard
library only, and ends when QEMU does. A sandbox with no egress has none.

Policy (a JSON file the host writes when the sandbox starts):
- ``allowed_domains`` null: any name, but only public addresses.
- a list: only those names (``example.org``) and subdomains (``*.example.org``);
  an exact name may resolve to a private address, a wildcard may not;
  IP literals are refused.
- ports 80 and 443; any port only for an exactly allowed name.
- only addresses IANA's special-purpose registries call globally reachable
  (our own copy of them, SPECIAL_PURPOSE, so every Python answers alike),
  and for an exact name also private-use ones; never this host's own
  addresses (public ones too) or a cloud host's own endpoints.
- plain HTTP: one request per connection, parsed strictly (RequestParser);
  the Host header sent on is the name that was checked.
- CONNECT: the TLS ClientHello's server name must be the name that was
  checked (ClientHelloReader), unless the target was an address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

if __package__:
    from . import protocol as P
else:  # run by path (python -I -S netproxy.py): protocol.py sits beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol as P  # type: ignore[no-redef]

HEAD_LIMIT = 64 * 1024  # a request head, and a ClientHello, at most this long
MAX_HEADERS = 100
MAX_CONNECTIONS = 64  # relayed at once per sandbox; more are refused at once
IDLE_TIMEOUT = 600.0  # a relayed connection with no traffic either way for this long is closed
HEAD_TIMEOUT = 30.0  # to send a whole request head
HELLO_TIMEOUT = 10.0  # to send a whole TLS ClientHello once a tunnel is open
WEB_PORTS = (80, 443)  # where any allowed name may be reached; an exactly allowed name, on any port
# Addresses that are a cloud host's own: Azure's public wire server, and AWS's IPv6
# metadata address (a unique-local one, which an exact name could otherwise point at).
HOST_ENDPOINTS = frozenset({"168.63.129.16", "fd00:ec2::254"})
LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
PREAMBLE = struct.Struct("!%dsI" % P.NET_TOKEN)  # what opens each connection to the agent: token, connection id


class Refused(Exception):
    pass


def check_domain(entry: object) -> str:
    """An allowlist entry as given by a user: ``name.tld`` or ``*.name.tld``, lower-cased.
    Raises ValueError saying what is wrong."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("a domain must be a non-empty string such as 'example.org' or '*.example.org'")
    name = entry.strip().lower().rstrip(".")
    if any(c in name for c in "/:@ \t?#") or "://" in entry:
        raise ValueError(f"{entry!r} is not a domain name: give the bare name, such as 'example.org'")
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or len(labels) < 2 or not all(LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{entry!r} is not a valid domain name (such as 'example.org' or '*.example.org')")
    if "*" in name.removeprefix("*."):
        raise ValueError(f"{entry!r}: a wildcard is only allowed as the first label, as in '*.example.org'")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ValueError(f"{entry!r} is an IP address: allow names, not addresses")


@dataclass
class Policy:
    allowed_domains: list[str] | None = None
    extra_hosts: dict[str, str] = field(default_factory=dict)  # name -> address, before DNS

    @classmethod
    def load(cls, path: str) -> Policy:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
        return cls(data.get("allowed_domains"), dict(data.get("extra_hosts") or {}))

    def match(self, host: str) -> str | None:
        """How ``host`` is allowed: "any", "exact", "wildcard"; None if it is not."""
        if self.allowed_domains is None:
            return "any"
        if host in self.allowed_domains:
            return "exact"
        if any(entry.startswith("*.") and host.endswith(entry[1:]) for entry in self.allowed_domains):
            return "wildcard"
        return None

    def addresses(self, host: str, port: int) -> list[str]:
        """Where ``host`` may be reached now, resolved at this moment and checked."""
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if self.allowed_domains is not None:
                raise Refused(f"{host} is an address; this sandbox may reach only the names it allows")
            how = "any"
        else:
            if not all(LABEL.fullmatch(label) for label in host.split(".")) or len(host) > 253:
                raise Refused(f"{host!r} is not a valid host name")
            found = self.match(host)
            if found is None:
                raise Refused(f"{host} is not among the domains this sandbox may reach")
            how = found
        if port not in WEB_PORTS and how != "exact":
            ports = " and ".join(map(str, WEB_PORTS))
            raise Refused(f"port {port}: only {ports}, unless the name is allowed exactly")
        if literal is not None:
            candidates = [str(literal)]
        elif host in self.extra_hosts:
            candidates = [self.extra_hosts[host]]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise Refused(f"{host} does not resolve: {exc.strerror}") from None
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [a for a in candidates if address_allowed(ipaddress.ip_address(a), private_ok=how == "exact")]
        if not allowed:
            raise Refused(f"{host} resolves only to addresses this sandbox may not reach ({', '.join(candidates)})")
        return allowed


# IANA's IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and later
# additions, 2025 edition): block, name, and the "Globally Reachable" column
# (None where IANA writes N/A, taken as no). Most specific block decides. Two rows
# are not from those registries but complete them: multicast, and the IPv6 space
# outside global unicast 2000::/3 (IANA's IPv6 Address Space registry).
SPECIAL_PURPOSE: tuple[tuple[str, str, bool | None], ...] = (
    ("0.0.0.0/0", "IPv4 unicast", True),
    ("0.0.0.0/8", "This network", False),
    ("0.0.0.0/32", "This host on this network", False),
    ("10.0.0.0/8", "Private-Use", False),
    ("100.64.0.0/10", "Shared Address Space", False),
    ("127.0.0.0/8", "Loopback", False),
    ("169.254.0.0/16", "Link Local", False),
    ("172.16.0.0/12", "Private-Use", False),
    ("192.0.0.0/24", "IETF Protocol Assignments", False),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", False),
    ("192.0.0.8/32", "IPv4 dummy address", False),
    ("192.0.0.9/32", "Port Control Protocol Anycast", True),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", True),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery", False),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery", False),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", False),
    ("192.31.196.0/24", "AS112-v4", True),
    ("192.52.193.0/24", "AMT", True),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", None),
    ("192.168.0.0/16", "Private-Use", False),
    ("192.175.48.0/24", "Direct Delegation AS112 Service", True),
    ("198.18.0.0/15", "Benchmarking", False),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", False),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", False),
    ("224.0.0.0/4", "Multicast (RFC 5771)", False),
    ("240.0.0.0/4", "Reserved", False),
    ("255.255.255.255/32", "Limited Broadcast", False),
    ("::/0", "Outside global unicast (reserved by the IETF, or listed below)", False),
    ("2000::/3", "Global Unicast", True),
    ("::1/128", "Loopback Address", False),
    ("::/128", "Unspecified Address", False),
    ("::ffff:0:0/96", "IPv4-mapped Address", False),
    ("64:ff9b::/96", "IPv4-IPv6 Translat.", True),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat.", False),
    ("100::/64", "Discard-Only Address Block", False),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", False),
    ("2001::/23", "IETF Protocol Assignments", False),
    ("2001::/32", "TEREDO", None),
    ("2001:1::1/128", "Port Control Protocol Anycast", True),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast", True),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", True),
    ("2001:2::/48", "Benchmarking", False),
    ("2001:3::/32", "AMT", True),
    ("2001:4:112::/48", "AS112-v6", True),
    ("2001:10::/28", "Deprecated (previously ORCHID)", None),
    ("2001:20::/28", "ORCHIDv2", True),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", True),
    ("2001:db8::/32", "Documentation", False),
    ("2002::/16", "6to4", None),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service", True),
    ("3fff::/20", "Documentation", False),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", False),
    ("fc00::/7", "Unique-Local", False),
    ("fe80::/10", "Link-Local Unicast", False),
    ("ff00::/8", "Multicast (RFC 4291)", False),
)
# Globally reachable to IANA, but not to a sandbox: anycast services that the
# nearest server answers, which is the host's own network (its NAT gateway's PCP,
# a TURN or SRP server next to it); and the NAT64 prefix, which reaches whatever
# IPv4 address is embedded in it, private ones too, through the host's translator.
LOCAL_SERVICES = frozenset({"192.0.0.9/32", "192.0.0.10/32", "2001:1::1/128", "2001:1::2/128", "2001:1::3/128",
                            "64:ff9b::/96"})  # fmt: skip
PRIVATE_USE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")  # where an exact name may point
_BLOCKS = sorted(
    ((ipaddress.ip_network(block), block, name, bool(reachable) and block not in LOCAL_SERVICES)
     for block, name, reachable in SPECIAL_PURPOSE),
    key=lambda row: -row[0].prefixlen,
)  # fmt: skip
_PRIVATE = tuple(ipaddress.ip_network(block) for block in PRIVATE_USE)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def special_block(address: Address) -> tuple[str, str, bool]:
    """(block, IANA's name for it, whether a sandbox may reach it) of the most specific
    row of SPECIAL_PURPOSE that holds ``address``."""
    for network, block, name, reachable in _BLOCKS:
        if network.version == address.version and address in network:
            return block, name, reachable
    raise AssertionError("the table has a row for all of each address family")


def address_allowed(address: Address, private_ok: bool) -> bool:
    """Whether a connection may go to ``address``: globally reachable by our table, or
    (``private_ok``, for an exactly allowed name) private-use; never this host's own."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if str(address) in HOST_ENDPOINTS or is_this_host(address):
        return False
    if special_block(address)[2]:
        return True
    return private_ok and any(network.version == address.version and address in network for network in _PRIVATE)


def is_this_host(address: Address) -> bool:
    """Whether ``address`` is one of this host's own (a public one too): only those can be bound."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


# -- requests -------------------------------------------------------------------
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: a method, a header name
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls a header value may not hold (HTAB may)
TARGET = re.compile(rb"[\x21-\x7e]+")  # a request target: visible ASCII
# Hop-by-hop headers, and those the proxy writes itself: never passed on (nor any Proxy-*).
NOT_PASSED_ON = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                           b"te", b"trailer", b"upgrade"})  # fmt: skip


@dataclass(frozen=True)
class Request:
    """A proxy request that passed the parser (the policy is checked after)."""

    host: str  # lower case, no trailing dot, no brackets around an IPv6 address
    port: int
    head: bytes | None  # the head to send on (plain HTTP); None: a CONNECT tunnel
    body: int  # bytes of body that may follow the head; more is a second request
    rest: bytes  # what the client sent after the head, in the same reads


class RequestParser:
    """Reads one HTTP proxy request head, strictly, without doing any I/O: ``feed``
    bytes as they come; it returns the Request once the head is complete, None
    while it needs more, and raises Refused as soon as the bytes cannot be one.

    Strict means: lines end in CRLF only; no obs-fold (a line starting with space
    or tab); a header name is a token right before its colon; at most
    MAX_HEADERS headers and HEAD_LIMIT bytes; for plain HTTP an absolute
    ``http://`` URL, exactly one Host header naming the same host and port, a
    body only by one Content-Length (no Transfer-Encoding), and nothing after
    that body: one request per connection, sent on with ``Connection: close``,
    so a second request (with another Host) can never reach the upstream.
    """

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._line = 0  # where the line being read starts
        self._seen = 0  # bytes before this have been looked at
        self._request_line: tuple[str, str, str] | None = None
        self._target: tuple[str, int, str] | None = None  # host, port, path (plain HTTP: path)
        self._headers: list[tuple[bytes, bytes, bytes]] = []  # (lower-cased name, value, the line)

    def room(self) -> int:
        """How much the next read may ask for: the head never grows past the limit."""
        return max(1, self.limit - len(self._buf))

    def feed(self, data: bytes) -> Request | None:
        room = self.limit - len(self._buf)
        self._buf += data[:room]
        beyond = data[room:]
        buf = self._buf
        while True:
            end = buf.find(b"\n", self._seen)
            stop = len(buf) if end < 0 else end
            cr = buf.find(b"\r", self._seen, stop)
            if cr >= 0 and cr != stop - 1:  # a CR belongs right before a line's LF
                raise Refused("malformed request: a CR that does not end a line")
            if end < 0:
                self._seen = max(self._seen, len(buf) - 1 if buf.endswith(b"\r") else len(buf))
                break
            if end == self._line or buf[end - 1] != 0x0D:
                raise Refused("malformed request: a line that ends without CR (lines end in CRLF)")
            line = bytes(buf[self._line : end - 1])
            self._line = self._seen = end + 1
            if not line:
                return self._finish(bytes(buf[self._line :]) + beyond)
            self._take_line(line)
        if beyond or len(buf) >= self.limit:
            raise Refused(f"request head larger than {self.limit // 1024} KiB")
        return None

    def _take_line(self, line: bytes) -> None:
        if self._request_line is None:
            self._take_request_line(line)
            return
        if line[:1] in (b" ", b"\t"):
            raise Refused("malformed request: a folded header line (obs-fold)")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise Refused("malformed request: a header name must be a token right before its ':'")
        value = value.strip(b" \t")
        if CTL.search(value):
            raise Refused("malformed request: control characters in a header")
        if len(self._headers) >= MAX_HEADERS:
            raise Refused(f"more than {MAX_HEADERS} headers")
        self._headers.append((name.lower(), value, line))

    def _take_request_line(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise Refused("not an HTTP/1 proxy request")
        if not TARGET.fullmatch(parts[1]):
            raise Refused("malformed request target")
        method, target, version = (p.decode("ascii") for p in parts)
        self._request_line = method, target, version
        if method == "CONNECT":
            host, port = authority(target, None)
            self._target = host, port, ""
            return
        if not target[:7].lower() == "http://":
            raise Refused("only http:// URLs and CONNECT go through this proxy")
        rest = target[7:]
        cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        path = rest[cut:]
        if "#" in path:
            raise Refused("a URL fragment is not sent to servers")
        if "@" in rest[:cut]:
            raise Refused("credentials in the URL are not passed on")
        host, port = authority(rest[:cut], 80)
        self._target = host, port, path if path.startswith("/") else "/" + path

    def _finish(self, rest: bytes) -> Request:
        if self._request_line is None or self._target is None:
            raise Refused("malformed request: an empty line before the request")
        method, _, version = self._request_line
        host, port, path = self._target
        values: dict[bytes, list[bytes]] = {}
        for name, value, _ in self._headers:
            values.setdefault(name, []).append(value)
        hosts = values.get(b"host", [])
        if method == "CONNECT":
            if len(hosts) > 1:
                raise Refused("more than one Host header")
            return Request(host, port, None, 0, rest)
        if len(hosts) != 1:
            raise Refused("a plain HTTP request needs exactly one Host header")
        if authority(hosts[0].decode("latin-1"), 80) != (host, port):
            raise Refused("the Host header names another host than the URL")
        if b"transfer-encoding" in values:
            raise Refused("request bodies of unknown length (Transfer-Encoding) are not passed on; use HTTPS")
        lengths = values.get(b"content-length", [])
        if len(lengths) > 1 or lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 15):
            raise Refused("a bad Content-Length")
        body = int(lengths[0]) if lengths else 0
        if len(rest) > body:
            raise Refused("one request per connection: nothing may follow a request's body")
        shown = f"[{host}]" if ":" in host else host
        shown += "" if port == 80 else f":{port}"
        kept = [line for name, _, line in self._headers if name not in NOT_PASSED_ON and not name.startswith(b"proxy-")]
        first = f"{method} {path} {version}\r\nHost: {shown}\r\n".encode("ascii")
        head = first + b"".join(line + b"\r\n" for line in kept) + b"Connection: close\r\n\r\n"
        return Request(host, port, head, body, rest)


def authority(text: str, default_port: int | None) -> tuple[str, int]:
    """(host, port) of ``host:port``, ``[v6]:port`` or (with a default port) a bare host."""
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket or ":" not in inside:
            raise Refused("malformed IPv6 address in the request")
        host, port_text = inside, after.removeprefix(":") if after else None
        if after and not after.startswith(":"):
            raise Refused("malformed host in the request")
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        if ":" in port_text if port_text else False:
            raise Refused("an IPv6 address must be in brackets")
    if port_text is None:
        if default_port is None:
            raise Refused("no port in the request")
        port = default_port
    else:
        port = check_port(port_text)
    return normal_host(host), port


def normal_host(host: str) -> str:
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host
    if not host:
        raise Refused("no host in the request")
    return host


def check_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise Refused(f"bad port {text[:20]!r}")
    return int(text)


# -- TLS ClientHello --------------------------------------------------------------
class Cursor:
    """Reads the fields of a TLS structure, refusing what runs past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Refused("malformed TLS ClientHello")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        """A field preceded by its length in ``size`` bytes."""
        return self.take(self.number(size))

    def done(self) -> bool:
        return self.pos == len(self.data)


class ClientHelloReader:
    """Reads the TLS ClientHello a client sends first in a tunnel, without doing any
    I/O: ``feed`` bytes; it returns True once the whole ClientHello is in (then
    ``server_name`` is its SNI, None if it has none), False while it needs more,
    and raises Refused for anything else. ``data`` is every byte fed, to send on
    unchanged. A ClientHello may be cut across several records; at most ``limit``
    bytes are read."""

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.server_name: str | None = None
        self._record = 0  # where the next record starts in data
        self._handshake = bytearray()

    def room(self) -> int:
        return max(1, self.limit - len(self.data))

    def feed(self, chunk: bytes) -> bool:
        if len(self.data) + len(chunk) > self.limit:
            raise Refused(f"TLS ClientHello larger than {self.limit // 1024} KiB")
        self.data += chunk
        while len(self.data) - self._record >= 5:
            kind, major, _, length = struct.unpack_from("!BBBH", self.data, self._record)
            if kind != 22 or major != 3 or not 0 < length <= 1 << 14:
                raise Refused("a tunnel must start with a TLS ClientHello")
            start = self._record + 5
            if len(self.data) < start + length:
                return False
            self._handshake += self.data[start : start + length]
            self._record = start + length
            if len(self._handshake) >= 4:
                if self._handshake[0] != 1:
                    raise Refused("a tunnel must start with a TLS ClientHello")
                end = 4 + int.from_bytes(self._handshake[1:4], "big")
                if end > self.limit:
                    raise Refused(f"TLS ClientHello larger than {self.limit // 1024} KiB")
                if len(self._handshake) >= end:
                    self.server_name = client_hello_name(bytes(self._handshake[4:end]))
                    return True
        return False


def client_hello_name(body: bytes) -> str | None:
    """The host name in a ClientHello's server_name extension (RFC 6066), lower case,
    without a trailing dot; None if it has none. Refused if malformed."""
    hello = Cursor(body)
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.done():
        return None  # no extensions at all
    extensions = Cursor(hello.vector(2))
    if not hello.done():
        raise Refused("malformed TLS ClientHello")
    seen: set[int] = set()
    name = None
    while not extensions.done():
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise Refused("a TLS ClientHello with an extension twice")
        seen.add(kind)
        if kind != 0:
            continue
        outer = Cursor(data)
        names = Cursor(outer.vector(2))
        if not outer.done() or names.done():
            raise Refused("malformed TLS server name")
        while not names.done():
            if names.number(1) != 0 or name is not None:
                raise Refused("a TLS server name must be one host name")
            raw = names.vector(2)
            if not raw or not raw.isascii():
                raise Refused("malformed TLS server name")
            name = normal_host(raw.decode("ascii"))
    return name


def check_server_name(request: Request, hello: ClientHelloReader) -> None:
    """A tunnel to a name goes on only if TLS asks that server for that same name;
    one to an address (allowed as an address, by the default policy) carries any."""
    if is_address(request.host):
        return
    if hello.server_name is None:
        raise Refused(f"the TLS ClientHello names no server; this tunnel is for {request.host}")
    if hello.server_name != request.host:
        raise Refused(f"the TLS ClientHello names {hello.server_name[:255]}, not {request.host}")


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def relay(client: socket.socket, upstream: socket.socket, budget: int | None = None) -> None:
    """Copy both ways until both sides are done; an end of one direction is passed on.
    ``budget``: how many more bytes the client may send (a request's body); a client
    that sends more is starting a second request, and the connection ends."""
    sel = selectors.DefaultSelector()
    pairs = {client.fileno(): (client, upstream), upstream.fileno(): (upstream, client)}
    for fd in pairs:
        sel.register(fd, selectors.EVENT_READ)
    open_ = 2
    while open_:
        events = sel.select(IDLE_TIMEOUT)
        if not events:
            return
        for key, _ in events:
            src, dst = pairs[key.fd]
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if data and src is client and budget is not None:
                if len(data) > budget:
                    return
                budget -= len(data)
            if data:
                try:
                    dst.sendall(data)
                except OSError:
                    return
                continue
            sel.unregister(key.fd)
            open_ -= 1
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def refuse(client: socket.socket, reason: str) -> None:
    body = f"smolvm: {reason}\n".encode()
    head = f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    try:
        client.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
    except OSError:
        pass


def read_request(client: socket.socket) -> Request:
    """The client's request, read within HEAD_TIMEOUT; never more than HEAD_LIMIT of it."""
    deadline = time.monotonic() + HEAD_TIMEOUT
    parser = RequestParser()
    while True:
        chunk = receive(client, parser.room(), deadline, "no complete request in time")
        if not chunk:
            raise Refused("the connection closed before a request")
        request = parser.feed(chunk)
        if request is not None:
            return request


def read_client_hello(client: socket.socket, first: bytes) -> ClientHelloReader:
    """The TLS ClientHello that opens a tunnel, read within HELLO_TIMEOUT."""
    deadline = time.monotonic() + HELLO_TIMEOUT
    hello = ClientHelloReader()
    done = hello.feed(first) if first else False
    while not done:
        chunk = receive(client, hello.room(), deadline, "no TLS ClientHello in time")
        if not chunk:
            raise Refused("the tunnel closed before a TLS ClientHello")
        done = hello.feed(chunk)
    return hello


def receive(sock: socket.socket, most: int, deadline: float, late: str) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(min(most, 65536))
    except TimeoutError:
        raise Refused(late) from None


def serve_proxy(client: socket.socket, policy: Policy) -> None:
    try:
        request = read_request(client)
        addresses = policy.addresses(request.host, request.port)
    except Refused as exc:
        refuse(client, str(exc))
        return
    host, port = request.host, request.port
    upstream = None
    for address in addresses:
        try:
            upstream = socket.create_connection((address, port), timeout=10)
            break
        except OSError:
            continue
    if upstream is None:
        refuse(client, f"could not connect to {host}:{port}")
        return
    with upstream:
        if request.head is None:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                hello = read_client_hello(client, request.rest)
                check_server_name(request, hello)
            except Refused:
                return  # the client speaks TLS now: a 403 would mean nothing to it
            first, budget = bytes(hello.data), None
        else:
            first, budget = request.head + request.rest, request.body - len(request.rest)
        for sock in (client, upstream):
            sock.settimeout(IDLE_TIMEOUT)  # a send that makes no progress for this long ends the relay
        upstream.sendall(first)
        relay(client, upstream, budget)


def serve_host_port(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return  # nothing listens there: the guest sees the connection close
    for sock in (client, upstream):
        sock.settimeout(IDLE_TIMEOUT)
    with upstream:
        relay(client, upstream)


class Proxy:
    """One sandbox's egress proxy: reads the control frames of its net port (one
    ``open`` per guest connection the agent accepted) and runs each connection it
    takes in a thread of its own, at most MAX_CONNECTIONS at once. One over that
    is answered ``refuse`` from this loop: a frame in, a frame out, no thread."""

    def __init__(
        self, port: socket.socket, policy: Policy, host_ports: frozenset[int], forward: int, token: bytes
    ) -> None:
        self.port, self.policy, self.host_ports, self.forward, self.token = port, policy, host_ports, forward, token
        self.active = 0
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()

    def run(self, ready: Callable[[], None]) -> None:
        """Until QEMU goes (its end of the port closes); ``ready`` once the agent has
        taken the hello (its listeners are up)."""
        decoder = P.Decoder()
        while True:
            try:
                data = self.port.recv(65536)
            except OSError:
                return
            if not data:
                return
            decoder.feed(data)
            for frame in decoder.frames():
                try:
                    msg = frame.msg()
                except P.ProtocolError:
                    continue
                if msg["op"] == "open":
                    self.open(msg)
                elif msg["op"] == "ready":
                    ready()
                elif msg["op"] == "want_hello":  # the agent was restarted after our hello
                    self.send(self.hello())

    def hello(self) -> dict[str, Any]:
        return {"op": "hello", "id": 0, "token": self.token.hex(), "host_ports": sorted(self.host_ports)}

    def open(self, msg: dict[str, Any]) -> None:
        cid, port = msg.get("id"), msg.get("port")
        if not isinstance(cid, int) or not 0 < cid <= 0xFFFFFFFF or not isinstance(port, int):
            return
        if port != P.PROXY_ADDRESS[1] and port not in self.host_ports:
            self.send({"op": "refuse", "id": cid, "reason": f"port {port} is not one this sandbox may reach"})
            return
        with self.lock:
            full = self.active >= MAX_CONNECTIONS
            if not full:
                self.active += 1
        if full:
            reason = f"this sandbox has {MAX_CONNECTIONS} connections open already: close some"
            self.send({"op": "refuse", "id": cid, "reason": reason})
            return
        threading.Thread(target=self.serve, args=(cid, port), daemon=True).start()

    def serve(self, cid: int, port: int) -> None:
        """Connect to the agent through the forward, say which connection this is, then
        decide and relay as the guest's program asks."""
        try:
            with socket.create_connection(("127.0.0.1", self.forward), timeout=10) as client:
                client.sendall(PREAMBLE.pack(self.token, cid))
                if port == P.PROXY_ADDRESS[1]:
                    serve_proxy(client, self.policy)
                else:
                    serve_host_port(client, port)
        except Exception:  # whatever it was, the guest gets a closed connection, and no details
            pass
        finally:
            with self.lock:
                self.active -= 1

    def send(self, msg: dict[str, Any]) -> None:
        with self.send_lock:
            try:
                self.port.sendall(P.encode_msg(msg))
            except OSError:
                pass


def connect_port(path: str, timeout: float) -> tuple[socket.socket | None, str | None]:
    """The net port's socket, once QEMU has made it (the proxy starts before QEMU), and
    the starter's line if it came meanwhile. No socket if it does not come in time,
    or if the starter gave up on us (closed stdin without a line)."""
    deadline = time.monotonic() + timeout
    line = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock, line
        except OSError:
            sock.close()
        if time.monotonic() > deadline:
            return None, line
        if line is not None:
            time.sleep(0.005)
        elif select.select([sys.stdin], [], [], 0.005)[0]:
            line = sys.stdin.readline()
            if not line:
                return None, line


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    """netproxy.py --policy FILE --net-socket SOCK --pidfile FILE [--host-port N]...

    Detaches at once (the pid file names the process that stays), connects to the
    net port's socket when QEMU has made it, says hello, reads from stdin the host
    port of the forward to the guest's NET_RELAY_PORT (one line), and serves until
    QEMU goes; it writes FILE.ready when the agent says it listens for us. Standard
    library only, run by path, so it starts fast."""
    import argparse

    parser = argparse.ArgumentParser(prog="netproxy.py")
    parser.add_argument("--policy", required=True)
    parser.add_argument("--net-socket", required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--host-port", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    child = os.fork()
    if child:  # the starter reaps this parent at once: the child is nobody's child then
        write_atomically(args.pidfile, str(child))
        os._exit(0)
    policy = Policy.load(args.policy)
    port, line = connect_port(args.net_socket, 60.0)
    if port is None:
        return 1
    proxy = Proxy(port, policy, frozenset(args.host_port), 0, os.urandom(P.NET_TOKEN))
    port.sendall(P.encode_msg(proxy.hello()))
    if line is None:
        line = sys.stdin.readline()  # the starter writes it once the forward is there
    if not line.strip().isdigit():
        return 1
    proxy.forward = int(line)
    proxy.run(lambda: write_atomically(args.pidfile + ".ready", ""))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    os._exit(code)  # without waiting for relay threads: QEMU, and with it every guest connection, has gone
