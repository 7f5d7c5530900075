"""The pure parts beside the real snapshot tests: the markers a restore reads, qcow2
backing files, sparse copies, and the mirror QEMU's backports come from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smolvm import host, snapshots, templates
from smolvm.backends.base import LaunchSpec
from smolvm.backends.qemu import memory_args, qemu_argv


def test_a_saved_machine_marker_reads_back_and_an_older_one_still_reads(tmp_path: Path) -> None:
    marker = tmp_path / "resume-from"
    saved = templates.SavedMachine(tmp_path / "state.bin", "tcg", False, tmp_path / "ram.bin")
    saved.write(marker)
    assert templates.SavedMachine.read(marker) == saved
    marker.write_text("/data/images/templates/v1/m512-c1-tcg\n")  # an older smolvm's: the template's dir
    old = templates.SavedMachine.read(marker)
    assert old == templates.SavedMachine(Path("/data/images/templates/v1/m512-c1-tcg/state.bin"), "tcg", True)
    assert templates.SavedMachine.read(tmp_path / "absent") is None


def test_backing_file_is_read_from_the_qcow2_header(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    assert snapshots.backing_file(top) == str(base)
    assert snapshots.backing_file(base) is None
    (tmp_path / "junk").write_bytes(b"QFI\xfb" + b"\xff" * 60)  # an offset far past the end
    assert snapshots.backing_file(tmp_path / "junk") in (None, "")
    assert snapshots.backing_file(tmp_path / "missing") is None


@settings(max_examples=300, deadline=None)
@example(offset=2**63, size=1, tail=b"")  # past what seek takes: found here, kept
@example(offset=1, size=4, tail=b"")  # a name with a NUL in it: found here, kept
@given(offset=st.integers(0, 2**64 - 1), size=st.integers(0, 2**32 - 1), tail=st.binary(max_size=2048))
def test_a_disk_header_written_by_a_taken_over_qemu_is_read_within_bounds(
    tmp_path_factory: pytest.TempPathFactory, offset: int, size: int, tail: bytes
) -> None:
    """QEMU has a sandbox's disk open for writing: whatever its header says, reading the
    backing file name neither fails nor reads more than a name's worth."""
    disk = tmp_path_factory.mktemp("hdr") / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + b"\0\0\0\3" + offset.to_bytes(8, "big") + size.to_bytes(4, "big") + tail)
    named = snapshots.backing_file(disk)
    assert named is None or (isinstance(named, str) and len(named) <= 1023)
    if named:  # and it is then refused unless it is one of SmolVM's own disks
        with pytest.raises(snapshots.SnapshotError, match="tampered"):
            snapshots.expected_base(disk, tmp_path_factory.mktemp("image"))


