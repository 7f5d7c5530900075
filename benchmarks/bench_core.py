"""Core SmolVM figures, measured side by side in one run (these machines are noisy).

    .venv/bin/python benchmarks/bench_core.py [--boots 3] [--rounds 100] [--mb 100]

Prints: start to the first command's result, by resuming the saved template
and by a cold boot (with where the time went); a template start with QEMU
jailed and not (as root);
the round trip of run("true") against the bare wire (a no-op request) and
against bash; upload and download throughput of a file against a plain
copy on the host. Goals (TCG, this machine): first command < 4 s,
run("true") on a kept connection at most 1.1x the guest's own fork+exec
of /bin/true, transfers > 50 MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from smolvm import Mount, SmolVM, jail, templates
from smolvm.agent_client import AgentConnection

STAGES = ("hypervisor_start", "firmware", "kernel", "initramfs", "init", "agent_start", "agent_ready")


def median_ms(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def start_to_first_command(
    boots: int, *, template: bool, image: str | None = None, mounts: list[Mount] | None = None
) -> list[dict[str, float]]:
    rows = []
    for _ in range(boots):
        t0 = time.perf_counter()
        vm = SmolVM(image=image, mounts=mounts, fast_start=template)
        vm.start()
        t_ready = time.perf_counter()
        vm.run("true")
        t_first = time.perf_counter()
        assert vm.boot_timings["resumed_template"] == (1.0 if template else 0.0)
        rows.append({**vm.boot_timings, "first_command": t_first - t_ready, "total": t_first - t0})
        vm.delete()
    return rows


def starts(boots: int) -> None:
    warm = start_to_first_command(boots, template=True) if templates_available() else []
    cold = start_to_first_command(boots, template=False)
    print(f"\n== cold boot: SmolVM() to the first command's result (median of {boots})")
    total = statistics.median(r["total"] for r in cold)
    for key in ("host_setup", *STAGES, "first_command"):
        value = statistics.median(r.get(key, 0.0) for r in cold)
        print(f"  {key:<18} {value:6.2f} s  {value / total:5.0%}")
    print(f"  {'total':<18} {total:6.2f} s   {total / 4:.2f}x the 4 s goal")
    if warm:
        fast = statistics.median(r["total"] for r in warm)
        print(f"\n== start by resuming the saved template (median of {boots})")
        print(
            f"  total              {fast:6.2f} s   {fast / 4:.2f}x the 4 s goal; {total / fast:.1f}x faster than cold"
        )
    else:
        print("\n(no saved template for the default shape: 'smolvm setup' makes one)")


def cold_boots(boots: int, **kwargs: object) -> list[float]:
    return [r["total"] for r in start_to_first_command(boots, template=False, **kwargs)]  # type: ignore[arg-type]


def against(boots: int, other: str) -> None:
    """The default image beside another (the image of an earlier kernel, say), in turns:
    cold boot and template start to the first command."""
    from smolvm.backends.accel import choose_accel
    from smolvm.backends.qemu import QemuBackend
    from smolvm.images.store import ImageStore

    image = ImageStore().load(other)
    accel = choose_accel(image.kernel, image.initrd).accel
    templates.create(image, 512, 1, accel, QemuBackend())  # once, if it has none yet
    cold: dict[str, list[float]] = {"default": [], other: []}
    warm: dict[str, list[float]] = {"default": [], other: []}
    for _ in range(boots):
        for name in cold:
            cold[name] += cold_boots(1, image=name)
            warm[name] += [r["total"] for r in start_to_first_command(1, template=True, image=name)]
    print(f"\n== the default image beside {other!r}, in turns (median of {boots})")
    for what, runs in (("cold boot", cold), ("template start", warm)):
        base = statistics.median(runs[other])
        now = statistics.median(runs["default"])
        print(f"  {what:<16} {other}: {base:6.2f} s   default: {now:6.2f} s   {now / base:.2f}x")


def mount_cost(boots: int) -> None:
    """Template start with one read-only mount against none, in turns."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        start_to_first_command(1, template=True, mounts=[Mount(folder, "/data")])  # its template, once
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(boots):
            for mounted in (False, True):
                mounts = [Mount(folder, "/data")] if mounted else None
                times[mounted] += [r["total"] for r in start_to_first_command(1, template=True, mounts=mounts)]
    plain, shared = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n== template start to the first command, with one mount and without, in turns (median of {boots})")
    print(f"  no mount           {plain:6.3f} s   1.00x")
    print(f"  one mount          {shared:6.3f} s   {shared / plain:.2f}x")


def jail_cost(boots: int) -> None:
    """Template starts with QEMU jailed and not, in turns (as root; a normal user's QEMU
    is never jailed). The goal: the jail costs at most 5% of a template start."""
    if not jail.wanted():
        print("\n(not root: QEMU is not jailed, so there is no jail to measure)")
        return
    wanted = jail.wanted
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(boots):
            for jailed in (True, False):
                jail.wanted = lambda jailed=jailed: jailed  # type: ignore[misc]
                times[jailed] += [r["total"] for r in start_to_first_command(1, template=True)]
    finally:
        jail.wanted = wanted  # type: ignore[assignment]
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"\n== template start to the first command, jailed and not, in turns (median of {boots})")
    print(f"  QEMU not jailed    {off:6.3f} s   1.00x")
    verdict = "met" if on <= 1.05 * off else "NOT met"
    print(f"  QEMU jailed        {on:6.3f} s   {on / off:.3f}x   goal <= 1.05x: {verdict}")


