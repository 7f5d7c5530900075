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
TLS_PORT = 8443  # HTTPS, when namespace_host is given a certificate
# An HTTPS server of the standard library: directory, address, port, certificate, key.
TLS_SERVER = (
    "import functools, http.server, ssl, sys\n"
    "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
    "server = http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), handler)\n"
    "context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
    "context.load_cert_chain(sys.argv[4], sys.argv[5])\n"
    "server.socket = context.wrap_socket(server.socket, server_side=True)\n"
    "server.serve_forever()\n"
)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextmanager
def namespace_host(root: Path, prefix: str, subnet: int, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve ``root`` over HTTP on port PORT at 10.<subnet>.<n>.2, reachable from this host
    over a veth pair (and with ``tls``, a certificate and its key, over HTTPS on TLS_PORT);
    yields that address."""
    tag = os.getpid() % 10000
    netns, outside, inside = f"smolvm-{prefix}{tag}", f"sm{prefix}{tag}h", f"sm{prefix}{tag}n"
    net = f"10.{subnet}.{16 + tag % 200}"
    host_ip, peer_ip = f"{net}.1", f"{net}.2"
    sh("ip", "netns", "add", netns)
    server = None
    servers: list[subprocess.Popen[bytes]] = []
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
        if tls is not None:
            argv = ["python3", "-c", TLS_SERVER, str(root), peer_ip, str(TLS_PORT), str(tls[0]), str(tls[1])]
            servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", netns, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        deadline = time.monotonic() + 20
        urls = [f"http://{peer_ip}:{PORT}/"] + ([f"https://{peer_ip}:{TLS_PORT}/"] if tls else [])
        for url in urls:
            while subprocess.run(["curl", "-s", "-k", "-o", "/dev/null", url]).returncode:
                if time.monotonic() > deadline or any(p.poll() is not None for p in [server, *servers]):
                    raise RuntimeError(f"the test host's server at {url} did not come up")
                time.sleep(0.1)
        yield peer_ip
    finally:
        for running in [server, *servers] if server is not None else servers:
            running.kill()
            running.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
