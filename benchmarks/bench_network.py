"""Network figures, side by side in one run (these machines are noisy). Needs root:
it makes a network namespace for a test host, as the tests do.

    .venv/bin/python benchmarks/bench_network.py [--mb 100] [--rounds 10]

A 100 MB download from a server on this machine into the guest, and the
time to set up a connection (curl's connect and first byte), two ways:
- policy off: an allowed host port, relayed as is (no names, no checks);
- allowlist on: through the egress proxy, which checks the name, resolves it
  and checks the address, to a test host in a network namespace.
"""

from __future__ import annotations

import argparse
import http.server
import os
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

from smolvm import InternetSettings, SmolVM
from smolvm import protocol as P

NAME = "bench.smolvm.test"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def measure(vm: SmolVM, url: str, mb: int, rounds: int) -> tuple[float, float, float]:
    """(MB/s of the big download, median connect ms, median first-byte ms)."""
    got = vm.run(f"curl -sS -o /dev/null -w '%{{size_download}} %{{time_total}}' {url}/big", timeout=600)
    size, seconds = got.stdout.split()
    assert int(size) == mb * 1_000_000, got
    connects, firsts = [], []
    for _ in range(rounds):
        out = vm.run(f"curl -sS -o /dev/null -w '%{{time_connect}} %{{time_starttransfer}}' {url}/small").stdout
        connect, first = (float(x) * 1000 for x in out.split())
        connects.append(connect)
        firsts.append(first)
    return int(size) / float(seconds) / 1e6, statistics.median(connects), statistics.median(firsts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="smolvm-bench-"))
    with open(root / "big", "wb") as f:
        f.truncate(args.mb * 1_000_000)
    (root / "small").write_text("x\n")

    # A server on the host's 127.0.0.1, and one in a network namespace.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    tag = os.getpid() % 10000
    netns, outside, inside = f"smolvm-b{tag}", f"smb{tag}h", f"smb{tag}n"
    sh("ip", "netns", "add", netns)
    ns_server = None
    try:
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", netns)
        sh("ip", "addr", "add", "10.214.0.1/30", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "netns", "exec", netns, "ip", "addr", "add", "10.214.0.2/30", "dev", inside)
        sh("ip", "netns", "exec", netns, "ip", "link", "set", inside, "up")
        ns_server = subprocess.Popen(
            ["ip", "netns", "exec", netns, "python3", "-m", "http.server", "8080", "--bind", "10.214.0.2"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while subprocess.run(["curl", "-sf", "-o", "/dev/null", "http://10.214.0.2:8080/small"]).returncode:
            pass
        settings = InternetSettings(allowed_domains=[NAME], allow_host_ports=[port], extra_hosts={NAME: "10.214.0.2"})
        with SmolVM(internet_settings=settings) as vm:
            off = measure(vm, f"http://{P.HOST_ALIAS}:{port}", args.mb, args.rounds)
            on = measure(vm, f"http://{NAME}:8080", args.mb, args.rounds)
    finally:
        if ns_server is not None:
            ns_server.kill()
            ns_server.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        server.shutdown()
        for name in ("big", "small"):
            (root / name).unlink()
        root.rmdir()
    print(f"\n== {args.mb} MB download into the guest, and connection set-up (median of {args.rounds})")
    print(f"  {'':28} {'MB/s':>8} {'connect ms':>11} {'first byte ms':>14}")
    print(f"  {'policy off (host port)':28} {off[0]:8.1f} {off[1]:11.1f} {off[2]:14.1f}")
    print(f"  {'allowlist on (proxy)':28} {on[0]:8.1f} {on[1]:11.1f} {on[2]:14.1f}")
    print(f"  allowlist/off: throughput {on[0] / off[0]:.2f}x, first byte {on[2] / off[2]:.2f}x")


if __name__ == "__main__":
    main()
