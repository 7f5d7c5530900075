"""``vm.files``: the E2B-style filesystem API, against a real sandbox; and the checks
of what the guest answers, as pure logic."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from smolvm import SmolVM
from smolvm.exceptions import GuestError, GuestFileNotFoundError, ValidationError
from smolvm.filesystem import EntryInfo, FileType, guest_name

GOOD = {"name": "a.txt", "path": "/w/a.txt", "type": "file", "size": 3, "mode": 0o644, "mtime": 1.5e9}


# -- what the guest sends, checked (no sandbox) ----------------------------------------


def test_an_entry_from_the_guest_is_checked() -> None:
    entry = EntryInfo.from_guest(GOOD)
    assert entry == EntryInfo("a.txt", "/w/a.txt", FileType.FILE, 3, 0o644, 1.5e9, None)
    link = EntryInfo.from_guest({**GOOD, "type": "symlink", "target": "../b"})
    assert link.symlink_target == "../b"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {**GOOD, "type": "socketish"},
        {**GOOD, "size": -1},
        {**GOOD, "size": 10**400},
        {**GOOD, "size": "3"},
        {**GOOD, "mode": 0o10000},
        {**GOOD, "mtime": float("nan")},
        {**GOOD, "name": ""},
        {**GOOD, "name": "x" * 256},
        {**GOOD, "path": "/a\0b"},
        {**GOOD, "path": "\ud800"},  # a high surrogate: no file name holds it
        {**GOOD, "type": "symlink", "target": 7},
    ],
)
def test_a_bad_entry_from_the_guest_is_a_guest_error(bad: object) -> None:
    with pytest.raises(GuestError):
        EntryInfo.from_guest(bad)


def test_names_that_are_not_utf8_come_back_as_linux_gives_them() -> None:
    raw = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: surrogateescape
    assert guest_name(raw, "name", 255) == raw
    assert os.fsencode(raw) == b"caf\xe9"


# -- a real sandbox ---------------------------------------------------------------------

vm_only = pytest.mark.vm


@vm_only
def test_write_read_and_describe(vm: SmolVM) -> None:
    info = vm.files.write("/fs/new/dir/a.txt", "héllo\n")  # parents made
    assert (info.type, info.size, info.mode, info.name) == (FileType.FILE, 7, 0o644, "a.txt")
    assert vm.files.read("/fs/new/dir/a.txt") == "héllo\n"
    vm.files.write("/fs/b.bin", b"\x00\xff" * 3, mode=0o600)
    assert vm.files.read("/fs/b.bin", format="bytes") == b"\x00\xff" * 3
    assert vm.files.get_info("/fs/b.bin").mode == 0o600
    assert vm.files.exists("/fs/b.bin") and not vm.files.exists("/fs/nothing")
    assert vm.files.get_info("/fs/new").type is FileType.DIR


@vm_only
def test_write_takes_file_objects_of_known_and_unknown_size(vm: SmolVM, tmp_path: Path) -> None:
    big = os.urandom(3 << 20)  # over a transfer block: goes through the transfer disk
    (tmp_path / "big").write_bytes(big)
    with open(tmp_path / "big", "rb") as f:
        f.seek(1 << 20)  # from where the reader is, as any stream copy does
        vm.files.write("/fs/big", f)
    assert vm.files.read("/fs/big", format="bytes") == big[1 << 20 :]

    class Unsized(io.RawIOBase):  # no seek, no fileno: spooled
        def __init__(self) -> None:
            self.parts = [b"abc", b"def"]

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self.parts.pop(0) if self.parts else b""

    vm.files.write("/fs/unsized", Unsized())
    assert vm.files.read("/fs/unsized") == "abcdef"
    with open(tmp_path / "big") as text, pytest.raises(ValidationError, match="binary"):
        vm.files.write("/fs/text", text)


@vm_only
def test_read_as_a_stream_in_chunks(vm: SmolVM) -> None:
    vm.run("head -c 5000000 /dev/urandom > /fs/stream && sha256sum /fs/stream > /fs/stream.sum")
    chunks = vm.files.read("/fs/stream", format="stream")
    import hashlib

    digest = hashlib.sha256()
    largest = 0
    for chunk in chunks:
        digest.update(chunk)
        largest = max(largest, len(chunk))
    assert largest <= 1 << 20
    assert vm.files.read("/fs/stream.sum").split()[0] == digest.hexdigest()
    with pytest.raises(GuestFileNotFoundError):
        vm.files.read("/fs/missing", format="stream")  # raised at the call, not on the first chunk


@vm_only
def test_list_sorted_with_depth_and_symlinks_not_followed(vm: SmolVM) -> None:
    vm.run(
        "mkdir -p /ls/d/e /outside && touch /ls/a /ls/d/b /ls/d/e/deep /outside/secret && "
        "ln -s /outside /ls/link && ln -s d/b /ls/rel && mkfifo /ls/fifo"
    )
    top = vm.files.list("/ls")
    assert [e.name for e in top] == ["a", "d", "fifo", "link", "rel"]
    kinds = {e.name: e.type for e in top}
    assert kinds == {
        "a": FileType.FILE,
        "d": FileType.DIR,
        "fifo": FileType.OTHER,
        "link": FileType.SYMLINK,
        "rel": FileType.SYMLINK,
    }
    assert {e.name: e.symlink_target for e in top if e.type is FileType.SYMLINK} == {"link": "/outside", "rel": "d/b"}
    deep = [e.path for e in vm.files.list("/ls/", depth=3)]
    assert deep == ["/ls/a", "/ls/d", "/ls/d/b", "/ls/d/e", "/ls/d/e/deep", "/ls/fifo", "/ls/link", "/ls/rel"]
    assert "/ls/link/secret" not in deep


@vm_only
def test_names_beyond_ascii_and_utf8(vm: SmolVM) -> None:
    vm.run("mkdir -p /names && touch '/names/日本語.txt' \"/names/$(printf 'caf\\351')\" \"/names/$(printf 'a\\nb')\"")
    names = {e.name for e in vm.files.list("/names")}
    assert names == {"日本語.txt", os.fsdecode(b"caf\xe9"), "a\nb"}
    weird = "/names/" + os.fsdecode(b"caf\xe9")
    vm.files.write(weird, "latin")
    assert vm.files.read(weird) == "latin"


@vm_only
def test_a_thousand_entries(vm: SmolVM) -> None:
    vm.run("mkdir -p /many && cd /many && touch $(seq -f 'f%04g' 1 1000)")
    entries = vm.files.list("/many")
    assert len(entries) == 1000 and entries[0].name == "f0001" and entries[-1].name == "f1000"


@vm_only
def test_make_dir_remove_and_rename(vm: SmolVM) -> None:
    assert vm.files.make_dir("/mk/a/b") is True
    assert vm.files.make_dir("/mk/a/b") is False
    vm.files.write("/mk/a/b/f", "x")
    vm.run("mkdir -p /keep && touch /keep/target && ln -s /keep /mk/a/link")
    vm.files.remove("/mk/a")  # recursive, and a link inside goes, not what it points to
    assert not vm.files.exists("/mk/a")
    assert vm.files.exists("/keep/target")
    vm.files.write("/mv/one", "1")
    moved = vm.files.rename("/mv/one", "/mv/sub/two")
    assert (moved.path, moved.name, moved.size) == ("/mv/sub/two", "two", 1)
    assert not vm.files.exists("/mv/one") and vm.files.read("/mv/sub/two") == "1"
    assert vm.run("ls -a /mv /mv/sub").stdout.count(".smolvm") == 0  # no upload left beside


@vm_only
def test_bad_requests_get_clear_errors_and_change_nothing(vm: SmolVM) -> None:
    vm.files.write("/bad/file", "keep")
    with pytest.raises(GuestFileNotFoundError, match="does not exist"):
        vm.files.read("/bad/missing")
    with pytest.raises(GuestFileNotFoundError):
        vm.files.get_info("/bad/file/under-a-file")
    with pytest.raises(ValidationError, match="not a directory"):
        vm.files.list("/bad/file")
    with pytest.raises(ValidationError, match="is a directory"):
        vm.files.read("/bad")
    with pytest.raises(ValidationError, match="not a directory"):
        vm.files.make_dir("/bad/file")
    with pytest.raises(ValidationError, match="will not remove /"):
        vm.files.remove("//")
    with pytest.raises(GuestFileNotFoundError):
        vm.files.remove("/bad/missing")
    with pytest.raises(ValidationError, match="absolute"):
        vm.files.read("relative/path")
    with pytest.raises(ValidationError, match="depth"):
        vm.files.list("/bad", depth=0)
    with pytest.raises(ValidationError, match="format"):
        vm.files.read("/bad/file", format="json")  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="text, bytes or a binary file"):
        vm.files.write("/bad/x", 42)  # type: ignore[arg-type]
    vm.files.make_dir("/bad/dir/full")
    with pytest.raises(ValidationError, match="is a directory"):
        vm.files.rename("/bad/file", "/bad/dir")  # a non-empty directory is never replaced
    assert vm.files.read("/bad/file") == "keep"


# -- whole trees --------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "empty").mkdir(parents=True)
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "src" / "pkg" / "日本語.py").write_text("print('hi')\n")
    for i in range(1000):
        (root / "src" / f"f{i:04d}.txt").write_text(f"file {i}\n")
    os.symlink("../run.sh", root / "src" / "inside")
    os.symlink("/etc/hostname", root / "outside")
    os.utime(root / "run.sh", (1_500_000_000, 1_500_000_000))


@vm_only
def test_a_tree_goes_in_and_comes_back(vm: SmolVM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    sent = vm.upload_dir(src, "/trees/repo")
    assert (sent.files, sent.symlinks) == (1002, 2)
    seen = vm.run(
        "cd /trees/repo && stat -c '%a %Y %U' run.sh && readlink src/inside outside && "
        "ls src | wc -l && test -d empty && ./run.sh && ls -a /trees"
    ).stdout.split("\n")
    assert seen[:7] == ["755 1500000000 root", "../run.sh", "/etc/hostname", "1002", "run", ".", ".."]
    assert seen[7:] == ["repo", ""]  # nothing left beside it: no archive, no staging directory
    back = tmp_path / "back"
    got = vm.download_dir("/trees/repo", back)
    assert got.files == 1002 and got.skipped == [("outside", "a symlink to '/etc/hostname', outside the tree")]
    assert (back / "src" / "pkg" / "日本語.py").read_text() == "print('hi')\n"
    assert (back / "run.sh").stat().st_mtime == 1_500_000_000
    assert os.readlink(back / "src" / "inside") == "../run.sh" and not (back / "outside").is_symlink()
    assert (back / "empty").is_dir() and len(os.listdir(back / "src")) == 1002
    assert sorted(os.listdir(tmp_path)) == ["back", "src"]


@vm_only
def test_an_upload_merges_into_an_existing_directory(vm: SmolVM, tmp_path: Path) -> None:
    vm.run("mkdir -p /merge/keep /merge/sub && echo old > /merge/a && echo mine > /merge/keep/x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_text("new\n")
    (tmp_path / "sub" / "b").write_text("b\n")
    vm.upload_dir(tmp_path, "/merge")
    assert vm.run("cat /merge/a /merge/keep/x /merge/sub/b").stdout == "new\nmine\nb\n"
    vm.run("mkdir -p /clash/a/full && touch /clash/a/full/x")
    with pytest.raises(ValidationError, match="is a directory"):
        vm.upload_dir(tmp_path, "/clash")  # a file where a non-empty directory is: refused
    assert vm.run("ls -a /clash").stdout.split() == [".", "..", "a"]


@vm_only
def test_tree_transfers_refuse_bad_input_and_keep_what_is_there(vm: SmolVM, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a directory on this host"):
        vm.upload_dir(tmp_path / "missing", "/x")
    vm.files.write("/tfile", "keep")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_text("f")
    with pytest.raises(ValidationError, match="not a directory"):
        vm.upload_dir(tmp_path / "t", "/tfile")
    assert vm.files.read("/tfile") == "keep"
    with pytest.raises(ValidationError, match="not a directory"):
        vm.download_dir("/tfile", tmp_path / "d1")
    with pytest.raises(GuestFileNotFoundError):
        vm.download_dir("/nothing/here", tmp_path / "d2")
    with pytest.raises(ValidationError, match="not empty"):
        vm.download_dir("/trees", tmp_path)  # never merged into a non-empty directory
    assert sorted(os.listdir(tmp_path)) == ["t"]


@vm_only
def test_a_hostile_guest_tree_writes_nothing_outside(vm: SmolVM, tmp_path: Path) -> None:
    """The guest's own tar, given a tree built to escape: links out, a FIFO, odd names."""
    vm.run(
        "mkdir -p /evil/d && cd /evil && ln -s /etc etc && ln -s ../../.. up && ln -s / root && "
        "mkfifo pipe && printf x > \"$(printf 'new\\nline')\" && printf y > \"$(printf 'bad\\377')\" && "
        "ln d/../etc hard 2>/dev/null; ln -s etc d/via && head -c 100000 /dev/zero > d/big && ln d/big d/big2"
    )
    got = vm.download_dir("/evil", tmp_path / "out")
    assert sorted(p for p, _ in got.skipped) == ["etc", "hard", "pipe", "root", "up"]
    names = set(os.listdir(tmp_path / "out"))
    assert names == {"d", "new\nline", os.fsdecode(b"bad\xff")}
    assert os.readlink(tmp_path / "out" / "d" / "via") == "etc"  # inside the tree (dangling there): kept
    assert (tmp_path / "out" / "d" / "big").stat().st_ino == (tmp_path / "out" / "d" / "big2").stat().st_ino
    assert sorted(os.listdir(tmp_path)) == ["out"]


