"""A sandbox's only way out: one process per guest connection, started by QEMU, deciding by policy.

The guest's network reaches nothing by itself (QEMU user networking with
``restrict=on``). QEMU hands each guest connection to
``protocol.PROXY_ADDRESS`` to a fresh ``python -I -S netproxy.py POLICY``
on its stdin/stdout (a ``guestfwd``; run by path, so it imports nothing but
the standard library). That process reads one HTTP proxy request
(``CONNECT host:port`` for HTTPS, an absolute ``http://`` URL for plain
HTTP), checks the name against the policy, resolves it now, checks every
address it got, and only then connects and relays. With ``--host-port N`` it relays to the
host's 127.0.0.1:N instead, for a port the sandbox was allowed. At most
MAX_CONNECTIONS of them relay at once per sandbox.

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
- the Host header sent on is the name that was checked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HEAD_LIMIT = 64 * 1024
MAX_CONNECTIONS = 64  # relayed at once per sandbox; more are refused at once
IDLE_TIMEOUT = 600.0  # a relayed connection with no traffic either way for this long is closed
HEAD_TIMEOUT = 30.0  # to send a whole request head
WEB_PORTS = (80, 443)  # where any allowed name may be reached; an exactly allowed name, on any port
# Addresses that are a cloud host's own: Azure's public wire server, and AWS's IPv6
# metadata address (a unique-local one, which an exact name could otherwise point at).
HOST_ENDPOINTS = frozenset({"168.63.129.16", "fd00:ec2::254"})
LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


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


def read_head(client: socket.socket) -> tuple[bytes, bytes]:
    """The request's head (up to the blank line) and whatever came after it, within HEAD_TIMEOUT."""
    deadline = time.monotonic() + HEAD_TIMEOUT
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT:
            raise Refused("request head too large")
        client.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = client.recv(65536)
        except TimeoutError:
            raise Refused("no complete request in time") from None
        if not chunk:
            raise Refused("the connection closed before a request")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse(head: bytes) -> tuple[str, int, bytes | None]:
    """(host, port, the head to send on) of a proxy request; None to send: a CONNECT tunnel."""
    text = head.decode("latin-1")
    if any(c in text.replace("\r\n", "") for c in "\r\n\0"):
        raise Refused("malformed request: bare line breaks")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise Refused("not an HTTP proxy request")
    method, target, version = parts
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        return normal_host(host), check_port(port), None
    if not target.lower().startswith("http://"):
        raise Refused("only http:// URLs and CONNECT go through this proxy")
    rest = target[len("http://") :]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise Refused("credentials in the URL are not passed on")
    host, colon, port = authority.rpartition(":") if not authority.endswith("]") else (authority, "", "")
    if not colon:
        host, port = authority, "80"
    host, number = normal_host(host), check_port(port)
    # The server is told the host that was checked, whatever the guest wrote.
    skip = ("host:", "connection:", "proxy-")
    headers = [line for line in lines[1:] if not line.lower().startswith(skip)]
    authority = f"[{host}]" if ":" in host else host
    authority += "" if number == 80 else f":{number}"
    first = f"{method} {slash}{path} {version}"
    out = "\r\n".join([first, f"Host: {authority}", *headers, "Connection: close"]) + "\r\n\r\n"
    return host, number, out.encode("latin-1")


def normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise Refused("no host in the request")
    return host


def check_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise Refused(f"bad port {text!r}")
    return int(text)


def relay(client: socket.socket, upstream: socket.socket) -> None:
    """Copy both ways until both sides are done; an end of one direction is passed on."""
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


def serve_proxy(client: socket.socket, policy: Policy) -> None:
    try:
        head, rest = read_head(client)
        host, port, forward = parse(head)
        addresses = policy.addresses(host, port)
    except Refused as exc:
        refuse(client, str(exc))
        return
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
    for sock in (client, upstream):
        sock.settimeout(IDLE_TIMEOUT)  # a send that makes no progress for this long ends the relay
    with upstream:
        if forward is None:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.sendall(forward)
        if rest:
            upstream.sendall(rest)
        relay(client, upstream)


def serve_host_port(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return  # nothing listens there: the guest sees the connection close
    for sock in (client, upstream):
        sock.settimeout(IDLE_TIMEOUT)
    with upstream:
        relay(client, upstream)


def take_slot(policy_path: str) -> int | None:
    """One of the sandbox's MAX_CONNECTIONS slots (a locked file, freed when this
    process ends, however it ends), or None when all are taken."""
    import fcntl
    import random

    slots = policy_path + ".slots"
    os.makedirs(slots, mode=0o700, exist_ok=True)
    start = random.randrange(MAX_CONNECTIONS)
    for i in range(MAX_CONNECTIONS):
        fd = os.open(os.path.join(slots, str((start + i) % MAX_CONNECTIONS)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    return None


def main(argv: list[str]) -> int:
    """netproxy.py POLICY [--host-port N]; QEMU gives the guest's connection as stdin and stdout."""
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--host-port"):
        return 2
    # QEMU wires stderr to the guest's connection too: nothing of ours goes there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    client = socket.socket(fileno=os.dup(0))
    try:
        if take_slot(argv[0]) is None:
            refuse(client, f"this sandbox has {MAX_CONNECTIONS} connections open already: close some")
            return 1
        if len(argv) == 3:
            serve_host_port(client, int(argv[2]))
        else:
            serve_proxy(client, Policy.load(argv[0]))
    except Exception:  # whatever it was, the guest gets a closed connection, and no details
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
