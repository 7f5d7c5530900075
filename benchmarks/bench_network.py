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
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from smolvm import InternetSettings, SmolVM
from smolvm import protocol as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nethost import PORT, namespace_host  # noqa: E402  (the tests' test host)

NAME = "bench.smolvm.test"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


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
    try:
        with namespace_host(root, "b", 214) as address:
            settings = InternetSettings(allowed_domains=[NAME], allow_host_ports=[port], extra_hosts={NAME: address})
            with SmolVM(internet_settings=settings) as vm:
                off = measure(vm, f"http://{P.HOST_ALIAS}:{port}", args.mb, args.rounds)
                on = measure(vm, f"http://{NAME}:{PORT}", args.mb, args.rounds)
    finally:
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