@vm_only
def test_a_tree_whose_tar_complains_a_lot_still_comes(vm: SmolVM, tmp_path: Path) -> None:
    """tar warns once per socket ("socket ignored"): far more than a pipe holds."""
    vm.run(
        "mkdir -p /noisy && python3 -c 'import socket\nfor i in range(2500):\n"
        ' socket.socket(socket.AF_UNIX).bind("/noisy/s%04d-%s" % (i, "x" * 60))\' && touch /noisy/kept',
        timeout=120,
    )
    got = vm.download_dir("/noisy", tmp_path / "out", timeout=120)
    assert os.listdir(tmp_path / "out") == ["kept"] and got.files == 1


@vm_only
def test_big_files_of_a_tree_move_on_their_own_and_keep_what_tar_keeps(vm: SmolVM, tmp_path: Path) -> None:
    """Files from 4 MiB go beside the tar stream, as single files do: both ways, with
    their modes, mtimes and places; a hard link to one arrives as a copy. The rest,
    3 MiB of it, goes through the transfer disk as tar."""
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "mid").mkdir()
    mid = [os.urandom(1 << 20) for _ in range(3)]
    for i, data in enumerate(mid):
        (src / "mid" / f"m{i}").write_bytes(data)
    big = os.urandom(5 << 20)
    (src / "deep" / "er" / "big.bin").write_bytes(big)
    os.chmod(src / "deep" / "er" / "big.bin", 0o600)
    os.utime(src / "deep" / "er" / "big.bin", (1_400_000_000, 1_400_000_000))
    os.link(src / "deep" / "er" / "big.bin", src / "twin.bin")
    (src / "small.txt").write_text("small\n")
    os.utime(src / "deep", (1_300_000_000, 1_300_000_000))  # a directory's time outlives what lands in it
    sent = vm.upload_dir(src, "/bigtree")
    assert (sent.files, sent.bytes) == (6, 2 * len(big) + 6 + (3 << 20))
    seen = vm.run("cd /bigtree && stat -c '%a %Y %s %h' deep/er/big.bin twin.bin && stat -c %Y deep && ls -a /")
    lines = seen.stdout.split("\n")
    assert lines[:3] == [f"600 1400000000 {len(big)} 1", f"600 1400000000 {len(big)} 1", "1300000000"]
    assert not any(".smolvm-" in name for name in lines[3:])
    vm.run(
        "printf x > \"/bigtree/$(printf 'bad\\377')\" && head -c 5000000 /dev/zero > \"/bigtree/$(printf 'z\\377')\""
    )
    back = vm.download_dir("/bigtree", tmp_path / "back")
    assert back.files == 8 and back.skipped == []
    assert [(tmp_path / "back" / "mid" / f"m{i}").read_bytes() for i in range(3)] == mid
    out = tmp_path / "back"
    assert (out / "deep" / "er" / "big.bin").read_bytes() == big == (out / "twin.bin").read_bytes()
    assert (out / "deep" / "er" / "big.bin").stat().st_mtime == 1_400_000_000
    assert stat_mode(out / "deep" / "er" / "big.bin") == 0o600
    assert (out / "deep").stat().st_mtime == 1_300_000_000
    assert (out / os.fsdecode(b"z\xff")).stat().st_size == 5_000_000  # a name JSON cannot carry: through tar


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@vm_only
def test_trees_go_on_the_wire_while_the_transfer_disk_is_busy(vm: SmolVM, tmp_path: Path) -> None:
    from smolvm import locks

    src = tmp_path / "src"
    make_tree(src)
    (src / "big.bin").write_bytes(os.urandom(5 << 20))
    with vm._transfer() as held:  # another transfer has the disk
        assert held is not None and locks.try_lock(held.with_suffix(".lock")) is None
        vm.upload_dir(src, "/wired")
        got = vm.download_dir("/wired", tmp_path / "back")
    assert got.files == 1003
    assert (tmp_path / "back" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert len(os.listdir(tmp_path / "back" / "src")) == 1002


@vm_only
def test_a_tree_that_cannot_fit_is_refused_before_any_of_it_is_sent(vm: SmolVM, tmp_path: Path) -> None:
    vm.run("mkdir -p /small && mount -t tmpfs -o size=1m tmpfs /small && mkdir /small/kept")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    with pytest.raises(ValidationError, match="needs 3 MB and /small has 1 MB free"):
        vm.upload_dir(src, "/small/tree")
    assert vm.run("ls -a /small").stdout.split() == [".", "..", "kept"]


@vm_only
def test_an_upload_cut_off_midway_leaves_nothing_in_the_sandbox(vm: SmolVM, tmp_path: Path) -> None:
    from smolvm.exceptions import OperationTimeoutError

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"part{i:02d}.bin").write_bytes(os.urandom(3 << 20))  # small enough for the tar stream
    with pytest.raises(OperationTimeoutError):
        vm.upload_dir(src, "/cut/tree", timeout=0.5)
    left = ""
    for _ in range(50):  # the agent cleans up once it sees the host go
        left = vm.run("ls -a /cut 2>/dev/null; ls -a / | grep smolvm || true").stdout
        if left.split() in ([], [".", ".."]):
            break
        time.sleep(0.2)
    assert left.split() in ([], [".", ".."])


