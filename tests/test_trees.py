"""Unpacking a tree the guest sends, as a hostile guest would send it: nothing may land
outside the destination, what is refused is named, and a refused tree leaves nothing."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm.exceptions import GuestError, ValidationError
from smolvm.trees import MAX_HEADER, Unpacker, iter_reader, link_stays_inside, member_parts, pack


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


def unpack(tmp_path: Path, data: bytes, name: str = "out") -> tuple[Path, object]:
    dest = tmp_path / name
    report = Unpacker(dest, "test download").run(io.BytesIO(data))
    return dest, report


def only(tmp_path: Path) -> set[str]:
    """Everything under tmp_path, relative: to show nothing else was written."""
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


def refused(tmp_path: Path, data: bytes, needle: str) -> None:
    before = only(tmp_path)
    with pytest.raises(GuestError, match=needle):
        unpack(tmp_path, data)
    assert only(tmp_path) == before  # the half-made tree is gone, the destination never made


def test_a_tree_round_trips_with_modes_times_links_and_empty_dirs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "日本語 a\nb").write_bytes(b"x" * 3000)
    (src / "sub" / os.fsdecode(b"caf\xe9")).write_text("latin")
    os.symlink("../run.sh", src / "sub" / "inside")
    os.symlink("/etc/passwd", src / "outside")
    os.link(src / "run.sh", src / "hard")
    os.utime(src / "run.sh", (1_500_000_000, 1_500_000_000))
    buf = io.BytesIO()
    pack(src, buf)
    dest, report = unpack(tmp_path, buf.getvalue())
    assert (dest / "run.sh").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755 & ~0o022
    assert (dest / "run.sh").stat().st_mtime == 1_500_000_000
    assert (dest / "sub" / "empty").is_dir()
    assert (dest / "sub" / "日本語 a\nb").read_bytes() == b"x" * 3000
    assert (dest / "sub" / os.fsdecode(b"caf\xe9")).read_text() == "latin"
    assert os.readlink(dest / "sub" / "inside") == "../run.sh"
    assert (dest / "hard").stat().st_ino == (dest / "run.sh").stat().st_ino
    assert not (dest / "outside").exists() and not (dest / "outside").is_symlink()
    assert report.skipped == [("outside", "a symlink to '/etc/passwd', outside the tree")]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name, needle",
    [
        ("../escape", "climbs out"),
        ("a/../../escape", "climbs out"),
        ("..", "climbs out"),
        ("/etc/evil", "absolute"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_names_that_leave_the_tree_are_refused(tmp_path: Path, name: str, needle: str) -> None:
    refused(tmp_path, tar_of(entry("ok", data=b"1"), entry(name, data=b"evil")), needle)


def test_a_file_through_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    # an inside link to a directory, then a file "through" it: written nowhere
    data = tar_of(entry("d", tarfile.DIRTYPE), entry("l", tarfile.SYMTYPE, linkname="d"), entry("l/f", data=b"x"))
    refused(tmp_path, data, "through a symlink")
    # an outside link is skipped, so a file under its name makes a real directory instead
    data = tar_of(entry("l", tarfile.SYMTYPE, linkname=str(target)), entry("l/f", data=b"x"))
    dest, _ = unpack(tmp_path, data)
    assert (dest / "l").is_dir() and not (dest / "l").is_symlink() and not any(target.iterdir())


def test_a_file_through_a_file_and_duplicates_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, tar_of(entry("f", data=b"1"), entry("f/g", data=b"2")), "through a symlink or a file")
    refused(tmp_path, tar_of(entry("f", data=b"1"), entry("f", data=b"2")), "twice")
    refused(tmp_path, tar_of(entry("d", tarfile.DIRTYPE), entry("d", data=b"2")), "twice")
    refused(tmp_path, tar_of(entry("f", data=b"1"), entry("f", tarfile.DIRTYPE)), "as a file and as a directory")


def test_hard_links_only_to_files_of_the_tree(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host")
    refused(tmp_path, tar_of(entry("h", tarfile.LNKTYPE, linkname=str(secret))), "absolute")
    refused(tmp_path, tar_of(entry("h", tarfile.LNKTYPE, linkname="../secret")), "climbs out")
    refused(tmp_path, tar_of(entry("h", tarfile.LNKTYPE, linkname="nothing")), "not in the tree")
    data = tar_of(entry("l", tarfile.SYMTYPE, linkname="/etc"), entry("h", tarfile.LNKTYPE, linkname="l"))
    dest, report = unpack(tmp_path, data)  # a hard link to a symlink (here a skipped one) is skipped too
    assert os.listdir(dest) == [] and [p for p, _ in report.skipped] == ["l", "h"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_skipped_and_named(tmp_path: Path, kind: bytes) -> None:
    dest, report = unpack(tmp_path, tar_of(entry("dev", kind), entry("f", data=b"ok")))
    assert sorted(os.listdir(dest)) == ["f"]
    assert report.skipped == [("dev", "a device, FIFO or socket")]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "target, at_top, one_down",
    [
        ("a", True, True),
        ("./a/b", True, True),
        ("./a/../b", False, False),  # a ".." after a name climbs from wherever that name leads
        ("..", False, True),
        ("../x", False, True),
        ("d/../../x", False, False),
        ("../../x", False, False),
        ("/etc", False, False),
        ("", False, False),
    ],
)
def test_symlink_targets_judged_from_the_links_directory(target: str, at_top: bool, one_down: bool) -> None:
    assert link_stays_inside(["link"], target) is at_top
    assert link_stays_inside(["top", "link"], target) is one_down


def test_links_through_links_cannot_climb_out(tmp_path: Path) -> None:
    data = tar_of(
        entry("a", tarfile.DIRTYPE),
        entry("a/up", tarfile.SYMTYPE, linkname=".."),  # the tree itself: kept
        entry("a/esc", tarfile.SYMTYPE, linkname="up/.."),  # would be the tree's parent
    )
    dest, report = unpack(tmp_path, data)
    assert os.readlink(dest / "a" / "up") == ".." and not (dest / "a" / "esc").is_symlink()
    assert [p for p, _ in report.skipped] == ["a/esc"]  # type: ignore[attr-defined]


def test_odd_kinds_sizes_and_headers_are_refused_at_once(tmp_path: Path) -> None:
    info = tarfile.TarInfo("odd")
    info.type = b"Z"
    raw = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    raw[124:136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # base-256: a size tarfile would skip by reading
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    refused(tmp_path, bytes(raw) + b"\0" * 1024, "kind or size")
    glob = tarfile.TarInfo("g")
    glob.type = tarfile.XGLTYPE
    glob.size = 20
    refused(tmp_path, glob.tobuf(format=tarfile.USTAR_FORMAT) + b"20 comment=xxxxxxxx\n".ljust(512, b"\0"), "global")


def test_streams_that_lie(tmp_path: Path) -> None:
    good = tar_of(entry("a", data=b"x" * 5000), entry("b", data=b"y"))
    refused(tmp_path, good[:3000], "broken tree|ended before")  # ends inside a file
    refused(tmp_path, b"not a tar at all" * 100, "broken tree")
    # a size that says more than the stream holds
    info, data = entry("a", data=b"x" * 600)
    raw = bytearray(tar_of((info, data)))
    raw[124:136] = b"%011o\0" % 20000  # the size field of the first header
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % (sum(raw[:512]))
    refused(tmp_path, bytes(raw), "broken tree|ended before")


@pytest.mark.parametrize("mtime", ["1" + "0" * 30, "-1" + "0" * 30, "nan", "inf"])
def test_a_time_no_file_can_have_is_refused(tmp_path: Path, mtime: str) -> None:
    member = entry("a", data=b"x", pax_headers={"mtime": mtime})  # as a pax record: tarfile reads any float
    refused(tmp_path, tar_of(member), "time out of range|broken tree")


def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = MAX_HEADER + 1
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    refused(tmp_path, header + b"\0" * 4096, "broken tree")


def test_names_with_nul_or_too_long() -> None:
    with pytest.raises(GuestError, match="bad name"):
        member_parts("a\0b")
    with pytest.raises(GuestError, match="bad name"):
        member_parts("a/" * 3000)
    assert member_parts("./a//b/.") == ["a", "b"]
    assert member_parts("./") == []


def test_the_destination_is_new_or_an_empty_directory(tmp_path: Path) -> None:
    data = tar_of(entry("f", data=b"1"))
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ValidationError, match="not a directory"):
        unpack(tmp_path, data, "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old").write_text("keep")
    with pytest.raises(ValidationError, match="not empty"):
        unpack(tmp_path, data, "full")
    assert (tmp_path / "full" / "old").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    dest, _ = unpack(tmp_path, data, "empty")
    assert (dest / "f").read_text() == "1"
    with pytest.raises(ValidationError, match="make it first"):
        unpack(tmp_path, data, "no/such/parent")


def test_a_hundred_thousand_empty_files_through_a_chunked_reader(tmp_path: Path) -> None:
    members = [entry("d%d" % (i % 100), tarfile.DIRTYPE) for i in range(100)]
    members += [entry("d%d/f%d" % (i % 100, i)) for i in range(100_000)]
    data = tar_of(*members, fmt=tarfile.GNU_FORMAT)
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    report = Unpacker(tmp_path / "many", "test").run(iter_reader(chunks))
    assert (
        report.files == 100_000
        and sum(len(os.listdir(tmp_path / "many" / d)) for d in os.listdir(tmp_path / "many")) == 100_000
    )


def test_an_error_mid_stream_removes_what_was_written(tmp_path: Path) -> None:
    data = tar_of(entry("a", data=b"1" * 100_000), entry("b", data=b"2"))

    def broken() -> Iterator[bytes]:
        yield data[:60_000]
        raise GuestError("the guest went away")

    with pytest.raises(GuestError, match="went away"):
        Unpacker(tmp_path / "out", "test").run(iter_reader(broken()))
    assert only(tmp_path) == set()