def test_a_sparse_copy_keeps_the_data_and_the_holes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    with open(src, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(64 << 20)
        f.write(b"b" * 4096)
        f.truncate(128 << 20)
    snapshots.copy_sparse(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_blocks * 512 < 8 << 20  # 128 MiB long, two pages of data
    with pytest.raises(FileExistsError):
        snapshots.copy_sparse(src, dest)  # never over an existing file


def test_snapshot_types_and_names_are_checked() -> None:
    assert snapshots._check_kind("disk") is snapshots.SnapshotType.DISK
    for bad in ("diff", "memory", 3):
        with pytest.raises(snapshots.ValidationError):
            snapshots._check_kind(bad)  # type: ignore[arg-type]
    for name in ("", "x" * 129, "a\nb"):
        with pytest.raises(snapshots.ValidationError):
            snapshots._check_name(name)


def spec(tmp_path: Path, **kw: object) -> LaunchSpec:
    return LaunchSpec("t", tmp_path / "k", tmp_path / "i", 512, 1, "tcg", tmp_path, tmp_path, **kw)  # type: ignore[arg-type]


def test_mapped_memory_is_opened_read_only_and_its_state_loaded_later(tmp_path: Path) -> None:
    mapped = spec(tmp_path, incoming=tmp_path / "state.bin", ram=tmp_path / "ram.bin")
    backend = memory_args(mapped)[-1]
    assert "share=off" in backend and "readonly=on" in backend and "rom=off" in backend
    argv = qemu_argv(mapped, incoming_fd=7)
    assert argv[argv.index("-incoming") + 1] == "defer"  # after QMP said the memory is apart
    assert "microvm,accel=tcg,memory-backend=microvm.ram" in argv
    filling = spec(tmp_path, incoming=tmp_path / "state.bin", ram=tmp_path / "ram.bin", ram_fill=True)
    assert "share=on" in memory_args(filling)[-1]
    argv = qemu_argv(filling, incoming_fd=7)
    assert argv[argv.index("-incoming") + 1] == "fd:7"
    assert memory_args(spec(tmp_path)) == ["-m", "512"]


def test_backports_come_from_the_mirror_the_host_names(tmp_path: Path) -> None:
    lists = tmp_path / "sources.list.d"
    lists.mkdir()
    (lists / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    assert host.debian_mirror(tmp_path) == ("http://mirror.invalid/debian", "/usr/share/keyrings/k.gpg")
    (lists / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "# a comment\ndeb-src http://other.invalid/debian bookworm main\n"
        "deb [arch=amd64] http://other.invalid/debian bookworm main contrib\n"
    )
    assert host.debian_mirror(tmp_path) == ("http://other.invalid/debian", None)
    (tmp_path / "sources.list").write_text("deb http://other.invalid/debian trixie main\n")
    assert host.debian_mirror(tmp_path) is None
    (lists / "docker.sources").write_text(  # a vendor's repository for bookworm is not Debian's
        "Types: deb\nURIs: https://vendor.invalid/linux/debian-ish\nSuites: bookworm\nComponents: stable\n"
    )
    assert host.debian_mirror(tmp_path) is None


def test_a_helper_left_by_a_killed_maker_is_ended_and_no_other_process(tmp_path: Path) -> None:
    """Stand-in processes for helper QEMUs: what is tested is whom collect() ends."""
    import json
    import sys
    import time

    qmp = f"unix:{tmp_path}/qmp.sock,server=on,wait=off"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {name: subprocess.Popen([*sleeper, qmp]) for name in ("orphan", "young", "made_by_a_live_one")}
    procs["stranger"] = subprocess.Popen(sleeper)  # its pid recorded, but it serves no such socket
    gone = [1, 1]  # a maker that no longer runs (pid 1 started at another time)
    makers = {"orphan": gone, "young": gone, "stranger": gone, "made_by_a_live_one": snapshots._started(os.getpid())}
    made = {}
    try:
        for name, proc in procs.items():
            work = snapshots.snapshots_dir() / f".new-fork-{name}"
            work.mkdir()
            (work / snapshots.HELPER).write_text(json.dumps({"qmp": qmp, "maker": makers[name]}))
            (work / snapshots.HELPER_PID).write_text(str(proc.pid))
            made[name] = work
        made["junk"] = snapshots.snapshots_dir() / ".new-fork-junk"
        made["junk"].mkdir()
        (made["junk"] / snapshots.HELPER).write_text("{not json")
        long_ago = time.time() - snapshots.GRACE - 5
        for name, work in made.items():
            if name != "young":
                os.utime(work, (long_ago, long_ago))
        snapshots.collect()
        assert procs["orphan"].wait(timeout=10) == -9
        assert not (made["orphan"] / snapshots.HELPER).exists()  # dealt with; the directory waits its day
        for name in ("young", "stranger", "made_by_a_live_one"):
            assert procs[name].poll() is None, name
        assert (made["young"] / snapshots.HELPER).exists() and (made["made_by_a_live_one"] / snapshots.HELPER).exists()
        assert (made["junk"] / snapshots.HELPER).exists()  # unreadable: left as it is, and collect() went on
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for work in made.values():
            for path in work.iterdir():
                path.unlink()
            work.rmdir()


def test_a_disk_with_an_external_data_file_is_refused_whatever_it_reads_through(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'host-file'}", str(disk), "16M"],
        check=True,
    )
    with pytest.raises(snapshots.SnapshotError, match="features SmolVM never writes"):
        snapshots.expected_base(disk, tmp_path)


@settings(max_examples=300, deadline=None)
@given(header=st.binary(min_size=0, max_size=200), magic=st.booleans())
def test_a_qcow2_header_a_taken_over_qemu_wrote_is_judged_without_failing(
    tmp_path_factory: pytest.TempPathFactory, header: bytes, magic: bool
) -> None:
    """Whatever bytes stand in a disk's header, the check refuses with ImageError or passes;
    and what it passes has the magic, version 2 or 3, only known features and a bounded size."""
    import struct

    from smolvm.exceptions import ImageError
    from smolvm.images import layers

    data = (b"QFI\xfb" + header[4:]) if magic else header
    disk = tmp_path_factory.mktemp("hdr") / "disk.qcow2"
    disk.write_bytes(data)
    try:
        layers.check_header(disk, max_size=1 << 32, backing=False)
    except ImageError:
        return
    version, offset, size = struct.unpack(">IQI", data[4:20])
    assert data[:4] == b"QFI\xfb" and version in (2, 3) and offset == 0 and size == 0
    assert struct.unpack(">Q", data[24:32])[0] <= 1 << 32
    assert version == 2 or struct.unpack(">Q", data[72:80])[0] & ~layers.KNOWN_FEATURES == 0
