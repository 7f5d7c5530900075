"""Whole directory trees as tar streams: packed on the host for an upload, and a
guest's stream unpacked on the host for a download, as if the guest were hostile.

Unpacking writes only inside a new directory of its own beside the destination,
through directory descriptors opened without following links, and renames it
into place at the end: an interrupted or refused download leaves nothing under
the destination's name. What a tree may hold:

- regular files, directories and hard links to files already in the tree;
- symlinks whose target stays inside the tree (checked on the text of the
  target, from the link's own directory); others are skipped and reported;
- devices, FIFOs and sockets are skipped and reported;
- a name that is absolute, climbs out (``..``), holds NUL, is too long, or
  comes twice, ends the download with a GuestError naming it, as does a
  stream that is not tar, ends early, or lies about a size.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from . import protocol as P
from .exceptions import GuestError, GuestFileNotFoundError, HostError, OperationTimeoutError, ValidationError

MAX_ENTRIES = 1 << 20  # entries one downloaded tree may hold
MAX_HEADER = 16 << 10  # bytes of one extended header: a long name and link target fit; pax parsing stays cheap
NAME_MAX = 255
PATH_MAX = 4096
COPY = 1 << 20
MAX_SIZE = 64 << 30  # bytes of one file in a downloaded tree
KINDS = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                   tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE))  # fmt: skip
MAX_TIME = 1 << 40  # seconds either side of the epoch a modification time may be
MAX_TRAILER = 1 << 20  # bytes after the archive's end (tar pads to its record size)


# A file of a downloaded tree sent apart from its stream: its name in the tree, mode,
# mtime, and how to ask for its (size, bytes).
Apart = tuple[str, int, float, Callable[[], tuple[int, Iterator[bytes]]]]


@dataclass
class TreeReport:
    """What a directory transfer did: counts, and what it left out and why."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path in the tree, why)


