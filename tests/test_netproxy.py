"""The egress proxy's pure parts: the request parser, the ClientHello reader, the
address table; and its per-connection I/O against servers on 127.0.0.1.

Everything the guest sends the proxy is hostile input: the property tests feed
it arbitrary bytes, cut arbitrarily, and assert that only ``Refused`` escapes
and that what is held stays within the limits.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolvm import netproxy
from smolvm import protocol as P
from smolvm.netproxy import (
    HEAD_LIMIT,
    ClientHelloReader,
    Policy,
    Refused,
    Request,
    RequestParser,
    address_allowed,
    check_server_name,
)

GOOD = b"GET http://x.org:8080/a?b HTTP/1.1\r\nHost: x.org:8080\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"


def parse(data: bytes, step: int | None = None) -> Request | None:
    """Feed ``data`` whole, or ``step`` bytes at a time. Bytes past the head that were
    not fed yet would reach the relay, which allows a plain request's body and no more."""
    parser = RequestParser()
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        request = parser.feed(data[i : i + step])
        if request is not None:
            later = data[i + step :]
            if later and request.head is not None and len(request.rest) + len(later) > request.body:
                raise Refused("one request per connection (the relay's budget)")
            return request
    return None


# -- the request parser -----------------------------------------------------------


def test_a_plain_request_is_sent_on_with_the_checked_host_and_connection_close() -> None:
    for step in (None, 1, 7):
        request = parse(GOOD, step)
        assert request is not None
        assert (request.host, request.port, request.body, request.rest) == ("x.org", 8080, 0, b"")
        assert request.head == b"GET /a?b HTTP/1.1\r\nHost: x.org:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"


