"""``vm.files``: the sandbox's filesystem, named as the E2B SDK names it.

Every call goes to the guest agent (``files.py`` on its side) on one
connection; whatever the guest answers is checked before it is returned:
names and paths are bounded text (undecodable bytes of a Linux name come
back as ``surrogateescape`` characters, as ``os.listdir`` gives them), sizes
and times are numbers in range, and a listing is bounded in entries.
"""

from __future__ import annotations

import builtins
import enum
import io
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar, overload

from . import trees
from .agent_client import MAX_DOWNLOAD, guest_number
from .exceptions import GuestError, GuestFileNotFoundError, SmolVMError, ValidationError

if TYPE_CHECKING:
    from .sandbox import SmolVM

T = TypeVar("T")
LIST_LIMIT = 1 << 18  # entries one listing may return (the agent stops there too)
READ_LIMIT = 1 << 30  # bytes read() holds in memory; format="stream" or download_file for more
SPOOL = 8 << 20  # a reader of unknown size is held in memory up to this, then in a temporary file


@dataclass(frozen=True)
class Sized:
    """A binary reader that cannot seek (a socket, a request body) and the number of
    bytes it will give: ``files.write`` streams it as it comes, with no spooling."""

    reader: BinaryIO
    size: int


Data = str | bytes | bytearray | memoryview | BinaryIO | Sized


