"""The egress proxy's pure parts: the address table.

Written out apart from the table the proxy carries, and checked on every
Python this host has.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import netproxy
from smolvm.netproxy import address_allowed

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
