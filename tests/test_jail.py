"""QEMU's jail (smolvm/jail.py) and its seccomp filter: the uid choice as pure logic,
and real sandboxes whose QEMU is looked at through /proc and QMP.

Boots in this module: the shared ``vm`` fixture (1), a second sandbox beside it (1),
one whose first-choice uid is in use (1), one unjailed under the rootless filter (1).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_image

from smolvm import SmolVM, jail, locks
from smolvm.backends.qemu import qmp
from smolvm.exceptions import HostError
from smolvm.paths import sandbox_dir

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="QEMU is jailed only when SmolVM runs as root")

# Every device a default sandbox's QEMU has, and why. Anything else is a failure.
DEVICES = {
    "virtio-blk-device": "the root disk, and the transfer disk for bulk file moves",
    "virtio-serial-device": "the agent's ports and the egress proxy's net port",
    "virtserialport": "one per agent port, and the net port",
    "virtio-net-device": "user-mode networking: port forwards, SSH, the egress relay",
    "virtio-rng-device": "entropy for the guest's kernel",
    "virtio-mmio": "microvm's fixed transports, most of them empty",
    "isa-serial": "the console (ttyS0) that 'sandbox logs' shows",
    "isabus-bridge": "holds the ISA devices below",
    "mc146818rtc": "the wall clock the guest boots with",
    "isa-pit": "the timer the kernel calibrates against under TCG",
    "isa-i8259": "the legacy interrupt controller, pair of",
    "ioapic": "interrupt routing for the virtio devices",
    "kvmvapic": "microvm's APIC helper (created with the APIC)",
    "acpi-ged-x86": "ACPI events: the guest's power-off",
    "fw_cfg_io": "hands the kernel, initrd and command line to the guest",
}
BACKED = {"virtio-blk-device": 2, "virtio-serial-device": 1, "virtio-net-device": 1, "virtio-rng-device": 1}


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def qemu_pid(vm: SmolVM) -> int:
    pid = vm._refresh().pid
    assert pid is not None
    return pid


# == the uid choice: no VM ===================================================


def test_candidates_stay_in_the_range_and_start_where_the_key_hashes() -> None:
    first = list(jail.candidates("/data/sandboxes/a"))
    assert len(first) == jail.TRIES and len(set(first)) == jail.TRIES
    assert all(jail.UID_BASE <= uid < jail.UID_BASE + jail.UID_COUNT for uid in first)
    assert first == list(jail.candidates("/data/sandboxes/a"))
    assert first[0] != next(jail.candidates("/data/sandboxes/b"))


def test_accounts_groups_and_subordinate_ranges_are_taken(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "status").write_text(
        "Name:\tx\nUid:\t1900000007\t1900000007\t1900000007\t1900000007\nGid:\t5\t5\t5\t5\n"
    )
    (proc / "self").mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("svc:x:1900000001:1900000002::/:/bin/false\nbroken line\n")
    (etc / "group").write_text("grp:x:1900000003:\n")
    (etc / "subuid").write_text("alice:1900000100:65536\nnonsense\n")
    ids, ranges = jail.taken(etc, proc)
    assert {1900000001, 1900000002, 1900000003, 1900000007, 5} <= ids
    for uid in (1900000001, 1900000002, 1900000003, 1900000007, 1900000100, 1900065635):
        assert not jail.free(uid, ids, ranges)
    assert jail.free(1900000004, ids, ranges)
    assert jail.free(1900065636, ids, ranges)


def test_a_taken_uid_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "sb"
    home.mkdir()
    first, second = list(jail.candidates("key"))[:2]
    monkeypatch.setattr(jail, "taken", lambda: ({first}, []))
    monkeypatch.setattr(os, "chown", lambda *a: None)  # not root in every run of the quick set
    with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as cell:
        assert (cell.uid, cell.gid) == (second, second)
        assert cell.args() == ["-runas", f"{second}:{second}", "-chroot", str(home / "jail")]
        # Held: a second start at the same moment does not get it.
        with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as other:
            assert other.uid not in (first, second)
        # Whoever inherited the lock (QEMU) holds the uid after the start is done.
        kept = os.dup(cell.lock)
    try:
        assert locks.try_lock(tmp_path / "locks" / f"{second}.lock") is None
        with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as again:
            assert again.uid != second
    finally:
        os.close(kept)
    with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as freed:
        assert freed.uid == second  # its holder gone, the uid is free again


def test_a_stale_jail_is_emptied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "chown", lambda *a: None)
    root = tmp_path / "jail"
    (root / "left" / "over").mkdir(parents=True)
    (root / "left" / "over" / "x").write_text("x")
    (root / "file").write_text("x")
    (root / "link").symlink_to("/etc")
    assert jail.make_root(tmp_path) == root
    assert list(root.iterdir()) == []
    assert root.stat().st_mode & 0o777 == 0o555


def test_a_jail_that_cannot_be_made_says_so(tmp_path: Path) -> None:
    home = tmp_path / "not-a-dir"
    home.write_text("")
    with pytest.raises(HostError, match="cannot make the jail"):
        jail.make_root(home)


# == real sandboxes ==========================================================


@needs_image
def test_qemu_runs_under_its_seccomp_filter_with_nothing_but_its_devices(vm: SmolVM) -> None:
    pid = qemu_pid(vm)
    assert status(pid)["Seccomp"] == "2"
    tree = qmp(vm._spec().control_socket, "human-monitor-command", {"command-line": "info qtree"})
    devices = Counter(line.split("dev:")[1].split(",")[0].strip() for line in tree.splitlines() if "dev:" in line)
    assert set(devices) <= set(DEVICES), f"unexpected devices: {set(devices) - set(DEVICES)}"
    assert {name: devices[name] for name in BACKED} == BACKED
    assert devices["virtserialport"] == 9  # eight agent ports and the net port


@needs_image
@as_root
def test_qemu_is_jailed_when_run_as_root(vm: SmolVM) -> None:
    pid = qemu_pid(vm)
    st = status(pid)
    uids, gids = set(st["Uid"].split()), set(st["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1  # real, effective, saved and filesystem alike
    uid = int(uids.pop())
    assert uid != 0 and int(gids.pop()) != 0
    assert jail.UID_BASE <= uid < jail.UID_BASE + jail.UID_COUNT
    assert st["CapPrm"] == st["CapEff"] == st["CapAmb"] == "0" * 16  # its set*id calls gain it nothing
    assert st["NoNewPrivs"] == "1"
    root = os.readlink(f"/proc/{pid}/root")
    assert root != "/"
    assert Path(root) == sandbox_dir(vm.vm_id) / "jail"
    assert os.listdir(f"/proc/{pid}/root") == []
    held = locks.try_lock(jail.LOCK_DIR / f"{uid}.lock")  # its QEMU holds its uid's lock
    assert held is None
    assert vm.run("echo still works").output == "still works"


@needs_image
@as_root
def test_one_sandboxs_qemu_cannot_read_anothers_files(vm: SmolVM) -> None:
    with SmolVM() as other:
        mine, theirs = status(qemu_pid(vm)), status(qemu_pid(other))
        uid = int(mine["Uid"].split()[0])
        assert uid != int(theirs["Uid"].split()[0])  # a uid of its own, not a shared service user
        probe = 'for p; do if head -c1 "$p" >/dev/null 2>&1; then echo read; else echo denied; fi; done'
        targets = [str(sandbox_dir(other.vm_id) / "disk.qcow2"), str(sandbox_dir(other.vm_id) / "transfer.img")]
        out = subprocess.run(
            ["/bin/sh", "-c", probe, "sh", *targets], user=uid, group=uid, extra_groups=[], cwd="/",
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.stdout.split() == ["denied", "denied"], out
        # ... which root, as a check that the probe reads at all, can.
        assert subprocess.run(
            ["/bin/sh", "-c", probe, "sh", *targets], capture_output=True, text=True, check=False
        ).stdout.split() == ["read", "read"]


@needs_image
@as_root
def test_a_uid_in_use_is_not_taken(tmp_path: Path) -> None:
    """A process already running as the uid a sandbox would get first: it gets another."""
    name = "jail-busy-uid"
    wanted = next(jail.candidates(str(sandbox_dir(name))))
    squatter = subprocess.Popen(["sleep", "120"], user=wanted, group=wanted, extra_groups=[])
    try:
        with SmolVM(vm_id=name) as vm:
            uid = int(status(qemu_pid(vm))["Uid"].split()[0])
            assert uid != wanted and uid != 0
            assert vm.run("echo ok").output == "ok"
    finally:
        squatter.kill()
        squatter.wait()


@pytest.fixture
def unjailed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """QEMU as a normal user gets it: no jail, the whole filter."""
    monkeypatch.setattr(jail, "wanted", lambda: False)
    yield


@needs_image
def test_unjailed_qemu_denies_privilege_changes_too(unjailed: None) -> None:
    with SmolVM() as vm:
        st = status(qemu_pid(vm))
        assert st["Seccomp"] == "2"
        cmdline = Path(f"/proc/{qemu_pid(vm)}/cmdline").read_bytes().split(b"\0")
        assert b"-runas" not in cmdline
        assert any(b"elevateprivileges=deny" in arg and b"spawn=deny" in arg for arg in cmdline)
        assert vm.run("echo ok").output == "ok"


@needs_image
def test_qemu_cannot_map_more_than_its_memory_and_the_stated_overhead(vm: SmolVM) -> None:
    from smolvm.backends.qemu import ADDRESS_OVERHEAD_MIB

    pid = qemu_pid(vm)
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    line = next(line for line in limits if line.startswith("Max address space"))
    expected = (vm.config.memory + ADDRESS_OVERHEAD_MIB) << 20
    assert line.split()[3:5] == [str(expected), str(expected)]  # soft and hard alike
    assert Path(f"/proc/{pid}/environ").read_bytes() == b"MALLOC_ARENA_MAX=2\0"  # nothing of the host's
    # Under the cap it still does what a sandbox does at full tilt: parallel disk
    # writes (QEMU's I/O threads), memory filled, a file both ways.
    load = "for i in 1 2 3 4 5 6 7 8; do dd if=/dev/zero of=/tmp/f$i bs=1M count=24 oflag=direct 2>/dev/null & done; wait; sync"
    assert vm.run(load, timeout=120).ok
    assert vm.run("python3 -c 'x = bytearray(300 << 20); print(len(x))'", timeout=60).output == str(300 << 20)
    big = Path(os.environ.get("TMPDIR", "/tmp")) / f"jail-load-{os.getpid()}"
    try:
        big.write_bytes(os.urandom(32 << 20))
        vm.upload_file(str(big), "/tmp/big")
        vm.download_file("/tmp/big", str(big) + ".back")
        assert Path(str(big) + ".back").read_bytes() == big.read_bytes()
    finally:
        big.unlink(missing_ok=True)
        Path(str(big) + ".back").unlink(missing_ok=True)
    assert vm.run("rm -f /tmp/f*; echo ok").output == "ok"
    assert int(status(pid)["VmPeak"].split()[0]) * 1024 <= expected


def test_doctor_says_how_qemu_is_confined_and_what_is_not_bounded(tmp_path: Path) -> None:
    from smolvm import doctor

    check = doctor.hypervisor_check()
    assert check.status == "ok"
    assert ("uid of its own" in check.detail) == (os.geteuid() == 0)
    assert "spawn" in check.detail
    bounds = doctor.bounds_check()
    assert bounds.status == "warn" and "CPU: not capped" in bounds.detail and "RLIMIT_AS" in bounds.detail
    assert "v1" in doctor.cgroup_cpu(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert "v2 is here" in doctor.cgroup_cpu(tmp_path)