def test_connect_and_its_forms() -> None:
    assert parse(b"CONNECT Example.ORG.:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n\x16\x03") == Request(
        "example.org", 443, None, 0, b"\x16\x03"
    )
    assert parse(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n") == Request("2001:db8::1", 443, None, 0, b"")
    request = parse(b"GET http://x.org HTTP/1.0\r\nHost: X.org:80\r\n\r\n")
    assert request is not None and request.head is not None and request.head.startswith(b"GET / HTTP/1.0\r\n")
    request = parse(b"POST http://x.org/up HTTP/1.1\r\nHost: x.org\r\nContent-Length: 5\r\n\r\nab")
    assert request is not None and (request.body, request.rest) == (5, b"ab")


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"GET http://x.org/ HTTP/1.1\r\nHost : y.org\r\n\r\n", "token"),  # space before the colon
        (b"GET http://x.org/ HTTP/1.1\r\nHost\t: y.org\r\n\r\n", "token"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\nX: a\r\n Host: y.org\r\n\r\n", "obs-fold"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\n\tHost: y.org\r\n\r\n", "obs-fold"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\nHost: y.org\r\n\r\n", "exactly one Host"),
        (b"GET http://x.org/ HTTP/1.1\r\n\r\n", "exactly one Host"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: y.org\r\n\r\n", "another host"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org:81\r\n\r\n", "another host"),
        (
            b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\n\r\nGET http://x.org/ HTTP/1.1\r\nHost: y.org\r\n\r\n",
            "one request",
        ),
        (b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\n", "one request"),
        (b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (
            b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "Content-Length",
        ),
        (b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\nX: a\x00b\r\n\r\n", "control"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\rX: y\r\n\r\n", "CR"),
        (b"GET http://x.org/ HTTP/1.1\nHost: x.org\n\n", "without CR"),
        (b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\n\n", "without CR"),
        (b"GET https://x.org/ HTTP/1.1\r\n\r\n", "only http://"),
        (b"GET /relative HTTP/1.1\r\nHost: x.org\r\n\r\n", "only http://"),
        (b"GET http://u:p@x.org/ HTTP/1.1\r\nHost: x.org\r\n\r\n", "credentials"),
        (b"GET http://x.org/#f HTTP/1.1\r\nHost: x.org\r\n\r\n", "fragment"),
        (b"GET http://::1/ HTTP/1.1\r\n\r\n", "brackets"),
        (b"GET  http://x.org/ HTTP/1.1\r\n\r\n", "HTTP/1"),
        (b"GET http://x.org/ HTTP/2\r\n\r\n", "HTTP/1"),
        (b"G(T http://x.org/ HTTP/1.1\r\n\r\n", "HTTP/1"),
        (b"GET http://x.\xffrg/ HTTP/1.1\r\n\r\n", "target"),
        (b"\r\nGET http://x.org/ HTTP/1.1\r\n\r\n", "empty line"),
        (b"nonsense\r\n", "HTTP/1"),
        (b"CONNECT x.org HTTP/1.1\r\n\r\n", "no port"),
        (b"CONNECT x.org:0 HTTP/1.1\r\n\r\n", "bad port"),
        (b"CONNECT x.org:65536 HTTP/1.1\r\n\r\n", "bad port"),
        (b"CONNECT x.org: HTTP/1.1\r\n\r\n", "bad port"),
        (b"CONNECT x.org:" + b"4" * 5000 + b" HTTP/1.1\r\n\r\n", "bad port"),  # int() of it would raise ValueError
        (b"CONNECT x.org:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
        (b"GET http://x.org/ HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 headers"),
    ],
)
def test_malformed_and_smuggling_requests_are_refused(bad: bytes, why: str) -> None:
    for step in (None, 1):
        with pytest.raises(Refused, match=why):
            parse(bad, step)


def test_a_line_feed_only_request_is_refused_at_its_first_line() -> None:
    parser = RequestParser()
    with pytest.raises(Refused, match="without CR"):
        parser.feed(b"GET http://x.org/ HTTP/1.1\n")  # not "need more": nothing more is waited for


def test_bad_lines_are_refused_before_the_head_is_complete() -> None:
    parser = RequestParser()
    parser.feed(b"GET http://x.org/ HTTP/1.1\r\nHost: x.org\r\n")
    with pytest.raises(Refused, match="obs-fold"):
        parser.feed(b" y\r\n")
    with pytest.raises(Refused, match="only http"):
        RequestParser().feed(b"GET /x HTTP/1.1\r\n")


def test_the_head_never_grows_past_the_limit() -> None:
    parser = RequestParser()
    line = b"GET http://x.org/ HTTP/1.1\r\n"
    assert parser.feed(line) is None
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    with pytest.raises(Refused, match="larger than 64 KiB"):
        for _ in range(100):
            assert parser.room() <= HEAD_LIMIT - len(line)
            parser.feed(filler[: parser.room()])
    assert len(parser._buf) <= HEAD_LIMIT
    # One read that overshoots the limit adds nothing past it.
    parser = RequestParser()
    with pytest.raises(Refused, match="larger than"):
        parser.feed(line + b"X: " + b"a" * (2 * HEAD_LIMIT))
    assert len(parser._buf) == HEAD_LIMIT
    # A head just inside the limit, followed by its body in the same read, is fine.
    head = b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nContent-Length: 100000\r\nX: "
    head += b"a" * (HEAD_LIMIT - len(head) - 4) + b"\r\n\r\n"
    request = RequestParser().feed(head + b"b" * 100000)
    assert request is not None and len(request.rest) == 100000


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 400), max_size=20))
def test_parser_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    fuzz_parser(data, cuts)


def mutations() -> st.SearchStrategy[bytes]:
    """Valid requests with bytes replaced, inserted or removed: near misses find more."""
    base = st.sampled_from(
        [
            GOOD,
            b"CONNECT x.org:443 HTTP/1.1\r\nHost: x.org:443\r\n\r\n",
            b"POST http://x.org/ HTTP/1.1\r\nHost: x.org\r\nContent-Length: 2\r\n\r\nab",
            b"GET http://[2001:db8::1]:81/ HTTP/1.0\r\nHost: [2001:db8::1]:81\r\n\r\n",
        ]
    )
    edits = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 3), st.binary(max_size=3)), max_size=6)

    def apply(pair: tuple[bytes, list[tuple[int, int, bytes]]]) -> bytes:
        data, changes = pair
        for pos, drop, insert in changes:
            pos %= len(data) + 1
            data = data[:pos] + insert + data[pos + drop :]
        return data

    special = st.sampled_from([b"\r", b"\n", b" ", b"\t", b":", b"\x00", b"\xff", b"Host: y.org\r\n"])
    return st.tuples(base, edits).map(apply) | st.tuples(base, st.lists(st.tuples(
        st.integers(0, 200), st.just(0), special), max_size=4)).map(apply)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(data=mutations(), cuts=st.lists(st.integers(1, 50), max_size=10))