@vm_only
def test_an_upload_whose_tar_fails_midway_says_why_and_leaves_nothing(vm: SmolVM, tmp_path: Path) -> None:
    vm.run("mkdir -p /few && mount -t tmpfs -o size=64m,nr_inodes=8 tmpfs /few")  # room, but few files
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}").write_bytes(os.urandom(100_000))
    with pytest.raises(GuestError, match="unpacking the tree failed: .*No space left"):
        vm.upload_dir(src, "/few/tree")
    assert vm.run("ls -a /few").stdout.split() == [".", ".."]


@vm_only
def test_a_listing_of_long_names_is_cut_to_fit_its_messages(vm: SmolVM) -> None:
    """300 links whose targets each take 24 KB as JSON: far more than one message holds."""
    vm.run(
        'python3 -c \'import os\nos.makedirs("/lst")\nfor i in range(300):\n'
        ' os.symlink(b"\\xff" * 4000, b"/lst/l%03d" % i)\''
    )
    entries = vm.files.list("/lst")
    assert len(entries) == 300
    assert {os.fsencode(e.symlink_target or "") for e in entries} == {b"\xff" * 4000}


@vm_only
def test_a_tree_of_nothing_but_big_files_needs_no_tar(vm: SmolVM, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(6 << 20)
    (src / "only.bin").write_bytes(blob)
    vm.upload_dir(src, "/onlybig")
    got = vm.download_dir("/onlybig", tmp_path / "back")
    assert (got.files, got.dirs, got.bytes) == (1, 0, len(blob))
    assert os.listdir(tmp_path / "back") == ["only.bin"] and (tmp_path / "back" / "only.bin").read_bytes() == blob
