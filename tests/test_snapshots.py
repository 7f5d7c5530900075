"""Snapshots, restores and forks, with real sandboxes: what survives, what each copy
gets of its own, and what bad input gets (a clear error, nothing lost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, needs_image

from smolvm import SmolVM, SnapshotType, snapshots
from smolvm.backends.qemu import mapped_memory_supported
from smolvm.exceptions import (
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
    VMAlreadyExistsError,
)
from smolvm.mounts import Mount
from smolvm.paths import sandbox_dir
from smolvm.types import VMState

TICKER = "while true; do echo tick >> /root/ticks; sleep 0.2; done"
# What each copy must have of its own: kernel randomness, names, machine id, MAC.
IDENTITY = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address"


def identity(vm: SmolVM) -> list[str]:
    lines = vm.run(IDENTITY).stdout.split()
    assert len(lines) == 4, lines
    return lines


def ticks(vm: SmolVM) -> int:
    return int(vm.run("wc -l < /root/ticks").output)


def still_ticking(vm: SmolVM) -> bool:
    before = ticks(vm)
    time.sleep(1.0)
    return ticks(vm) > before


@pytest.fixture(scope="module")
def source() -> Iterator[SmolVM]:
    """A running sandbox with a file and a background process that keeps writing."""
    vm = SmolVM()
    try:
        vm.start()
        vm.run("echo kept > /root/file")
        vm.spawn(TICKER)
        yield vm
    finally:
        vm.delete()


def names_on_disk() -> set[str]:
    return {entry.name for entry in snapshots.snapshots_dir().iterdir()}


@pytest.mark.vm
def test_a_full_snapshot_restores_running_with_an_identity_of_its_own(source: SmolVM) -> None:
    snap = source.snapshot(name="prepared")
    assert snap.type == SnapshotType.FULL and snap.vm_id == source.vm_id and snap.name == "prepared"
    assert snap.size > 64 << 20  # memory is in it
    assert [s.snapshot_id for s in SmolVM.list_snapshots()] == [snap.snapshot_id]
    assert source.run("cat /root/file").output == "kept" and still_ticking(source)  # the source runs on
    time.sleep(3)  # a copy's clock must not stay where the snapshot left it
    with SmolVM.from_snapshot(snap.snapshot_id) as copy:
        assert copy.status == VMState.RUNNING and copy.vm_id != source.vm_id
        assert copy.run("cat /root/file").output == "kept"
        assert still_ticking(copy)  # the process went on running in the copy
        assert abs(float(copy.run("date +%s.%N").output) - time.time()) < 2.0
        mine, theirs = identity(copy), identity(source)
        assert mine[1] == copy.vm_id
        assert all(a != b for a, b in zip(mine, theirs, strict=True)), (mine, theirs)
        # its own SSH host key, pinned on the host and served by its sshd
        over_ssh = SmolVM.from_id(copy.vm_id, comm_channel="ssh")
        assert over_ssh.run("cat /root/file").output == "kept"
        copy.run("echo changed > /root/file")
    assert source.run("cat /root/file").output == "kept"  # copies share nothing with it
    assert SmolVM.delete_snapshot(snap.snapshot_id) == []
    assert snap.snapshot_id not in names_on_disk()


@pytest.mark.vm
def test_parallel_restores_of_a_snapshot_that_outlived_its_sandbox() -> None:
    with SmolVM() as original:
        original.run("echo from-the-original > /root/mark")
        snap = original.snapshot()
    copies: list[SmolVM] = []
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            copies.append(SmolVM.from_snapshot(snap.snapshot_id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=restore) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors and len(copies) == 2
        for copy in copies:
            assert copy.run("cat /root/mark").output == "from-the-original"
        first, second = (identity(copy) for copy in copies)
        assert all(a != b for a, b in zip(first, second, strict=True)), (first, second)
        if mapped_memory_supported():  # both map the one memory file, private
            ram = str(snapshots.snapshots_dir() / snap.snapshot_id / snapshots.RAM)
            for copy in copies:
                maps = Path(f"/proc/{copy.info()['pid']}/maps").read_text()
                assert ram in maps, maps[:2000]
            assert (snapshots.snapshots_dir() / snap.snapshot_id / snapshots.STATE).stat().st_size < 4 << 20
        # Deleting the snapshot keeps the disk they read through to, and only that.
        users = SmolVM.delete_snapshot(snap.snapshot_id)
        assert users == sorted(copy.vm_id for copy in copies)
        kept = snapshots.snapshots_dir() / snap.snapshot_id
        assert sorted(os.listdir(kept)) == [snapshots.DISK]
        assert snap.snapshot_id not in [s.snapshot_id for s in SmolVM.list_snapshots()]
        copies[0].delete()
        assert copies[1].run("cat /root/mark").output == "from-the-original"
        assert kept.exists()
    finally:
        for copy in copies:
            copy.delete()
    assert not kept.exists()  # gone with the last sandbox that needed it


@pytest.mark.vm
def test_a_disk_snapshot_keeps_files_and_boots(source: SmolVM) -> None:
    snap = source.snapshot(SnapshotType.DISK)
    try:
        assert snap.type == SnapshotType.DISK and snap.size < 64 << 20
        with SmolVM.from_snapshot(snap.snapshot_id) as copy:
            assert copy.boot_timings["resumed_template"] == 0.0  # booted
            assert copy.run("cat /root/file").output == "kept"
            assert not still_ticking(copy)  # processes are not kept
            assert copy.run("hostname").output == copy.vm_id
    finally:
        SmolVM.delete_snapshot(snap.snapshot_id)


@pytest.mark.vm
def test_fork_copies_files_and_processes_into_sandboxes_that_diverge(source: SmolVM) -> None:
    before = names_on_disk()
    children = source.fork(2)
    try:
        assert len(children) == 2 and len({c.vm_id for c in children} | {source.vm_id}) == 3
        for child in children:
            assert child.run("cat /root/file").output == "kept"
            assert still_ticking(child)
        children[0].run("echo first > /root/file")
        assert children[1].run("cat /root/file").output == "kept"
        assert source.run("cat /root/file").output == "kept"
        ids = [identity(vm) for vm in (source, *children)]
        for field in range(4):
            assert len({i[field] for i in ids}) == 3, ids
        assert SmolVM.list_snapshots() == []  # a fork's snapshot is no one's to see
    finally:
        for child in children:
            child.delete()
    assert names_on_disk() == before


@pytest.mark.vm
def test_two_restores_racing_for_one_name_make_one_sandbox(source: SmolVM) -> None:
    snap = source.snapshot()
    try:
        with SmolVM.from_snapshot(snap.snapshot_id, vm_id="restored-once") as first:
            with pytest.raises(VMAlreadyExistsError, match="restored-once"):
                SmolVM.from_snapshot(snap.snapshot_id, vm_id="restored-once")
            assert first.run("cat /root/file").output == "kept"  # the first is unharmed
    finally:
        SmolVM.delete_snapshot(snap.snapshot_id)


@pytest.mark.vm
def test_damaged_snapshots_are_refused_and_nothing_is_made(source: SmolVM) -> None:
    for damage in ("alter", "remove"):
        snap = source.snapshot()
        state = snapshots.snapshots_dir() / snap.snapshot_id / snapshots.STATE
        if damage == "alter":
            state.chmod(0o644)
            with state.open("r+b") as f:
                f.seek(1 << 20)
                f.write(b"\0tampered\0")
        else:
            state.unlink()
        sandboxes = [r.id for r in SmolVM.list()]
        match = "not the file that was saved" if damage == "alter" else "missing"
        with pytest.raises(SnapshotError, match=match):
            SmolVM.from_snapshot(snap.snapshot_id)
        assert [r.id for r in SmolVM.list()] == sandboxes
        SmolVM.delete_snapshot(snap.snapshot_id)
    with pytest.raises(SnapshotNotFoundError, match="snapshot list"):
        SmolVM.from_snapshot("snap-00000000")
    with pytest.raises(SnapshotNotFoundError):
        SmolVM.delete_snapshot("snap-00000000")


@pytest.mark.vm
def test_what_cannot_be_snapshotted_or_forked_is_refused_before_anything_starts(source: SmolVM, tmp_path: Path) -> None:
    before = names_on_disk()
    stopped = SmolVM()  # created, never started
    try:
        with pytest.raises(ValidationError, match="start it first"):
            stopped.snapshot()
        for count in (0, -1, True, 65, "2"):
            with pytest.raises(ValidationError, match="1 to 64"):
                stopped.fork(count)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="host memory"):
            SmolVM(memory=32768).fork(64)
        with pytest.raises(ValidationError, match="start it first"):
            stopped.fork(1)
    finally:
        stopped.delete()
    tmp_path.chmod(0o755)  # readable by a jailed QEMU
    mounted = SmolVM(mounts=[Mount(tmp_path, "/data")])
    try:
        with pytest.raises(SnapshotError, match="disk snapshot"):
            mounted.snapshot()
    finally:
        mounted.delete()
    for kind in ("diff", "memory"):
        with pytest.raises(ValidationError, match="full"):
            source.snapshot(kind)
    with pytest.raises(ValidationError, match="name"):
        source.snapshot(name="x" * 200)
    source.pause()
    try:
        with pytest.raises(ValidationError, match="resume it first"):
            source.fork(1)
        with pytest.raises(ValidationError, match="resume it first"):
            source.snapshot(SnapshotType.DISK)
    finally:
        source.resume()
    assert still_ticking(source) and names_on_disk() == before


@pytest.mark.vm
def test_running_out_of_disk_while_saving_leaves_nothing_and_the_sandbox_runs(
    source: SmolVM, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = names_on_disk()
    usage = shutil.disk_usage(snapshots.snapshots_dir())
    monkeypatch.setattr(snapshots.shutil, "disk_usage", lambda path: usage._replace(free=10 << 20))
    with pytest.raises(SnapshotError, match="not enough free disk space"):
        source.snapshot()
    monkeypatch.undo()
    if os.geteuid() != 0:
        return  # the rest needs a small filesystem mounted under the data directory
    # The check passed, and the disk fills up midway: QEMU's save fails.
    monkeypatch.setattr(snapshots, "_check_space", lambda *args: None)
    root = snapshots.snapshots_dir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], check=True)
    try:
        with pytest.raises(SnapshotError, match="could not snapshot|filled up"):
            source.snapshot()
        assert os.listdir(root) == []
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert SmolVM.list_snapshots() == [] and names_on_disk() == before
    assert source.status == VMState.RUNNING and still_ticking(source)


@pytest.mark.vm
def test_cli_snapshot_create_list_restore_delete_and_fork(source: SmolVM) -> None:
    def smolvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SMOLVM_BIN), *args], capture_output=True, text=True, timeout=300, check=False)

    made = smolvm("snapshot", "create", source.vm_id, "--name", "cli label", "--json")
    assert made.returncode == 0, made.stderr
    snap = json.loads(made.stdout)
    assert snap["type"] == "full" and snap["name"] == "cli label"
    listed = smolvm("snapshot", "list")
    assert snap["snapshot_id"] in listed.stdout and "cli label" in listed.stdout
    restored = smolvm("snapshot", "restore", snap["snapshot_id"], "--name", "from-cli", "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["id"] == "from-cli"
    forked = smolvm("sandbox", "fork", "from-cli", "--count", "1", "--json")
    assert forked.returncode == 0, forked.stderr
    child = json.loads(forked.stdout)[0]["id"]
    try:
        assert SmolVM.from_id(child).run("cat /root/file").output == "kept"
        deleted = smolvm("snapshot", "delete", snap["snapshot_id"])
        assert deleted.returncode == 0 and f"kept for from-cli, {child} until" in deleted.stdout
    finally:
        for name in (child, "from-cli"):
            SmolVM.from_id(name).delete()
    for args, words in (
        (("snapshot", "restore", "snap-00000000"), "no snapshot"),
        (("snapshot", "delete", "snap-00000000"), "no snapshot"),
        (("sandbox", "fork", source.vm_id, "--count", "0"), "1 to 64"),
        (("snapshot", "create", source.vm_id, "--type", "diff"), "diff"),
    ):
        result = smolvm(*args)
        assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert SmolVM.list_snapshots() == []


@needs_image
def test_a_sandbox_whose_disk_header_was_rewritten_does_not_start() -> None:
    """A QEMU taken over at a sandbox's last run may have rewritten its disk's header to
    read through to a host file; the next start, as root, refuses before QEMU opens it."""
    vm = SmolVM()
    try:
        vm.start()
        vm.stop()
        disk = sandbox_dir(vm.vm_id) / "disk.qcow2"
        good = snapshots.backing_file(disk)
        assert good is not None
        rewrite = ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(disk)]
        subprocess.run(rewrite, check=True)
        with pytest.raises(SnapshotError, match="reads through to '/etc/passwd'"):
            vm.start()
        assert vm.status != VMState.RUNNING
        subprocess.run(
            ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", good, str(disk)], check=True
        )
        vm.start()
        assert vm.run("echo back").output == "back"
    finally:
        vm.delete()