def test_parser_fuzz_near_misses(data: bytes, cuts: list[int]) -> None:
    fuzz_parser(data, cuts)


def fuzz_parser(data: bytes, cuts: list[int]) -> None:
    """Only Refused escapes; the buffer stays within the limit; an accepted plain
    request goes on with exactly one Host (the checked one), CRLF lines, no fold,
    and Connection: close; and how the bytes were cut never changes the answer."""
    whole = outcome(data, [len(data) or 1])
    assert outcome(data, cuts or [1]) == whole
    if isinstance(whole, Request) and whole.head is not None:
        lines = whole.head.split(b"\r\n")
        assert lines[-2:] == [b"", b""] and all(b"\n" not in x and b"\r" not in x for x in lines)
        assert all(not x.startswith((b" ", b"\t")) for x in lines)
        hosts = [x for x in lines[1:] if x.lower().startswith(b"host:")]
        assert len(hosts) == 1 and whole.host.encode() in hosts[0]
        assert lines[-3] == b"Connection: close"
        assert not any(x.lower().startswith((b"connection:", b"proxy-")) for x in lines[1:-3])
        assert len(whole.rest) <= whole.body


def outcome(data: bytes, cuts: list[int]) -> object:
    parser = RequestParser()
    pos, i = 0, 0
    try:
        while pos < len(data):
            step = min(cuts[i % len(cuts)], parser.room())
            i += 1
            request = parser.feed(data[pos : pos + step])
            pos += step
            assert len(parser._buf) <= HEAD_LIMIT
            if request is not None:
                # What was not fed yet would have arrived later, for the relay's budget.
                rest = request.rest + data[pos:]
                if request.head is not None and len(rest) > request.body:
                    raise Refused("one request per connection")
                return Request(request.host, request.port, request.head, request.body, rest)
    except Refused as exc:
        return ("refused", str(exc).split(":")[0])
    return None


# -- the TLS ClientHello ----------------------------------------------------------