def templates_available() -> bool:
    from smolvm.backends.accel import choose_accel
    from smolvm.images.store import ImageStore
    from smolvm.types import VMConfig

    image = ImageStore().load()
    shape = VMConfig()
    accel = choose_accel(image.kernel, image.initrd).accel
    return templates.find(image, shape.memory, shape.vcpus, accel) is not None


def round_trips(vm: SmolVM, rounds: int) -> None:
    for _ in range(10):
        vm.run("true")  # warm: the first commands after a start read their files from disk
    sock = vm._spec().agent_sockets[0]
    with AgentConnection.open(sock, 30) as conn:
        wire = median_ms(lambda: conn.call("env_list"), rounds)
        exec_true = median_ms(lambda: conn.exec("true", timeout=30), rounds)
        exec_bash = median_ms(lambda: conn.exec("bash -c true", timeout=30), rounds // 2)

    def fresh() -> None:
        vm._connections.release()  # as before kept connections: connect and sync every time
        vm.run("true")

    cold = median_ms(fresh, rounds)
    vm.run("true")
    # The floor: what one fork+exec of /bin/true costs inside this guest, timed by the
    # guest. Taken in turns with the kept calls: this machine's speed drifts.
    loop = "s=$(date +%s%N); for i in $(seq 10); do /bin/true; done; echo $(( ($(date +%s%N) - s) / 10000 ))"
    kept_times: list[float] = []
    floors: list[float] = []
    for _ in range(rounds // 10):
        kept_times.append(median_ms(lambda: vm.run("true"), 10))
        floors.append(int(vm.run(loop).output) / 1000)
    kept, floor = statistics.median(kept_times), statistics.median(floors)
    print(f"\n== round trips (median of {rounds})")
    print(f"  guest fork+exec of /bin/true (floor)     {floor:7.1f} ms   1.00x")
    print(f"  no-op request on an open connection      {wire:7.1f} ms  {wire / floor:5.2f}x")
    print(f"  exec 'true' on an open connection        {exec_true:7.1f} ms  {exec_true / floor:5.2f}x")
    print(f"  exec 'bash -c true'                      {exec_bash:7.1f} ms  {exec_bash / floor:5.2f}x")
    print(f"  vm.run('true'), new connection each time {cold:7.1f} ms  {cold / floor:5.2f}x")
    print(
        f"  vm.run('true'), kept connection          {kept:7.1f} ms  {kept / floor:5.2f}x"
        f"   goal <= 1.1x the floor: {'met' if kept <= 1.1 * floor else 'NOT met'}; {cold / kept:.2f}x faster"
    )


def transfers(vm: SmolVM, mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        size = mb * (1 << 20)
        t = time.perf_counter()
        shutil.copyfile(src, Path(tmp) / "host-copy.bin")
        host = size / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        vm.upload_file(src, "/root/payload.bin")
        up = size / (time.perf_counter() - t) / 1e6
        back = Path(tmp) / "back.bin"
        t = time.perf_counter()
        vm.download_file("/root/payload.bin", back)
        down = size / (time.perf_counter() - t) / 1e6
        same = hashlib.sha256(src.read_bytes()).digest() == hashlib.sha256(back.read_bytes()).digest()
        # The guest's own ceiling: copying a cached file of this size into a new
        # one, 1 MiB at a time, as the agent writes an upload.
        dd = vm.run(
            f"s=$(date +%s%N); dd if=/root/payload.bin of=/root/copy.bin bs=1M status=none; "
            f"echo $(( {size} * 1000 / ($(date +%s%N) - s) )); rm -f /root/copy.bin",
            timeout=300,
        )
        guest_write = int(dd.output)
    print(f"\n== file transfer, {mb} MB of random bytes (byte-exact round trip: {same})")
    print(f"  host copy (reference)  {host:8.0f} MB/s")
    print(f"  guest's own dd copy    {guest_write:8.0f} MB/s  (the guest's ceiling for writing a file)")
    for name, rate in (("upload", up), ("download", down)):
        print(
            f"  {name:<22} {rate:8.0f} MB/s  {rate / guest_write:5.2f}x the guest's copy   goal > 50 MB/s: "
            f"{'met' if rate > 50 else 'NOT met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument(
        "--only", choices=("starts", "jail", "mounts", "round-trips", "transfers"), help="Run one part."
    )
    parser.add_argument("--against", metavar="IMAGE", help="Also time starts of this image beside the default.")
    args = parser.parse_args()
    if args.against:
        against(args.boots, args.against)
    if args.only in (None, "starts"):
        starts(args.boots)
    if args.only in (None, "jail") and templates_available():
        jail_cost(max(args.boots, 5))
    if args.only in (None, "mounts") and templates_available():
        mount_cost(max(args.boots, 5))
    if args.only in ("starts", "jail", "mounts"):
        return
    with SmolVM() as vm:
        if args.only in (None, "round-trips"):
            round_trips(vm, args.rounds)
        if args.only in (None, "transfers"):
            transfers(vm, args.mb)


if __name__ == "__main__":
    main()
