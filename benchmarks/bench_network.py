"""Network figures, side by side in one run (these machines are noisy). Needs root:
it makes a network namespace for a test host, as the tests do.

    .venv/bin/python benchmarks/bench_network.py [--mb 100] [--rounds 10] [--before fc29a3a]

A 100 MB download from a server on this machine into the guest, and the
time to set up a connection (curl's connect and first byte), three ways:
- policy off: an allowed host port, relayed as is (no names, no checks);
- allowlist on: through the sandbox's egress proxy, which checks the name,
  resolves it and checks the address, to a test host in a network namespace;
- before: the same through the mechanism this replaced (QEMU's guestfwd
  starting a Python process per guest connection), with the netproxy.py of
  git revision ``--before``, in a sandbox whose guest routes the proxy
  address out to QEMU instead of to its agent.
And the host CPU that 100 refused connections cost (the guest holds 64
downloads open, the limit, and opens 100 more), before and after; the CPU
QEMU spends emulating the guest is the same both ways and not counted.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from smolvm import InternetSettings, SmolVM, egress
from smolvm import protocol as P
from smolvm.backends import qemu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nethost import PORT, namespace_host  # noqa: E402  (the tests' test host)

NAME = "bench.smolvm.test"
REPO = Path(__file__).resolve().parent.parent


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


def cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (with ``children``: also of its children it has reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


REFUSE = """\
import os, socket, time
def wait(name):
    while not os.path.exists(name): time.sleep(0.05)
held = []
for _ in range(64):  # downloads left unread: each holds its slot, past any head timeout
    s = socket.create_connection(%(proxy)r, timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(%(request)r)
    held.append(s)
time.sleep(3)  # each held one has reached the proxy
open('/tmp/bench-held', 'w').close()
wait('/tmp/bench-go')
refused = 0
for _ in range(100):
    s = socket.create_connection(%(proxy)r, timeout=30)
    refused += b'64 connections open already' in s.recv(4096)
    s.close()
with open('/tmp/bench-refused', 'w') as f: f.write(str(refused))
wait('/tmp/bench-end')
"""


def refused_cpu(vm: SmolVM, url: str, host_cpu: Callable[[], float], settle: Callable[[], None]) -> float:
    """Host CPU seconds for 100 connections refused over the limit of 64."""
    host = url.split("/")[2]
    request = f"GET {url}/big HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    script = REFUSE % {"proxy": P.PROXY_ADDRESS, "request": request}
    vm.run(f"rm -f /tmp/bench-*; cat > /root/refuse.py << 'EOF'\n{script}EOF")
    vm.spawn("python3 /root/refuse.py")
    wait_for(lambda: vm.run("test -e /tmp/bench-held").ok)
    settle()
    before = host_cpu()
    vm.run("touch /tmp/bench-go")
    wait_for(lambda: vm.run("test -e /tmp/bench-refused").ok)
    settle()
    spent = host_cpu() - before
    refused = vm.run("cat /tmp/bench-refused").stdout
    vm.run("touch /tmp/bench-end")
    assert refused == "100", f"only {refused} of 100 connections were refused for the limit"
    return spent


def wait_for(check: Callable[[], bool], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the guest did not get there in time")
        time.sleep(0.2)


@contextmanager
def old_mechanism(revision: str) -> Iterator[Path]:
    """QEMU argv as it was: a guestfwd that starts the old netproxy.py per connection."""
    old = Path(tempfile.mkdtemp(prefix="smolvm-oldproxy-")) / "netproxy.py"
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:smolvm/netproxy.py"], capture_output=True)
    if source.returncode:
        raise SystemExit(f"cannot read smolvm/netproxy.py at {revision}: {source.stderr.decode().strip()}")
    old.write_bytes(source.stdout)
    new_args = qemu.network_args

    def network_args(spec: qemu.LaunchSpec) -> list[str]:
        policy = str(spec.home / "egress.json")
        command = shlex.join([sys.executable, "-I", "-S", str(old), policy])
        host, port = P.PROXY_ADDRESS
        netdev = f"user,id={qemu.NETDEV},restrict=on,ipv6=off,guestfwd=tcp:{host}:{port}-cmd:{qemu.opt(command)}"
        return ["-netdev", netdev, "-device", f"virtio-net-device,netdev={qemu.NETDEV}"]

    qemu.network_args = network_args  # type: ignore[assignment]
    try:
        yield old
    finally:
        qemu.network_args = new_args  # type: ignore[assignment]


def old_proxies(old: Path) -> int:
    """Live (not zombie) per-connection proxies of the old mechanism."""
    count = 0
    for name in os.listdir("/proc"):
        try:
            if str(old).encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                count += Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            continue
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--before", default="fc29a3a", help="the git revision whose netproxy.py is 'before'")
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
                proxy = egress.pid_of(vm._spec())
                assert proxy is not None
                cpu_after = refused_cpu(vm, f"http://{NAME}:{PORT}", lambda: cpu(proxy), lambda: time.sleep(2))
            with old_mechanism(args.before) as old, SmolVM(internet_settings=settings) as vm:
                # The guest's agent holds the proxy address on lo: give it back to the route out.
                vm.run(f"ip addr del {P.PROXY_ADDRESS[0]}/32 dev lo")
                before = measure(vm, f"http://{NAME}:{PORT}", args.mb, args.rounds)
                assert vm._record.pid is not None
                qemu_pid = vm._record.pid

                def settle() -> None:  # the refused ones have ended and QEMU has reaped them
                    time.sleep(2)
                    deadline = time.monotonic() + 30
                    while old_proxies(old) > 64 and time.monotonic() < deadline:
                        time.sleep(0.2)

                children = lambda: cpu(qemu_pid, children=True) - cpu(qemu_pid)  # noqa: E731
                cpu_before = refused_cpu(vm, f"http://{NAME}:{PORT}", children, settle)
    finally:
        server.shutdown()
        for name in ("big", "small"):
            (root / name).unlink()
        root.rmdir()
    print(f"\n== {args.mb} MB download into the guest, and connection set-up (median of {args.rounds})")
    print(f"  {'':34} {'MB/s':>8} {'connect ms':>11} {'first byte ms':>14}")
    print(f"  {'policy off (host port)':34} {off[0]:8.1f} {off[1]:11.1f} {off[2]:14.1f}")
    print(f"  {'allowlist on (proxy)':34} {on[0]:8.1f} {on[1]:11.1f} {on[2]:14.1f}")
    print(f"  {'before (a process per connection)':34} {before[0]:8.1f} {before[1]:11.1f} {before[2]:14.1f}")
    print(f"  allowlist/off: throughput {on[0] / off[0]:.2f}x, first byte {on[2] / off[2]:.2f}x")
    print(f"  after/before: throughput {on[0] / before[0]:.2f}x, first byte {on[2] / before[2]:.2f}x")
    print("\n== host CPU of 100 connections refused over the limit of 64")
    print("   (before: QEMU's reaped children, a process each; after: the proxy; the guest's own work not counted)")
    print(f"  before: {cpu_before * 1000:.0f} ms ({cpu_before * 10:.2f} ms each)")
    print(f"  after:  {cpu_after * 1000:.0f} ms ({cpu_after * 10:.2f} ms each)")
    print(f"  before/after: {cpu_before / max(cpu_after, 1 / os.sysconf('SC_CLK_TCK')):.0f}x"
          + (" (after: under one clock tick)" if cpu_after == 0 else ""))  # fmt: skip


if __name__ == "__main__":
    main()