def client_hello(name: str | None) -> bytes:
    """A real ClientHello, as Python's TLS (OpenSSL) writes it for ``server_hostname``."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS handshake finished without a server")


HELLO = client_hello("example.org")


def read_hello(data: bytes, step: int | None = None) -> ClientHelloReader:
    reader = ClientHelloReader()
    step = step or len(data)
    for i in range(0, len(data), step):
        if reader.feed(data[i : i + step]):
            return reader
    raise AssertionError("the ClientHello was not complete")


def records(handshake: bytes, size: int) -> bytes:
    """``handshake`` cut into TLS handshake records of ``size`` bytes."""
    return b"".join(
        struct.pack("!BHH", 22, 0x0301, len(handshake[i : i + size])) + handshake[i : i + size]
        for i in range(0, len(handshake), size)
    )


def handmade_hello(extensions: bytes | None, tail: bytes = b"") -> bytes:
    """A ClientHello handshake message: version, random, no session, one suite, no compression."""
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    body += tail
    return struct.pack("!B", 1) + len(body).to_bytes(3, "big") + body


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    data = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 0, len(data)) + data


def test_the_server_name_of_real_client_hellos() -> None:
    for name, expected in (("Example.ORG", "example.org"), ("a.b.example.org.", "a.b.example.org")):
        hello = client_hello(name)
        for step in (None, 1, 100):
            reader = read_hello(hello, step)
            assert reader.server_name == expected and bytes(reader.data) == hello
    assert read_hello(client_hello("192.0.2.1")).server_name is None  # no SNI for an address
    assert read_hello(client_hello(None)).server_name is None


def test_a_client_hello_cut_across_records() -> None:
    hello = client_hello("example.org")
    handshake = hello[5:]
    assert read_hello(records(handshake, 100)).server_name == "example.org"
    assert read_hello(records(handshake, 1), 3).server_name == "example.org"
    assert read_hello(records(handmade_hello(None), 10)).server_name is None


@pytest.mark.parametrize(
    "data, why",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "TLS ClientHello"),
        (struct.pack("!BHH", 23, 0x0303, 5) + b"hello", "TLS ClientHello"),  # application data first
        (struct.pack("!BHH", 22, 0x0303, 0), "TLS ClientHello"),  # an empty record
        (struct.pack("!BHH", 22, 0x0303, 1 << 15), "TLS ClientHello"),  # over the record limit
        (records(b"\x02\x00\x00\x00", 4), "TLS ClientHello"),  # a ServerHello
        (records(b"\x01\xff\xff\xff", 4), "larger than"),
        (records(handmade_hello(sni(b"a.org") + sni(b"b.org")), 500), "twice"),
        (records(handmade_hello(sni(b"a.org", b"b.org")), 500), "one host name"),
        (records(handmade_hello(sni(b"a.org", name_type=1)), 500), "one host name"),
        (records(handmade_hello(sni(b"")), 500), "malformed"),
        (records(handmade_hello(sni(b"\xe9.org")), 500), "malformed"),
        (records(handmade_hello(struct.pack("!HH", 0, 0)), 500), "malformed"),
        (records(handmade_hello(sni(b"a.org")[:-1]), 500), "malformed"),
        (records(handmade_hello(None, tail=b"\x00"), 500), "malformed"),  # half an extensions length
        (records(handmade_hello(b"", tail=b"junk"), 500), "malformed"),  # bytes after the extensions
    ],
)
def test_what_is_not_a_client_hello_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why):
        read_hello(data)


def test_a_client_hello_is_bounded() -> None:
    reader = ClientHelloReader()
    big = b"\x01" + (100000).to_bytes(3, "big") + b"\0" * 100000  # what no ClientHello needs
    with pytest.raises(Refused, match="larger than"):
        for i in range(0, 100000, 1000):
            reader.feed(records(big, 16384)[i : i + 1000])
    assert len(reader.data) <= HEAD_LIMIT


def test_the_server_name_must_be_the_tunnels_name() -> None:
    tunnel = Request("example.org", 443, None, 0, b"")
    check_server_name(tunnel, read_hello(client_hello("EXAMPLE.org.")))
    with pytest.raises(Refused, match="names other.org"):
        check_server_name(tunnel, read_hello(client_hello("other.org")))
    with pytest.raises(Refused, match="names no server"):
        check_server_name(tunnel, read_hello(client_hello(None)))
    for host in ("192.0.2.1", "2001:db8::1"):  # an address, allowed as such: any server name
        check_server_name(Request(host, 443, None, 0, b""), read_hello(client_hello("other.org")))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(1, 300), min_size=1, max_size=10))
def test_client_hello_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    fuzz_hello(data, cuts)


@settings(max_examples=400, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(1, 300), min_size=1, max_size=10),
)
def test_client_hello_fuzz_corrupted(edits: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(HELLO)
    for pos, value in edits:
        data[pos % len(data)] = value
    fuzz_hello(bytes(data), cuts)


def fuzz_hello(data: bytes, cuts: list[int]) -> None:
    def run(steps: list[int]) -> object:
        reader = ClientHelloReader()
        pos, i = 0, 0
        try:
            while pos < len(data):
                step = min(steps[i % len(steps)], reader.room())
                i += 1
                if reader.feed(data[pos : pos + step]):
                    return ("hello", reader.server_name)
                pos += step
                assert len(reader.data) <= HEAD_LIMIT
        except Refused:
            return "refused"
        return None

    assert run(cuts) == run([len(data) or 1])


# -- addresses --------------------------------------------------------------------

# IANA's IPv4 and IPv6 Special-Purpose Address Registries, the "Globally Reachable"
# column as IANA writes it (N/A: None), written out here apart from the table the
# proxy carries, so a slip in either shows.
IANA = [
    ("0.0.0.0/8", False), ("0.0.0.0/32", False), ("10.0.0.0/8", False), ("100.64.0.0/10", False),
    ("127.0.0.0/8", False), ("169.254.0.0/16", False), ("172.16.0.0/12", False), ("192.0.0.0/24", False),
    ("192.0.0.0/29", False), ("192.0.0.8/32", False), ("192.0.0.9/32", True), ("192.0.0.10/32", True),
    ("192.0.0.170/32", False), ("192.0.0.171/32", False), ("192.0.2.0/24", False), ("192.31.196.0/24", True),
    ("192.52.193.0/24", True), ("192.88.99.0/24", None), ("192.168.0.0/16", False), ("192.175.48.0/24", True),
    ("198.18.0.0/15", False), ("198.51.100.0/24", False), ("203.0.113.0/24", False), ("240.0.0.0/4", False),
    ("255.255.255.255/32", False),
    ("::1/128", False), ("::/128", False), ("::ffff:0:0/96", False), ("64:ff9b::/96", True),
    ("64:ff9b:1::/48", False), ("100::/64", False), ("100:0:0:1::/64", False), ("2001::/23", False),
    ("2001::/32", None), ("2001:1::1/128", True), ("2001:1::2/128", True), ("2001:1::3/128", True),
    ("2001:2::/48", False), ("2001:3::/32", True), ("2001:4:112::/48", True), ("2001:10::/28", None),
    ("2001:20::/28", True), ("2001:30::/28", True), ("2001:db8::/32", False), ("2002::/16", None),
    ("2620:4f:8000::/48", True), ("3fff::/20", False), ("5f00::/16", False), ("fc00::/7", False),
    ("fe80::/10", False),
]  # fmt: skip
# Reachable to IANA, refused to a sandbox (see netproxy.LOCAL_SERVICES for why).
REFUSED_ANYWAY = {"192.0.0.9/32", "192.0.0.10/32", "2001:1::1/128", "2001:1::2/128", "2001:1::3/128", "64:ff9b::/96"}


def first_and_last() -> Iterator[tuple[str, str, bool]]:
    """(block, address, expected) for the first and last address of every IANA block."""
    for block, reachable in IANA:
        network = ipaddress.ip_network(block)
        for address in (network[0], network[-1]):
            # A more specific block inside this one decides its own first or last address.
            inner = [b for b, _ in IANA if b != block and address in ipaddress.ip_network(b)
                     and ipaddress.ip_network(b).prefixlen > network.prefixlen]  # fmt: skip
            if inner:
                continue
            yield block, str(address), bool(reachable) and block not in REFUSED_ANYWAY


@pytest.fixture
def no_interpreter_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter's own opinion of addresses, made unusable."""

    def fail(self: object) -> bool:
        raise AssertionError("address_allowed used the interpreter's ipaddress tables")

    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for name in ("is_global", "is_private", "is_reserved", "is_loopback", "is_link_local", "is_multicast"):
            monkeypatch.setattr(cls, name, property(fail))


