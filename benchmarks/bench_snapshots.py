"""Snapshot figures, side by side in one run (these machines are noisy).

    .venv/bin/python benchmarks/bench_snapshots.py [--boots 3] [--idle 10]

Prints, each to its first command's result and as a ratio to the cold start:
a cold boot, a template start, a restore of a user's full snapshot, four
restores of it at once, a fork of one and of four children (until all of
them answer); then the host memory
(PSS, as the kernel counts shared pages) of ``--idle`` idle sandboxes
restored from one snapshot against as many cold-booted ones. Goals (TCG, this
machine): restore and template start at most 0.08x the cold start, fork of 4
under 2x a single restore, the restored sandboxes' memory under 0.5x.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from smolvm import SmolVM


def timed(make: Callable[[], list[SmolVM]]) -> float:
    """Seconds from asking for sandboxes until each has answered a command (asked of
    all at once, as a caller of fork would); then they go."""
    t0 = time.perf_counter()
    vms = make()
    with concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
        list(pool.map(lambda vm: vm.run("true"), vms))
    elapsed = time.perf_counter() - t0
    for vm in vms:
        vm.delete()
    return elapsed


def restore_at_once(snapshot_id: str, count: int) -> list[SmolVM]:
    """``count`` restores of one snapshot side by side: the floor a fork of as many
    children stands on, here, before its own save."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: SmolVM.from_snapshot(snapshot_id), range(count)))


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def idle_memory(make: Callable[[], SmolVM], count: int) -> float:
    """Total PSS of ``count`` idle sandboxes' QEMUs, after they have settled."""
    vms = []
    try:
        for _ in range(count):
            vm = make()
            vm.run("true")
            vms.append(vm)
        time.sleep(5)
        return sum(pss_mib(vm.info()["pid"]) for vm in vms)
    finally:
        for vm in vms:
            vm.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=3, help="starts of each kind (median taken)")
    parser.add_argument("--idle", type=int, default=10, help="idle sandboxes of each kind for the memory figure")
    args = parser.parse_args()

    prepared = SmolVM().start()
    try:
        prepared.run("mkdir -p /work && echo prepared > /work/state && (sleep 100000 &)")
        snap = prepared.snapshot(name="bench")
        rows: dict[str, list[float]] = {
            "cold": [], "template": [], "restore": [], "restore 4": [], "fork 1": [], "fork 4": []
        }  # fmt: skip
        for _ in range(args.boots):  # in turns, so the machine's moods fall on each alike
            rows["cold"].append(timed(lambda: [SmolVM(fast_start=False).start()]))
            rows["template"].append(timed(lambda: [SmolVM().start()]))
            rows["restore"].append(timed(lambda: [SmolVM.from_snapshot(snap.snapshot_id)]))
            rows["restore 4"].append(timed(lambda: restore_at_once(snap.snapshot_id, 4)))
            rows["fork 1"].append(timed(lambda: prepared.fork(1)))
            rows["fork 4"].append(timed(lambda: prepared.fork(4)))
        cold = statistics.median(rows["cold"])
        restore = statistics.median(rows["restore"])
        print(f"\n== to the first command's result (median of {args.boots}; snapshot {snap.size >> 20} MiB)")
        for name, samples in rows.items():
            value = statistics.median(samples)
            extra = f"  {value / restore:.2f}x a restore" if name.startswith("fork") or name[-1] == "4" else ""
            print(f"  {name:<10} {value:6.2f} s  {value / cold:5.2f}x the cold start{extra}")
        if args.idle:
            restored = idle_memory(lambda: SmolVM.from_snapshot(snap.snapshot_id), args.idle)
            booted = idle_memory(lambda: SmolVM(fast_start=False).start(), args.idle)
            print(f"\n== host memory (PSS) of {args.idle} idle sandboxes")
            print(f"  restored from one snapshot  {restored:7.0f} MiB  ({restored / args.idle:.0f} MiB each)")
            print(f"  cold-booted                 {booted:7.0f} MiB  ({booted / args.idle:.0f} MiB each)")
            print(f"  ratio                       {restored / booted:7.2f}x")
        SmolVM.delete_snapshot(snap.snapshot_id)
    finally:
        prepared.delete()


if __name__ == "__main__":
    main()