class FileType(str, enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"  # never followed: ``symlink_target`` says where it points
    OTHER = "other"  # a device, FIFO or socket


@dataclass(frozen=True)
class EntryInfo:
    """One entry of the sandbox's filesystem, as ``lstat`` sees it."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int  # permission bits, e.g. 0o644
    mtime: float  # seconds since the epoch
    symlink_target: str | None = None

    @classmethod
    def from_guest(cls, raw: object) -> EntryInfo:
        if not isinstance(raw, dict):
            raise GuestError("the guest agent sent a malformed file entry")
        try:
            kind = FileType(raw.get("type"))
        except ValueError:
            raise GuestError("the guest agent sent a file entry of an unknown type") from None
        target = raw.get("target")
        return cls(
            name=guest_name(raw.get("name"), "file name", 255),
            path=guest_name(raw.get("path"), "path", 4096),
            type=kind,
            size=int(guest_number(raw.get("size"), "file size", 0, 1 << 63)),
            mode=int(guest_number(raw.get("mode"), "file mode", 0, 0o7777)),
            mtime=guest_number(raw.get("mtime"), "modification time", -(1 << 40), 1 << 40),
            symlink_target=guest_name(target, "symlink target", 4096) if kind is FileType.SYMLINK else None,
        )


def guest_name(value: object, field: str, limit: int) -> str:
    """A file name or path from the guest: bounded, no NUL, and bytes a Linux name may hold
    (text, or ``surrogateescape`` for bytes that are not UTF-8), nothing else."""
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
        raise GuestError(f"the guest agent sent a bad {field}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise GuestError(f"the guest agent sent a {field} that no file name can hold") from None
    return value


def inside(path: str, top: str) -> bool:
    """Whether a path the guest named lies below ``top``, with no ``..`` to climb out."""
    base = top.rstrip("/") + "/"
    return path.startswith(base) and "/../" not in path[len(base) - 1 :] + "/"


def held(start: Callable[[ExitStack], Iterator[T]]) -> Iterator[T]:
    """``start(stack)`` now, so its errors raise here; then what it returns, as the caller
    reads, with what it entered on ``stack`` (a connection) held until the end or until
    the caller leaves the loop."""
    stack = ExitStack()
    try:
        items = start(stack)
    except BaseException:
        stack.close()
        raise

    def stream() -> Iterator[T]:
        with stack:
            yield from items

    return stream()


def check_path(path: object) -> str:
    """A path in the sandbox the caller gave: absolute, bounded, and one a Linux name can hold."""
    if isinstance(path, str) and path.startswith("/") and "\0" not in path and len(path) <= 4096:
        try:
            path.encode("utf-8", "surrogateescape")
            return path
        except UnicodeEncodeError:
            pass
    raise ValidationError(f"guest path {path!r} must be an absolute path such as /work/data.csv")


class FileEventType(str, enum.Enum):
    CREATED = "created"
    MODIFIED = "modified"
    REMOVED = "removed"  # also: moved out of the watched tree
    RENAMED = "renamed"  # within it: ``old_path`` is where it was


@dataclass(frozen=True)
class FileEvent:
    """One change ``watch_dir`` saw. Writes to one file in a row come as one event."""

    type: FileEventType
    path: str
    is_dir: bool = False
    old_path: str | None = None

    @classmethod
    def from_guest(cls, raw: object, top: str) -> FileEvent:
        if not isinstance(raw, dict):
            raise GuestError("the guest agent sent a malformed file event")
        try:
            kind = FileEventType(raw.get("type"))
        except ValueError:
            raise GuestError("the guest agent sent a file event of an unknown type") from None
        old = raw.get("old_path")
        paths = [guest_name(raw.get("path"), "event path", 4096)] + (
            [guest_name(old, "event path", 4096)] if old else []
        )
        for path in paths:
            if path != top and not inside(path, top):
                raise GuestError(f"the guest agent reported {path!r}, which is not under {top}")
        return cls(kind, paths[0], raw.get("is_dir") is True, paths[1] if old else None)


class Files:
    """The sandbox's filesystem: ``vm.files``. Paths are absolute paths in the sandbox."""

    def __init__(self, vm: SmolVM) -> None:
        self._vm = vm

    def list(self, path: str, depth: int = 1, timeout: float = 60) -> list[EntryInfo]:
        """The entries under the directory ``path``, ``depth`` levels down (1: its own
        entries), sorted by path. Symlinks are listed, never followed."""
        path = check_path(path)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 < depth <= 64:
            raise ValidationError(f"depth must be an integer from 1 to 64, not {depth!r}")
        with self._vm._agent(timeout) as conn:
            entries = [EntryInfo.from_guest(raw) for raw in conn.entries(path, depth, timeout, LIST_LIMIT)]
        for entry in entries:
            if not inside(entry.path, path):
                raise GuestError(f"the guest agent listed {entry.path!r}, which is not under {path}")
        return sorted(entries, key=lambda e: e.path)

    def watch_dir(self, path: str, recursive: bool = False, timeout: float = 30) -> Iterator[FileEvent]:
        """Changes under the directory ``path`` (its subdirectories too with
        ``recursive``), as they happen, for ``timeout`` seconds; stop early by
        leaving the loop. The watch is in place when this returns, so what a
        command does after the call is seen. Changes in quick succession come in
        batches; an inotify queue that overflows loses events silently."""
        path = check_path(path)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValidationError(f"timeout must be 0 to 86400 seconds, not {timeout!r}")

        def start(stack: ExitStack) -> Iterator[FileEvent]:
            # left early, the connection goes, and the guest's watch with it
            raw = stack.enter_context(self._vm._agent(timeout)).watch(path, bool(recursive), float(timeout))
            return (FileEvent.from_guest(item, path) for item in raw)

        return held(start)

    def get_info(self, path: str) -> EntryInfo:
        """What ``path`` is (a symlink is described, not followed); GuestFileNotFoundError if nothing."""
        path = check_path(path)
        with self._vm._agent() as conn:
            entry = EntryInfo.from_guest(conn.call("stat", path=path, what=f"stat of {path}").get("entry"))
        if entry.path != path:
            raise GuestError(f"the guest agent described {entry.path!r} when asked for {path!r}")
        return entry

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
        except GuestFileNotFoundError:
            return False
        return True

    @overload
    def read(self, path: str, format: Literal["text"] = "text", timeout: float = 600) -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"], timeout: float = 600) -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["stream"], timeout: float = 600) -> Iterator[bytes]: ...

    def read(self, path: str, format: str = "text", timeout: float = 600) -> str | bytes | Iterator[bytes]:
        """A file's content: as text (UTF-8, bad bytes replaced), as bytes, or
        (``format="stream"``) as an iterator of chunks that holds no more than one
        in memory; the sandbox connection stays busy until it is read to the end or closed."""
        path = check_path(path)
        if format == "stream":
            return self._stream(path, timeout)
        if format not in ("text", "bytes"):
            raise ValidationError(f"format must be 'text', 'bytes' or 'stream', not {format!r}")
        with self._vm._transfer() as disk, self._vm._agent(timeout) as conn:
            _, chunks = conn.read_stream(path, timeout, disk, max_size=READ_LIMIT)
            data = b"".join(chunks)
        return data.decode(errors="replace") if format == "text" else data

    def _stream(self, path: str, timeout: float) -> Iterator[bytes]:
        """Asks at once (a missing file raises here), then yields as the caller reads."""

        def start(stack: ExitStack) -> Iterator[bytes]:
            disk = stack.enter_context(self._vm._transfer())
            conn = stack.enter_context(self._vm._agent(timeout))
            return conn.read_stream(path, timeout, disk, max_size=MAX_DOWNLOAD)[1]

        return held(start)

    def write(self, path: str, data: Data, mode: int = 0o644, timeout: float = 600) -> EntryInfo:
        """Write ``data`` (text as UTF-8, bytes, or a binary file object read to its end)
        to ``path``, making its parent directories. Atomic: written beside the target
        and renamed, so a reader sees the old file or the new one, never half."""
        self.write_files([(path, data)], mode=mode, timeout=timeout)
        return self.get_info(path)

    def write_files(
        self, files: Iterable[tuple[str, Data]], mode: int = 0o644, timeout: float = 600
    ) -> builtins.list[str]:
        """Write several files on one connection, each as ``write`` does; returns their paths."""
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ValidationError(f"mode must be permission bits such as 0o644, not {mode!r}")
        items = [(check_path(path), data) for path, data in files]
        with self._vm._transfer() as disk, self._vm._agent(timeout) as conn:
            for path, data in items:
                with _reader(data) as (source, size):
                    conn.write_stream(source, size, mode, path, timeout, disk)
        return [path for path, _ in items]

    def make_dir(self, path: str) -> bool:
        """Make a directory and its parents; False if it was there already."""
        path = check_path(path)
        with self._vm._agent() as conn:
            return conn.call("mkdir", path=path, what=f"making directory {path}").get("created") is True

    def remove(self, path: str, timeout: float = 600) -> None:
        """Remove a file, a symlink (not what it points to) or a whole directory tree."""
        path = check_path(path)
        with self._vm._agent(timeout) as conn:
            conn.call("remove", timeout, path=path, what=f"removing {path}")

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        """Move ``old_path`` to ``new_path`` (its parents made); replaces a file there,
        never a non-empty directory."""
        old, new = check_path(old_path), check_path(new_path)
        with self._vm._agent() as conn:
            answer = conn.call("rename", path=old, to=new, what=f"renaming {old}")
        return EntryInfo.from_guest(answer.get("entry"))

    # -- whole trees ----------------------------------------------------
    def upload_dir(self, local_path: str | os.PathLike[str], guest_path: str, timeout: float = 600) -> trees.TreeReport:
        """Copy the directory tree ``local_path`` to ``guest_path``: modes, mtimes, empty
        directories and symlinks kept (as they are), owned by root. Nothing there: the
        tree appears whole, at once. A directory there: each entry is merged in by a
        rename (a file replaced whole, never half-written)."""
        local = Path(local_path)
        guest = check_path(guest_path)
        if not local.is_dir():
            raise ValidationError(f"{local} is not a directory on this host: check the path")
        if not guest.strip("/"):
            raise ValidationError("upload a tree into a directory under /, not onto / itself")
        guest = guest.rstrip("/")
        report = trees.TreeReport()

        need, big = trees.scan(local)

        def pack(out: BinaryIO, leave_out: frozenset[str] = frozenset()) -> None:
            try:
                trees.pack(local, out, report, leave_out)
            except SmolVMError:
                raise  # the guest's, or the transfer's: not a failure to read the tree
            except OSError as exc:
                raise ValidationError(f"reading {local} failed, nothing was uploaded: {exc}") from None

        with self._vm._transfer() as disk, self._vm._agent(timeout) as conn:
            if disk is not None:  # streamed: no copy of the tree on either side
                left_out = frozenset(rel for rel, _ in big)
                conn.write_tree(lambda out: pack(out, left_out), guest, need, timeout, disk, big)
                return report
            with tempfile.TemporaryFile() as spool:  # the archive on disk, never in memory
                pack(spool)
                size = spool.tell()
                spool.seek(0)
                parent, name = guest.rsplit("/", 1)
                archive = f"{parent}/.{name}.smolvm-tree-{secrets.token_hex(4)}.tar"
                conn.write_stream(spool, size, 0o600, archive, timeout)
                conn.call("untar", timeout, archive=archive, path=guest, what=f"upload to {guest}")
        return report

    def download_dir(
        self, guest_path: str, local_path: str | os.PathLike[str], timeout: float = 600
    ) -> trees.TreeReport:
        """Copy the directory tree ``guest_path`` to ``local_path``, which must be new or an
        empty directory (never merged into). Built beside it and renamed into place: on
        any failure nothing is left under its name. Symlinks are kept only when they stay
        inside the tree; they, devices and FIFOs are otherwise skipped and listed in the
        report's ``skipped``. Entries that would land outside raise GuestError."""
        guest = check_path(guest_path)
        local = Path(local_path)
        trees.check_destination(local)
        deadline = time.monotonic() + timeout
        with self._vm._transfer() as disk, self._vm._agent(timeout) as conn:
            big: builtins.list[tuple[str, int, float]] = []
            budget = MAX_DOWNLOAD  # bytes the files sent apart may still hold
            chunks = conn.tree_stream(guest, timeout, disk, apart=big)

            def fetch(name: str) -> tuple[int, Iterator[bytes]]:
                nonlocal budget
                left = max(0.0, deadline - time.monotonic())
                size, chunks = conn.read_stream(f"{guest.rstrip('/')}/{name}", left, disk, trees.MAX_SIZE, False)
                budget -= size
                if budget < 0:
                    raise GuestError(f"the download of {guest} is larger than {MAX_DOWNLOAD} bytes: refused")
                return size, chunks

            def apart() -> Iterator[trees.Apart]:  # read once the stream has ended and filled ``big``
                for name, mode, mtime in big:
                    yield name, mode, mtime, lambda name=name: fetch(name)  # type: ignore[misc]

            unpacker = trees.Unpacker(local, f"download of {guest}", deadline=deadline)
            return unpacker.run(trees.iter_reader(chunks), apart())


class _reader:
    """(binary reader, its size) for data of any accepted kind; a reader whose size
    cannot be known is spooled first (in memory up to SPOOL, then on disk)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.spool: Any = None

    def __enter__(self) -> tuple[BinaryIO, int]:
        data = self.data
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            return io.BytesIO(raw), len(raw)
        if isinstance(data, Sized):
            if isinstance(data.size, bool) or not isinstance(data.size, int) or data.size < 0:
                raise ValidationError(f"a Sized reader needs a size of 0 bytes or more, not {data.size!r}")
            return data.reader, data.size
        if isinstance(data, io.TextIOBase):
            raise ValidationError("the file object gives text: open it in binary mode ('rb')")
        if not hasattr(data, "read"):
            raise ValidationError(f"data must be text, bytes or a binary file object, not {type(data).__name__}")
        try:
            start = data.tell()
            end = data.seek(0, os.SEEK_END)
            data.seek(start)
            return data, max(0, end - start)
        except (OSError, ValueError, AttributeError):
            pass
        self.spool = tempfile.SpooledTemporaryFile(SPOOL)
        while chunk := data.read(1 << 20):
            if isinstance(chunk, str):
                raise ValidationError("the file object gives text: open it in binary mode ('rb')")
            self.spool.write(chunk)
        size = self.spool.tell()
        self.spool.seek(0)
        return self.spool, size

    def __exit__(self, *exc: object) -> None:
        if self.spool is not None:
            self.spool.close()