def test_the_table_holds_every_iana_block() -> None:
    table = {block: reachable for block, _, reachable in netproxy.SPECIAL_PURPOSE}
    for block, reachable in IANA:
        assert table.get(block, "missing") == reachable, block


@pytest.mark.usefixtures("no_interpreter_tables")
def test_every_iana_block_first_and_last_address() -> None:
    for block, address, expected in first_and_last():
        assert address_allowed(ipaddress.ip_address(address), private_ok=False) is expected, (block, address)


@pytest.mark.usefixtures("no_interpreter_tables")
@pytest.mark.parametrize(
    "address, private_ok, allowed",
    [
        ("192.0.0.192", True, False),  # the old cloud metadata address (Oracle's)
        ("192.0.0.9", True, False),
        ("2002:7f00:1::", True, False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::", True, False),
        ("64:ff9b::7f00:1", True, False),  # NAT64 of 127.0.0.1
        ("2001:0:7f00:1::", True, False),  # Teredo
        ("::ffff:10.1.2.3", True, True),
        ("::ffff:169.254.169.254", True, False),
        ("169.254.169.254", True, False),
        ("fd00:ec2::254", True, False),  # AWS's IPv6 metadata address
        ("fd12::1", True, True),
        ("fd12::1", False, False),
        ("100.100.100.200", True, False),  # Alibaba's metadata address, in shared address space
        ("224.0.0.1", True, False),
        ("ff02::1", True, False),
        ("4000::1", True, False),  # unallocated IPv6
        ("8.8.8.8", False, True),
        ("2606:4700:4700::1111", False, True),
        ("192.0.1.1", False, True),  # just outside 192.0.0.0/24
        ("198.20.0.1", False, True),  # just outside 198.18.0.0/15
    ],
)
def test_address_answers(address: str, private_ok: bool, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), private_ok) is allowed