class _BoundedInfo(tarfile.TarInfo):
    """A tar header whose extensions (long names, pax records) are bounded before tarfile reads them."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in (tarfile.XGLTYPE, tarfile.GNUTYPE_SPARSE):  # tarfile copies or reads these unbounded
            raise tarfile.HeaderError("a global or sparse header (GNU tar sends neither for a plain tree)")
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER:  # fmt: skip
            raise tarfile.HeaderError(f"an extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def member_parts(name: str) -> list[str]:
    """The components of a member's name, relative to the tree; [] for the tree itself.
    Raises GuestError for a name that would leave the tree or that no file could have."""
    if "\0" in name or len(os.fsencode(name)) > PATH_MAX:
        raise GuestError(f"the sandbox sent an entry with a bad name {name[:200]!r}")
    if name.startswith("/"):
        raise GuestError(f"the sandbox sent an absolute entry {name[:200]!r}: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise GuestError(f"the sandbox sent an entry that climbs out of the tree, {name[:200]!r}: refused")
        if len(os.fsencode(part)) > NAME_MAX:
            raise GuestError(f"the sandbox sent a name longer than {NAME_MAX} bytes in {name[:200]!r}")
    return parts


def link_stays_inside(parts: list[str], target: str) -> bool:
    """Whether a symlink at ``parts`` pointing to ``target`` stays inside the tree: only
    ``../`` steps first (no more than the link is deep), then names. A ``..`` after a
    name could climb from wherever that name, itself a link, leads; so none is kept.
    Every parent in the tree is a real directory, so chains of kept links stay inside too."""
    if not target or target.startswith("/") or "\0" in target or len(os.fsencode(target)) > PATH_MAX:
        return False
    climbs = 0
    named = False
    for part in target.split("/"):
        if part == "..":
            if named:
                return False
            climbs += 1
        elif part not in ("", "."):
            named = True
    return climbs <= len(parts) - 1


class Unpacker:
    """Unpacks one tar stream into a new directory, then renames it to ``dest``."""

    def __init__(self, dest: Path, what: str, deadline: float | None = None) -> None:
        self.dest = dest
        self.what = what
        self.deadline = deadline
        self.umask = _umask()
        self.report = TreeReport()
        self.stage = dest.parent / f".{dest.name}.smolvm-part-{secrets.token_hex(4)}"
        self.files: set[tuple[str, ...]] = set()  # regular files written: hard links may name them
        self.seen: set[tuple[str, ...]] = set()
        self.dir_times: list[tuple[tuple[str, ...], int, float]] = []
        self.root = -1

    def run(self, stream: BinaryIO, apart: Iterable[Apart] = ()) -> TreeReport:
        """Unpack ``stream``, then the files sent ``apart`` from it (read once it has ended)."""
        check_destination(self.dest)
        os.mkdir(self.stage, 0o700)
        try:
            self.root = os.open(self.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                self._unpack(stream)
                self._drain(stream)
                for name, mode, mtime, fetch in apart:
                    self._apart(name, mode, mtime, fetch)
                self._dir_times()
            finally:
                os.close(self.root)
            check_destination(self.dest)  # nothing came there meanwhile
            if self.dest.is_dir():
                self.dest.rmdir()  # empty, checked: the tree takes its place
            os.rename(self.stage, self.dest)
            os.chmod(self.dest, 0o755 & ~self.umask)
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise
        return self.report

    def _unpack(self, stream: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedInfo) as tar:
                count = 0
                for member in tar:
                    count += 1
                    if count > MAX_ENTRIES:
                        raise GuestError(f"the tree of {self.what} has more than {MAX_ENTRIES} entries: refused")
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        raise OperationTimeoutError(f"{self.what} did not finish in time")
                    self._member(member, functools.partial(tar.extractfile, member))
                    tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member, also in stream mode
        except (tarfile.TarError, EOFError, ValueError, OverflowError, IndexError, RecursionError) as exc:
            # tarfile's own, and what its parsers raise on fields no archive has
            raise GuestError(f"{self.what}: the sandbox sent a broken tree ({str(exc)[:200]})") from None

    def _drain(self, stream: BinaryIO) -> None:
        """Read the stream to its end (the sender's verdict comes there) before the tree is
        put in place; tar's padding is all that may follow the archive."""
        left = MAX_TRAILER
        while chunk := stream.read(COPY):
            left -= len(chunk)
            if left < 0:
                raise GuestError(f"{self.what}: the sandbox sent more after the end of the tree than tar pads")

    def _apart(self, name: str, mode: int, mtime: float, fetch: Callable[[], tuple[int, Iterator[bytes]]]) -> None:
        """One file of the tree sent on its own (a big one): checked as a member of the
        stream is, its bytes asked for only then. One gone meanwhile is reported, as tar
        reports a file that changed while it was read."""
        member_parts(name)
        try:
            size, chunks = fetch()
        except (GuestFileNotFoundError, ValidationError):  # gone, or no longer a file
            self.report.skipped.append((name, "changed before it was read"))
            return
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode, info.mtime = tarfile.REGTYPE, size, mode, mtime
        self._member(info, lambda: iter_reader(chunks))
        for _ in chunks:  # to its end: the last window is given back, the guest's verdict read
            pass

    def _member(self, member: tarfile.TarInfo, source: Callable[[], IO[bytes] | None]) -> None:
        parts = member_parts(member.name)
        if not parts:
            return  # the tree's own entry: the destination gets the umask's mode
        key = tuple(parts)
        shown = "/".join(parts)
        if key in self.seen and not member.isdir():
            raise GuestError(f"{self.what}: the sandbox sent {shown!r} twice: refused")
        self.seen.add(key)
        if member.type not in KINDS or not 0 <= member.size <= MAX_SIZE:
            # refused before tarfile skips it: a huge size is a seek tarfile makes by reading
            raise GuestError(f"{self.what}: {shown!r} is of a kind or size no tree has: refused")
        if any(k.startswith("GNU.sparse") for k in member.pax_headers):
            raise GuestError(f"{self.what}: {shown!r} is a sparse file record (GNU tar sends none here): refused")
        mtime = member.mtime
        if not isinstance(mtime, (int, float)) or not -MAX_TIME <= mtime <= MAX_TIME:  # also false for nan
            raise GuestError(f"{self.what}: {shown!r} has a modification time out of range: refused")
        parent = self._parent(parts[:-1], shown)
        try:
            name = parts[-1]
            if member.isdir():
                try:
                    os.mkdir(name, 0o700, dir_fd=parent)
                    self.report.dirs += 1
                except FileExistsError:
                    if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                        raise GuestError(f"{self.what}: {shown!r} came as a file and as a directory") from None
                self.dir_times.append((key, member.mode & 0o777, member.mtime))
            elif member.isreg():
                self._file(source(), member, parent, name, key)
            elif member.issym():
                if link_stays_inside(parts, member.linkname):
                    os.symlink(member.linkname, name, dir_fd=parent)
                    self.report.symlinks += 1
                else:
                    self.report.skipped.append((shown, f"a symlink to {member.linkname[:200]!r}, outside the tree"))
            elif member.islnk():
                target = tuple(member_parts(member.linkname))
                if target not in self.seen:
                    raise GuestError(f"{self.what}: {shown!r} is a hard link to something not in the tree: refused")
                if target not in self.files:  # to a symlink, a device, a skipped entry
                    self.report.skipped.append((shown, "a hard link to something that is not a file"))
                    return
                src = self._parent(list(target[:-1]), shown)
                try:
                    os.link(target[-1], name, src_dir_fd=src, dst_dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(src)
                self.report.files += 1
            else:
                self.report.skipped.append((shown, "a device, FIFO or socket"))
        except FileExistsError:
            raise GuestError(f"{self.what}: the sandbox sent {shown!r} twice: refused") from None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EMLINK, errno.ELOOP, errno.EINVAL):
                raise GuestError(f"{self.what}: {shown!r} cannot be made here ({exc.strerror}): refused") from None
            raise HostError(f"{self.what}: writing {shown!r} under {self.dest.parent} failed: {exc}") from None
        finally:
            os.close(parent)

    def _parent(self, parts: list[str], shown: str) -> int:
        """A descriptor of the directory ``parts`` in the tree, made if missing, never through a link."""
        fd = os.dup(self.root)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)  # a parent the stream did not send: the umask's mode
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        through = f"{self.what}: {shown!r} would be written through a symlink or a file: refused"
                        raise GuestError(through) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _file(
        self, source: IO[bytes] | None, member: tarfile.TarInfo, parent: int, name: str, key: tuple[str, ...]
    ) -> None:
        assert source is not None
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        try:
            left = member.size
            while left:
                chunk = source.read(min(COPY, left))
                if not chunk:
                    raise GuestError(f"{self.what}: {'/'.join(key)!r} ended before its {member.size} bytes")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
            os.fchmod(fd, member.mode & 0o777 & ~self.umask)  # never setuid, setgid or sticky
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        self.files.add(key)
        self.report.files += 1
        self.report.bytes += member.size

    def _dir_times(self) -> None:
        """Directories' modes and times last (writing into one changes its time), deepest first."""
        for key, mode, mtime in sorted(self.dir_times, key=lambda t: -len(t[0])):
            parent = self._parent(list(key[:-1]), "/".join(key))
            try:
                os.chmod(key[-1], (mode | 0o700) & ~self.umask, dir_fd=parent, follow_symlinks=False)
                os.utime(key[-1], (mtime, mtime), dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)


