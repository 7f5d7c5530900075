"""Live-work figures on one sandbox, side by side in one run (these machines are noisy).

    .venv/bin/python benchmarks/bench_live.py [--rounds 50]

Prints: run("true") over the guest agent against the same call over SSH
(paramiko, connection kept), as a ratio (goal: the agent at least 3 times
faster); the time to the first streamed byte of ``echo x; sleep 5`` against
the whole command; stdin throughput.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_core import median_ms  # run as a script: benchmarks/ is on the path

from smolvm import SmolVM


def round_trips(vm: SmolVM, rounds: int) -> None:
    over_ssh = SmolVM.from_id(vm.vm_id, comm_channel="ssh")
    over_ssh.run("true")  # keys, sshd, forward and the connection: set up once, not timed
    agent = median_ms(lambda: vm.run("true"), rounds)
    ssh = median_ms(lambda: over_ssh.run("true"), rounds)
    print(f"\n== run('true') round trip (median of {rounds})")
    print(f"  over the agent {agent:7.1f} ms")
    print(f"  over SSH       {ssh:7.1f} ms")
    print(f"  agent is {ssh / agent:.1f}x faster (goal: at least 3x)")


def first_byte(vm: SmolVM, rounds: int) -> None:
    firsts, wholes = [], []
    for _ in range(rounds):
        arrivals: list[float] = []
        t = time.perf_counter()
        vm.run("echo x; sleep 5", on_stdout=lambda _text, seen=arrivals: seen.append(time.perf_counter()))
        wholes.append((time.perf_counter() - t) * 1000)
        firsts.append((arrivals[0] - t) * 1000)
    first, whole = statistics.median(firsts), statistics.median(wholes)
    print(f"\n== streaming 'echo x; sleep 5' (median of {rounds})")
    print(f"  first byte     {first:7.1f} ms")
    print(f"  whole command  {whole:7.1f} ms")
    print(f"  first byte at {first / whole:.3f} of the command's time")


def stdin_throughput(vm: SmolVM, mb: int) -> None:
    data = bytes(range(256)) * (mb << 12)
    t = time.perf_counter()
    result = vm.run("wc -c", stdin=data, timeout=600)
    seconds = time.perf_counter() - t
    assert result.stdout.strip() == str(len(data))
    print(f"\n== stdin of {mb} MB into 'wc -c'")
    print(f"  {len(data) / seconds / 1e6:7.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    with SmolVM() as vm:
        round_trips(vm, args.rounds)
        first_byte(vm, args.stream_rounds)
        stdin_throughput(vm, args.mb)


if __name__ == "__main__":
    main()