def test_every_python_gives_the_same_answers() -> None:
    """The proxy runs under whatever python3 the host has: Debian's 3.11.2 and the
    venv's 3.11.7 disagree on 192.0.0.0/24 and 2002::/16 themselves; our table does not."""
    addresses = [address for _, address, _ in first_and_last()] + ["192.0.0.192", "2002::1", "8.8.8.8"]
    script = (
        "import sys, ipaddress; sys.path.insert(0, sys.argv[1]); import netproxy\n"
        "for a in sys.argv[2:]:\n"
        "    print(netproxy.special_block(ipaddress.ip_address(a))[2])\n"
    )
    answers = set()
    for python in {sys.executable, "/usr/bin/python3"}:
        if not Path(python).exists():
            continue
        run = [python, "-I", "-S", "-c", script, str(Path(netproxy.__file__).parent), *addresses]
        answers.add(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
    assert len(answers) == 1


# -- the per-connection I/O, against servers on 127.0.0.1 -------------------------


class Upstream:
    """A server on 127.0.0.1 that records what each connection sent it and answers
    every request head with a small response."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        got = bytearray()
        self.received.append(b"")
        index = len(self.received) - 1
        conn.settimeout(5)
        with conn:
            try:
                answered = False
                while chunk := conn.recv(65536):
                    got += chunk
                    self.received[index] = bytes(got)
                    if b"\r\n\r\n" in got and not answered:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        answered = True
            except OSError:
                pass


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    """Every allowed name resolves to the upstream on 127.0.0.1 (the policy, tested
    above, would refuse this host's loopback: here only the I/O is under test)."""
    server = Upstream()
    monkeypatch.setattr(Policy, "addresses", lambda self, host, port: ["127.0.0.1"])
    yield server
    server.sock.close()


def through_proxy(data: bytes, upstream: Upstream, *, then: bytes = b"", wait: float = 10) -> bytes:
    """Send ``data`` (and, once answered, ``then``) as the guest would; what it got back."""
    guest, proxy_side = socket.socketpair()

    def serve() -> None:
        with proxy_side:  # as the proxy's process ends, or its connection's thread
            netproxy.serve_proxy(proxy_side, Policy(None))

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    guest.settimeout(wait)
    guest.sendall(data)
    got = b""
    try:
        if then:
            got = guest.recv(65536)
            guest.sendall(then)
        while chunk := guest.recv(65536):
            got += chunk
    except OSError:
        pass
    worker.join(wait)
    guest.close()
    return got


def test_a_plain_request_reaches_the_upstream_once(upstream: Upstream) -> None:
    at = f"x.org:{upstream.port}".encode()
    request = b"GET http://%s/a HTTP/1.1\r\nHost: %s\r\n\r\n" % (at, at)
    second = b"GET http://%s/b HTTP/1.1\r\nHost: other.org\r\n\r\n" % at
    answer = through_proxy(request, upstream, then=second)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    time.sleep(0.2)
    assert upstream.received == [b"GET /a HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % at]  # no second


def test_a_body_goes_on_and_nothing_after_it(upstream: Upstream) -> None:
    at = f"x.org:{upstream.port}".encode()
    request = b"POST http://%s/ HTTP/1.1\r\nHost: %s\r\nContent-Length: 4\r\n\r\nab" % (at, at)
    through_proxy(request, upstream, then=b"cdGET http://x.org/ HTTP/1.1\r\nHost: y.org\r\n\r\n", wait=3)
    assert len(upstream.received) == 1 and not upstream.received[0].endswith(b"y.org\r\n\r\n")


def test_a_long_port_and_a_line_feed_request_are_answered_at_once(upstream: Upstream) -> None:
    for request in (b"CONNECT x.org:" + b"4" * 5000 + b" HTTP/1.1\r\n\r\n", b"GET http://x.org/ HTTP/1.1\n"):
        started = time.monotonic()
        answer = through_proxy(request, upstream)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden") and time.monotonic() - started < 2, answer
    assert upstream.received == []


def test_a_tunnel_carries_only_a_client_hello_for_its_name(upstream: Upstream) -> None:
    connect = b"CONNECT example.org:%d HTTP/1.1\r\nHost: example.org\r\n\r\n" % upstream.port
    through_proxy(connect + HELLO, upstream, wait=1)
    assert upstream.received == [HELLO]
    upstream.received.clear()
    for bad in (client_hello("tenant.other.org"), client_hello(None), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        answer = through_proxy(connect, upstream, then=bad, wait=2)
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
        time.sleep(0.1)
        assert upstream.received in ([], [b""]), upstream.received  # connected, but nothing went on
        upstream.received.clear()


# -- the proxy as its real process, with the test in the agent's place -------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live_processes() -> set[int]:
    """Every process on this host that is not a zombie (state Z in /proc/PID/stat)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(int(name))
            except (OSError, IndexError):
                continue
    return found


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for other in live_processes():
        try:
            if Path(f"/proc/{other}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(other)
        except (OSError, IndexError):
            continue
    return found


def netproxies(net_socket: Path) -> list[int]:
    """Live egress proxies serving the port at ``net_socket``."""
    found = []
    for pid in live_processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"netproxy.py") for arg in cmdline) and str(net_socket).encode() in cmdline:
            found.append(pid)
    return found


class FakeAgent:
    """The guest's end, played by the test: the net port's socket (QEMU serves it as a
    unix socket; here the test does) and the agent's listener behind the forward."""

    def __init__(self, directory: Path, host_ports: tuple[int, ...] = (), allowed: list[str] | None = None) -> None:
        (directory / "egress.json").write_text(json.dumps({"allowed_domains": allowed, "extra_hosts": {}}))
        self.net = net = directory / "net.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(net))
        server.listen(1)
        server.settimeout(10)
        self.relay = socket.create_server(("127.0.0.1", 0))
        self.relay.settimeout(10)
        pidfile = directory / "netproxy.pid"
        argv = [sys.executable, "-I", "-S", netproxy.__file__, "--policy", str(directory / "egress.json")]
        argv += ["--net-socket", str(net), "--pidfile", str(pidfile)]
        for port in host_ports:
            argv += ["--host-port", str(port)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, start_new_session=True)
        self.port, _ = server.accept()
        self.start_seconds = time.monotonic() - started
        server.close()
        self.port.settimeout(10)
        self.decoder = P.Decoder()
        self.hello = self.message()
        proc.wait(10)
        assert proc.stdin is not None
        proc.stdin.write(b"%d\n" % self.relay.getsockname()[1])
        proc.stdin.close()
        self.pid = int(pidfile.read_text())  # written as it detached
        ready = directory / "netproxy.pid.ready"
        assert not ready.exists()  # written once the agent is ready, as start() waits for
        self.port.sendall(P.encode_msg({"op": "ready", "id": 0}))
        assert wait_until(ready.exists)

    def message(self) -> dict[str, object]:
        while True:
            for frame in self.decoder.frames():
                return frame.msg()
            self.decoder.feed(self.port.recv(65536))

    def open(self, cid: int, port: int = P.PROXY_ADDRESS[1]) -> None:
        self.port.sendall(P.encode_msg({"op": "open", "id": cid, "port": port}))

    def take(self, cid: int) -> socket.socket:
        """The proxy's connection for ``cid``, past its preamble: what a guest program talks to."""
        conn, _ = self.relay.accept()
        conn.settimeout(10)
        preamble = b""
        while len(preamble) < netproxy.PREAMBLE.size:
            preamble += conn.recv(netproxy.PREAMBLE.size - len(preamble))
        assert netproxy.PREAMBLE.unpack(preamble) == (bytes.fromhex(str(self.hello["token"])), cid)
        return conn

    def close(self) -> None:
        self.port.close()
        self.relay.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path)
    yield fake
    fake.close()
    assert wait_until(lambda: fake.pid not in live_processes()), "the proxy outlived its port"


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def answer(conn: socket.socket, request: bytes) -> bytes:
    conn.sendall(request)
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    conn.close()
    return got


def test_the_proxy_detaches_says_hello_and_decides(agent: FakeAgent) -> None:
    assert agent.hello["op"] == "hello" and len(bytes.fromhex(str(agent.hello["token"]))) == P.NET_TOKEN
    assert agent.hello["host_ports"] == []
    assert Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(os.getpid())
    agent.open(7)
    got = answer(agent.take(7), b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden") and b"may not reach" in got
    agent.open(8)
    got = answer(agent.take(8), b"GET http://x.org/ HTTP/1.1\n")  # refused at once, not after 30 s
    assert got.startswith(b"HTTP/1.1 403 Forbidden") and b"without CR" in got
    agent.open(9, 22)  # a port this sandbox was not given
    assert agent.message() == {"op": "refuse", "id": 9, "reason": "port 22 is not one this sandbox may reach"}


def test_an_allowed_host_port_is_relayed(tmp_path: Path) -> None:
    server = Upstream()
    fake = FakeAgent(tmp_path, host_ports=(server.port,), allowed=[])
    try:
        assert fake.hello["host_ports"] == [server.port]
        fake.open(1, server.port)
        assert answer(fake.take(1), b"GET / HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nok")
        fake.open(2)  # the proxy port, with nothing allowed
        got = answer(fake.take(2), b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n")
        assert b"not among the domains" in got
    finally:
        fake.close()
        server.sock.close()


def test_connections_over_the_limit_cost_the_host_next_to_nothing(agent: FakeAgent) -> None:
    """64 connections held open, then 100 more: each refused with one frame, in this
    one process, no thread, no process; well under 1 ms of CPU each."""
    held = []
    for cid in range(1, netproxy.MAX_CONNECTIONS + 1):
        agent.open(cid)
        held.append(agent.take(cid))
    before = cpu_seconds(agent.pid)
    for cid in range(1000, 1100):
        agent.open(cid)
    refused = [agent.message() for _ in range(100)]
    spent = cpu_seconds(agent.pid) - before
    assert [m["id"] for m in refused] == list(range(1000, 1100))
    assert all(m["op"] == "refuse" and "64 connections" in str(m["reason"]) for m in refused)
    assert spent < 0.1, f"{spent * 1000:.0f} ms of CPU for 100 refused connections"
    assert children(agent.pid) == [] and netproxies(agent.net) == [agent.pid]
    for conn in held[:10]:  # slots free again as connections end
        conn.close()
    assert wait_until(lambda: bool(agent.open(2000) or True) and reopened(agent, 2000))
    for conn in held[10:]:
        conn.close()


def reopened(agent: FakeAgent, cid: int) -> bool:
    agent.relay.settimeout(0.5)
    try:
        conn = agent.take(cid)
    except TimeoutError:
        while True:  # drain the refusal that came instead
            for frame in agent.decoder.frames():
                assert frame.msg()["op"] == "refuse"
            agent.port.settimeout(0.1)
            try:
                agent.decoder.feed(agent.port.recv(65536))
            except TimeoutError:
                agent.port.settimeout(10)
                return False
    conn.close()
    return True


def test_garbage_on_the_port_is_skipped(agent: FakeAgent) -> None:
    agent.port.sendall(b"\xf5SMV" * 1000 + bytes(range(256)) * 10)
    agent.port.sendall(P.encode(P.MSG, b'{"op":"open","id":"x","port":3128}'))  # a bad id: ignored
    agent.port.sendall(P.encode_msg({"op": "surprise", "id": 1}))
    agent.open(5)
    got = answer(agent.take(5), b"CONNECT x.org:" + b"4" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden") and b"bad port" in got


def test_a_proxy_whose_starter_gave_up_exits(tmp_path: Path) -> None:
    """QEMU never came and the starter closed the proxy's stdin: it does not wait on."""
    (tmp_path / "egress.json").write_text("{}")
    argv = [sys.executable, "-I", "-S", netproxy.__file__, "--policy", str(tmp_path / "egress.json")]
    argv += ["--net-socket", str(tmp_path / "none.sock"), "--pidfile", str(tmp_path / "pid")]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, start_new_session=True)
    proc.wait(10)
    pid = int((tmp_path / "pid").read_text())
    assert pid in live_processes()
    assert proc.stdin is not None
    proc.stdin.close()
    assert wait_until(lambda: pid not in live_processes(), timeout=3)


def test_an_agent_that_lost_the_hello_gets_it_again(agent: FakeAgent) -> None:
    agent.port.sendall(P.encode_msg({"op": "want_hello", "id": 0}))
    assert agent.message() == agent.hello