def check_destination(dest: Path) -> None:
    """A download's destination: a new name, or an empty directory. Never merged into."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise ValidationError(f"{dest.parent} is not a directory on this host: make it first") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ValidationError(f"{dest} exists and is not a directory: give a new name, or remove it first")
    if any(dest.iterdir()):
        raise ValidationError(f"{dest} is not empty: a tree is never merged into one; give a new or empty directory")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pack(local: Path, out: BinaryIO, report: TreeReport | None = None, leave_out: frozenset[str] = frozenset()) -> None:
    """Write the tree at ``local`` (its contents, not the directory's own name) as a tar
    stream: modes, mtimes (to the second, as tar keeps them), empty directories,
    symlinks as they are, hard links once, everything owned by root. Sockets, FIFOs
    and devices are left out (and reported), as are the files named in ``leave_out``
    (counted: they go another way). Headers are made here from one lstat each:
    tarfile.add looks up each file's owner by name, which costs more than the rest."""
    report = report if report is not None else TreeReport()
    linked: dict[tuple[int, int], str] = {}  # files with more than one name: the first one sent
    # tarfile's default buffer: a bigger one is slower, as it grows a bytes object by appending
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        todo = [(local, "")]
        while todo:
            top, prefix = todo.pop()
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
            later = []
            for entry in entries:
                name = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                info = tarfile.TarInfo(name)
                info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
                info.uname = info.gname = "root"
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    report.dirs += 1
                    tar.addfile(info)
                    later.append((Path(entry.path), name + "/"))
                elif stat.S_ISLNK(st.st_mode):
                    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.path)
                    report.symlinks += 1
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    report.files += 1
                    report.bytes += st.st_size
                    if name in leave_out:
                        continue
                    first = linked.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
                    if first is not None:
                        info.type, info.linkname = tarfile.LNKTYPE, first
                        tar.addfile(info)
                        continue
                    if st.st_nlink > 1:
                        linked[(st.st_dev, st.st_ino)] = name
                    info.size = st.st_size
                    with open(os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                        tar.addfile(info, f)  # the size seen: a file that grows is cut there, one that shrinks fails
                else:
                    report.skipped.append((name, "a device, FIFO or socket"))
            todo.extend(reversed(later))  # then each directory in turn, in name order


def scan(local: Path, big_from: int = P.APART_FROM) -> tuple[int, list[tuple[str, Path]]]:
    """The bytes the files under ``local`` hold (a block for each entry), to check for
    room first; and its files of ``big_from`` bytes or more, by name in the tree, which
    move faster one by one than through tar (a hard link to one goes as a copy)."""
    total = 0
    big: list[tuple[str, Path]] = []
    for top, dirs, files in os.walk(local):
        for name in sorted(dirs + files):
            path = Path(top) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            regular = stat.S_ISREG(st.st_mode)
            total += (st.st_size if regular else 0) + 4096
            if regular and st.st_size >= big_from:
                big.append((path.relative_to(local).as_posix(), path))
    return total, big


def iter_reader(chunks: Iterator[bytes]) -> BinaryIO:
    """A binary reader over an iterator of byte chunks (tarfile reads a stream through it)."""

    class _Reader(io.RawIOBase):
        def __init__(self) -> None:
            self.rest = b""

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            while not self.rest:
                try:
                    self.rest = next(chunks)
                except StopIteration:
                    return 0
            n = min(len(buf), len(self.rest))
            buf[:n] = self.rest[:n]
            self.rest = self.rest[n:]
            return n

    return io.BufferedReader(_Reader(), COPY)
