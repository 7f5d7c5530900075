"""A test host in a network namespace: a private address on this machine, serving a directory.

Used by the network tests and benchmarks/bench_network.py. Needs root (ip netns).
Everything it makes (namespace, veth pair, server) is removed on exit.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PORT = 8080


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextmanager
def namespace_host(root: Path, prefix: str, subnet: int) -> Iterator[str]:
    """Serve ``root`` over HTTP on port PORT at 10.<subnet>.<n>.2, reachable from this host
    over a veth pair; yields that address."""
    tag = os.getpid() % 10000
    netns, outside, inside = f"smolvm-{prefix}{tag}", f"sm{prefix}{tag}h", f"sm{prefix}{tag}n"
    net = f"10.{subnet}.{16 + tag % 200}"
    host_ip, peer_ip = f"{net}.1", f"{net}.2"
    sh("ip", "netns", "add", netns)
    server = None
    try:
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", netns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{peer_ip}/30", "dev", inside)
        sh("ip", "netns", "exec", netns, "ip", "link", "set", inside, "up")
        sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, "python3", "-m", "http.server", str(PORT), "--bind", peer_ip],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{peer_ip}:{PORT}/"]).returncode:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the test host's server did not come up")
            time.sleep(0.1)
        yield peer_ip
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
