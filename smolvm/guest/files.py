"""Files: one file in or out (on the wire, or through the transfer disk for big ones),
and the filesystem operations (``stat``, ``list``, ``mkdir``, ``remove``, ``rename``)."""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from contextlib import contextmanager

import protocol as P
from wire import BATCH_BYTES, Failure, Port, Wire, weight

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from collections.abc import Callable, Iterator
    from typing import Any


def find_xfer_disk() -> str | None:
    """The /dev node of the host's transfer disk, if it gave us one."""
    try:
        for name in os.listdir("/sys/block"):
            try:
                with open("/sys/block/%s/serial" % name) as f:
                    if f.read().strip() == P.TRANSFER_SERIAL:
                        return "/dev/" + name
            except OSError:
                continue
    except OSError:
        pass
    return None


LIST_BATCH = 256  # entries per message of a listing
LIST_MAX = 1 << 18  # entries one listing may hold


def entry_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe(path: str, st: os.stat_result) -> dict[str, Any]:
    """What the host learns about one entry (from lstat: a symlink is never followed)."""
    entry: dict[str, Any] = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": entry_type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }
    if stat.S_ISLNK(st.st_mode):
        entry["target"] = os.readlink(path)
    return entry


def merge_into(src: str, dest: str) -> None:
    """Move every entry of the directory ``src`` into the directory ``dest``: a directory
    into the one of its name there (merged in turn), anything else by a rename that
    replaces what was there (a directory in the way is not replaced: an error)."""
    for name in sorted(os.listdir(src)):
        here, there = os.path.join(src, name), os.path.join(dest, name)
        if stat.S_ISDIR(os.lstat(here).st_mode) and os.path.isdir(there) and not os.path.islink(there):
            merge_into(here, there)
            shutil.copystat(here, there)
            continue
        if os.path.isdir(there) and not os.path.islink(there):
            raise Failure("exists", "%s is a directory in the sandbox; the upload has a file there" % there)
        os.rename(here, there)


def round_up(n: int) -> int:
    return (n + 4095) & ~4095


MAX_TREE = 1 << 42  # bytes one uploaded tree may hold
TAR_BLOCKING = 128  # records of 64 KiB out of tar: fewer writes, little padding
F_SETPIPE_SZ = 1031
WIRE_TREE = 2 << 20  # bytes of tar stream below which a download goes on the wire though the disk is free


def big_pipe(fd: int) -> None:
    """A pipe to or from tar that holds a transfer block: fewer wake-ups, each costly under emulation."""
    import fcntl

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, P.TRANSFER_BLOCK)
    except OSError:
        pass  # above the system's limit: the default size works, slower


def split_tree(top: str) -> tuple[int, list[list[Any]], int]:
    """A tree's entries for tar (a file of NUL-separated names from ``./``, never through
    a symlink) but its big files with UTF-8 names, which move faster on their own:
    those as [name, mode, mtime]; and about how many bytes tar will send (0: nothing
    but the tree's own entry). Only regular files are stat'ed: this walk is paid for
    by every download of a tree."""
    names = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        return _split(top, names)
    except BaseException:
        os.close(names)
        raise


def _split(top: str, names: int) -> tuple[int, list[list[Any]], int]:
    apart: list[list[Any]] = []
    out = [b"."]
    size = 0
    todo = [(os.fsencode(top), b"./")]
    while todo:
        where, prefix = todo.pop()
        try:
            it = os.scandir(where)
        except OSError:
            continue  # gone, or not readable: tar says so
        with it:
            for entry in it:
                here = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((entry.path, here + b"/"))
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_size >= P.APART_FROM:
                            apart.append([here[2:].decode(), stat.S_IMODE(st.st_mode), int(st.st_mtime)])
                            continue
                        size += st.st_size
                except (OSError, UnicodeDecodeError):
                    pass  # gone (tar says so), or a name the host could not be told: tar sends it
                out.append(here)
                size += 512
                if len(out) >= 4096:
                    os.write(names, b"\0".join(out) + b"\0")
                    out = []
    os.write(names, b"\0".join(out) + b"\0")
    os.lseek(names, 0, os.SEEK_SET)
    return names, apart, size


def aligned_block() -> memoryview:
    """A buffer of one transfer block, page-aligned as direct I/O needs: one per request."""
    return memoryview(mmap.mmap(-1, P.TRANSFER_BLOCK))


def stop_on_cancel(proc: subprocess.Popen[bytes], cancel: threading.Event) -> None:
    """Kill ``proc`` if its request is cancelled while it runs: a tar stopped by something
    in the guest then cannot hold its request, or the disk, for ever."""

    def watch() -> None:
        while proc.poll() is None:
            if cancel.wait(0.1):
                proc.kill()
                return

    threading.Thread(target=watch, daemon=True).start()


def read_full(fd: int, view: memoryview) -> int:
    """Read into all of ``view`` from a pipe; fewer bytes only at its end."""
    done = 0
    while done < len(view):
        n = os.readv(fd, [view[done:]])
        if not n:
            break
        done += n
    return done


MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
# The largest message 9p over virtio takes here (the kernel caps it at 125 pages).
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
SHARE_WAIT = 5.0  # for the share's device to be bound (it is, by the time the agent runs)


def share_tags() -> set[str]:
    tags = set()
    for dev in glob.glob("/sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag"):
        with open(dev, "rb") as f:
            tags.add(f.read().rstrip(b"\0\n").decode(errors="replace"))
    return tags


def mounted_at(path: str, tag: str) -> bool:
    """Whether ``tag`` is mounted on ``path`` already (mountinfo escapes spaces as \\040)."""
    escaped = path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1 :] if "-" in fields else []
            if fields[4] == escaped and tail[:2] == ["9p", tag]:
                return True
    return False


def mount_share(tag: str, path: str, writable: bool) -> None:
    deadline = time.monotonic() + SHARE_WAIT
    while tag not in share_tags():
        if time.monotonic() > deadline:
            raise Failure("no_share", "the machine has no share %s" % tag)
        time.sleep(0.02)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise Failure("not_dir", "cannot make the mount point %s: %s" % (path, exc.strerror)) from None
    if not os.path.isdir(path):
        raise Failure("not_dir", "the mount point %s is not a directory" % path)
    if mounted_at(os.path.realpath(path), tag):
        return  # this boot mounted it already
    flags = MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(tag.encode(), path.encode(), b"9p", flags, SHARE_OPTIONS.encode()) != 0:
        err = ctypes.get_errno()
        raise Failure("mount_failed", "mounting the host folder on %s failed: %s" % (path, os.strerror(err)))


class Files(Wire):
    def __init__(self) -> None:
        super().__init__()
        self.xfer_lock = threading.Lock()
        self.xfer_open_lock = threading.Lock()
        self.xfer_owner: Port | None = None  # the port whose request holds xfer_lock for a window
        self._xfer: tuple[int, int] | None = None

    def drop_transfers(self, port: Port) -> None:
        """``port``'s host has gone: its half-written uploads go, its downloads stop."""
        for event in port.taken.values():
            event.set()
        for up in port.uploads.values():
            self._abort_upload(up)
        port.uploads.clear()
        if self.xfer_owner is port:
            with self.xfer_lock:
                pass  # a window being written for the old host is done or abandoned

    @staticmethod
    def _guest_path(msg: dict[str, Any]) -> str:
        path = msg.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise Failure("invalid", "path must be absolute")
        return path

    @staticmethod
    def _lstat(path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            raise Failure("not_found", "%s does not exist in the sandbox" % path) from None
        except NotADirectoryError:
            raise Failure(
                "not_found", "%s does not exist in the sandbox (a parent is not a directory)" % path
            ) from None

    def op_stat(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        self.reply({"op": "ok", "id": rid, "entry": describe(path, self._lstat(path))})

    def op_list(self, rid: int, msg: dict[str, Any]) -> None:
        """The entries under ``path`` down to ``depth`` levels, in batches, never through a symlink."""
        path = self._guest_path(msg)
        depth = msg.get("depth", 1)
        if not isinstance(depth, int) or not 0 < depth <= 64:
            raise Failure("invalid", "depth must be an integer from 1 to 64")
        if not stat.S_ISDIR(self._lstat(path).st_mode):
            raise Failure("not_dir", "%s is not a directory" % path)
        batch: list[dict[str, Any]] = []
        count = size = 0
        todo = [(path, 1)]
        while todo:
            top, level = todo.pop()
            try:
                with os.scandir(top) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue  # gone, or not readable, since it was listed
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    batch.append(describe(entry.path, st))
                except OSError:
                    continue
                size += weight(batch[-1])
                count += 1
                if count > LIST_MAX:
                    raise Failure("too_many", "more than %d entries: list a smaller part, or less deep" % LIST_MAX)
                if len(batch) == LIST_BATCH or size > BATCH_BYTES:
                    self.reply({"op": "entries", "id": rid, "entries": batch})
                    batch, size = [], 0
                if level < depth and stat.S_ISDIR(st.st_mode):
                    todo.append((entry.path, level + 1))
        self.reply({"op": "entries", "id": rid, "entries": batch})
        self.reply({"op": "ok", "id": rid, "count": count})

    def op_mkdir(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        try:
            os.makedirs(path)
            created = True
        except FileExistsError:
            if not os.path.isdir(path):
                raise Failure("exists", "%s exists and is not a directory" % path) from None
            created = False
        except NotADirectoryError:
            raise Failure("not_dir", "a parent of %s is not a directory" % path) from None
        self.reply({"op": "ok", "id": rid, "created": created})

    def op_remove(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        if not os.path.normpath(path).strip("/"):
            raise Failure("invalid", "will not remove /")
        st = self._lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # removes links it meets, never what they point to
        else:
            os.unlink(path)
        self.reply({"op": "ok", "id": rid})

    def op_mount(self, rid: int, msg: dict[str, Any]) -> None:
        """Mount the host's folders (virtio-9p shares, found by tag) where the host asks."""
        wanted = msg.get("mounts")
        if not isinstance(wanted, list) or len(wanted) > 8:
            raise Failure("invalid", "mounts must be a list of at most 8")
        for item in wanted:
            tag, path = item.get("tag") if isinstance(item, dict) else None, self._guest_path(item)
            if not isinstance(tag, str) or not re.fullmatch(r"smolvm[0-9]", tag):
                raise Failure("invalid", "bad share tag")
            mount_share(tag, path, bool(item.get("writable")))
        self.reply({"op": "ok", "id": rid})

    def op_rename(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        to = self._guest_path({"path": msg.get("to")})
        self._lstat(path)
        os.makedirs(os.path.dirname(to), exist_ok=True)
        try:
            os.rename(path, to)
        except IsADirectoryError:
            raise Failure("is_dir", "%s is a directory: remove it first" % to) from None
        except OSError as exc:
            if exc.errno in (39, 20):  # ENOTEMPTY, ENOTDIR
                raise Failure("exists", "%s exists: remove it first" % to) from None
            raise
        self.reply({"op": "ok", "id": rid, "entry": describe(to, os.lstat(to))})

    # -- whole trees ----------------------------------------------------
    def _tar(
        self, rid: int, argv: list[str], stdout: int, stdin: int = subprocess.DEVNULL
    ) -> tuple[subprocess.Popen[bytes], threading.Event, int]:
        """tar started, the request's cancel event, and the file its complaints go to: a file,
        not a pipe, as a pipe nobody reads while tar runs would fill (a warning per socket
        in a big tree) and stop it."""
        cancel = self._cancel_event(rid)
        errors = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=errors,
                                    start_new_session=True)  # fmt: skip
        except BaseException:
            os.close(errors)
            raise
        return proc, cancel, errors

    @staticmethod
    def _tar_errors(errors: int) -> str:
        return os.pread(errors, 4000, 0).decode(errors="replace").strip()

    @staticmethod
    def _check_space(parent: str, need: object) -> None:
        """Refuse a tree that cannot fit, before any of it (or a parent) is written."""
        if not isinstance(need, int) or need < 0:
            return
        there = parent
        while not os.path.isdir(there) and there != "/":
            there = os.path.dirname(there)
        st = os.statvfs(there)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise Failure(
                "no_space",
                "the tree needs %d MB and %s has %d MB free in the sandbox: make room, or send less"
                % (need >> 20, parent, free >> 20),
            )

    def op_untar(self, rid: int, msg: dict[str, Any]) -> None:
        """Unpack a tree beside ``path`` and put it there: as ``path`` if nothing is there,
        else merged into that directory one entry at a time (each replaced by a rename).
        The tar stream comes through the transfer disk (``via: disk``: after ``ready``,
        which names the directory the tree is built in, windows as in an upload, the
        last one marked) straight into tar, or was uploaded before as ``archive``, a
        hidden file beside the target that goes in every case."""
        path = self._guest_path(msg)
        streamed = msg.get("via") == "disk"
        archive = None if streamed else self._guest_path({"path": msg.get("archive")})
        parent = os.path.dirname(path)
        stage = os.path.join(parent, ".%s.smolvm-upload-%d" % (os.path.basename(path), rid))
        try:
            if archive is not None and (
                not os.path.basename(archive).startswith(".") or os.path.dirname(archive) != parent
            ):
                raise Failure("invalid", "the archive must be a hidden file beside the target")
            if os.path.lexists(path) and not stat.S_ISDIR(os.lstat(path).st_mode):
                raise Failure("exists", "%s exists and is not a directory" % path)
            self._check_space(parent, msg.get("size"))
            os.makedirs(parent, exist_ok=True)
            os.mkdir(stage, 0o700)
            try:
                self._unpack(rid, msg, stage, archive)
                os.chmod(stage, 0o755)
                if not os.path.lexists(path):
                    os.rename(stage, path)
                else:
                    merge_into(stage, path)
            finally:
                if os.path.lexists(stage):
                    shutil.rmtree(stage, ignore_errors=True)
        finally:
            self.local.port.cancels.pop(rid, None)
            up = self.local.port.uploads.pop(rid, None)
            if up is not None:
                self._abort_upload(up)
            if archive is not None:
                try:
                    os.unlink(archive)
                except OSError:
                    pass
        self.reply({"op": "ok", "id": rid})

    def _unpack(self, rid: int, msg: dict[str, Any], stage: str, archive: str | None) -> None:
        argv = ["tar", "-x", "-C", stage, "--no-same-owner", "--delay-directory-restore"]
        up: dict[str, Any] | None = None
        if archive is not None:
            proc, cancel, errors = self._tar(rid, argv + ["-f", archive], subprocess.DEVNULL)
        else:
            xfer = self.xfer()
            if xfer is None:
                raise Failure("no_disk", "this sandbox has no transfer disk")
            window = self._window(msg, xfer[1])
            into_tar, out = os.pipe()
            try:
                proc, cancel, errors = self._tar(rid, argv, subprocess.DEVNULL, stdin=into_tar)
            except BaseException:
                os.close(out)
                raise
            finally:
                os.close(into_tar)
            big_pipe(out)
            up = {
                "path": None, "tmp": None, "fd": out, "left": MAX_TREE, "mode": 0, "window": window,
                "lock": threading.Lock(), "aborted": False, "closed": False,
                "tree": threading.Event(),  # set once the last window is in (or the upload is dropped)
            }  # fmt: skip
            self.local.port.uploads[rid] = up
            self.reply({"op": "ready", "id": rid, "stage": stage})  # big files may be written there first
        stop_on_cancel(proc, cancel)
        try:
            while proc.poll() is None or (up is not None and not up["tree"].is_set()):
                if proc.poll() not in (None, 0):
                    break  # said at once: the host stops sending
                if cancel.wait(0.02):
                    break
            if cancel.is_set():
                raise Failure("cancelled", "the host went away")
            if proc.returncode != 0:
                raise Failure("os", "unpacking the tree failed: %s" % self._tar_errors(errors))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(errors)

    def op_tar_out(self, rid: int, msg: dict[str, Any]) -> None:
        """The tree under ``path`` as a tar stream (through the transfer disk with ``via:
        disk``, else DATA frames on channel FILE), then ``{"op": "ok", "exit_code": n,
        "errors": text}`` (1: something changed as it was read)."""
        path = self._guest_path(msg)
        if not stat.S_ISDIR(self._lstat(path).st_mode):
            raise Failure("not_dir", "%s is not a directory" % path)
        xfer = self.xfer() if msg.get("via") == "disk" else None
        window = self._window(msg, xfer[1]) if xfer is not None else 0
        argv = ["tar", "-c", "-b", str(TAR_BLOCKING), "-C", path]
        apart: list[list[Any]] = []
        if xfer is None:
            proc, cancel, errors = self._tar(rid, argv + ["."], subprocess.PIPE)
        else:  # its big files apart, each read after as a file is
            names, apart, size = split_tree(path)
            if not size:  # nothing but big files at its top: no tar to start, an empty archive
                os.close(names)
                self.send(P.encode(P.DATA, bytes(1024), rid, P.FILE))
                self._name_apart(rid, apart)
                self.reply({"op": "ok", "id": rid, "exit_code": 0, "errors": ""})
                return
            if size < WIRE_TREE:
                xfer = None  # faster on the wire: the host unpacks as it comes, not a window later
            try:
                argv += ["--no-recursion", "--null", "--verbatim-files-from", "-T", "-"]
                proc, cancel, errors = self._tar(rid, argv, subprocess.PIPE, stdin=names)
            finally:
                os.close(names)
        assert proc.stdout is not None
        stop_on_cancel(proc, cancel)
        try:
            out = proc.stdout.fileno()
            big_pipe(out)
            if xfer is not None:
                self._send_via_disk(rid, lambda view, _pos: read_full(out, view), window)
            while xfer is None:
                chunk = os.read(out, P.CHUNK)
                if not chunk:
                    break
                if cancel.is_set():
                    raise Failure("cancelled", "the host went away")
                self.send(P.encode(P.DATA, chunk, rid, P.FILE))
            code = proc.wait()
            complaints = self._tar_errors(errors)
            self._name_apart(rid, apart)
        finally:
            self.local.port.cancels.pop(rid, None)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            os.close(errors)
        self.reply({"op": "ok", "id": rid, "exit_code": code, "errors": complaints})

    def _name_apart(self, rid: int, apart: list[list[Any]]) -> None:
        for start in range(0, len(apart), P.APART_BATCH):
            self.reply({"op": "apart", "id": rid, "files": apart[start : start + P.APART_BATCH]})

    def xfer(self) -> tuple[int, int] | None:
        """(fd, size) of the transfer disk, opened for direct I/O."""
        with self.xfer_open_lock:  # not xfer_lock: a window may hold that for a while
            if self._xfer is None:
                dev = find_xfer_disk()
                if dev is None:
                    return None
                fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
                size = os.lseek(fd, 0, os.SEEK_END)
                self._xfer = (fd, size)
            return self._xfer

    @staticmethod
    def _window(msg: dict[str, Any], disk_size: int) -> int:
        window = int(msg.get("window", 0))
        if not 0 < window <= disk_size or window % P.TRANSFER_BLOCK:
            raise Failure("invalid", "bad transfer window %r" % window)
        return window

    def op_write_file(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        size = int(msg.get("size", -1))
        mode = int(msg.get("mode", 0o644)) & 0o7777
        mtime = msg.get("mtime")
        if size < 0:
            raise Failure("invalid", "size must be given")
        if mtime is not None and not isinstance(mtime, int):
            raise Failure("invalid", "mtime must be whole seconds")
        if os.path.isdir(path):
            raise Failure("is_dir", "%s is a directory" % path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, ".%s.smolvm-upload-%d" % (os.path.basename(path), rid))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        up = {
            "path": path, "tmp": tmp, "fd": fd, "left": size, "mode": mode, "window": 0, "mtime": mtime,
            "lock": threading.Lock(),  # held by a thread copying a window into it
            "aborted": False, "closed": False,
        }  # fmt: skip
        if msg.get("via") == "disk":
            xfer = self.xfer()
            if xfer is None:
                os.close(fd)
                os.unlink(tmp)
                raise Failure("no_disk", "this sandbox has no transfer disk")
            up["window"] = self._window(msg, xfer[1])
        self.local.port.uploads[rid] = up
        if size == 0:
            self._finish_upload(rid, up)

    def upload_data(self, frame: P.Frame) -> None:
        up = self.local.port.uploads.get(frame.stream)
        if up is None or frame.channel != P.FILE:
            return  # data for a request that was cancelled or failed
        try:
            if len(frame.payload) > up["left"]:
                raise Failure("invalid", "more data than announced")
            view = memoryview(frame.payload)
            while view:
                view = view[os.write(up["fd"], view) :]
            up["left"] -= len(frame.payload)
            if up["left"] == 0:
                self._finish_upload(frame.stream, up)
        except (OSError, Failure) as exc:
            self.local.port.uploads.pop(frame.stream, None)
            self._abort_upload(up)
            code = exc.code if isinstance(exc, Failure) else "os"
            self.error(frame.stream, code, str(exc))

    def op_disk_data(self, rid: int, msg: dict[str, Any]) -> None:
        """The host put the next ``size`` bytes of an upload at the start of the transfer disk
        (a tree's last window is marked ``last``; the untar request answers for it)."""
        up = self.local.port.uploads.get(rid)
        if up is None:
            return  # cancelled meanwhile
        tree = up.get("tree")
        try:
            with up["lock"]:
                if up["aborted"]:
                    self._discard_upload(up)  # its host left while we waited
                    return
                size = int(msg.get("size", -1))
                last = tree is not None and msg.get("last") is True
                if not (0 < size or last) or not 0 <= size <= min(up["window"], up["left"]):
                    raise Failure("invalid", "bad transfer size %r" % size)
                view = aligned_block()
                done = 0
                while done < size:
                    n = min(P.TRANSFER_BLOCK, size - done)
                    with self._holding_disk() as fd:  # a block at a time: never held while tar reads
                        if up["aborted"]:
                            break  # its host left: the disk may be another's now
                        got = os.preadv(fd, [view[: round_up(n)]], done)
                    if got < n:
                        raise Failure("os", "short read from the transfer disk")
                    self._put(up, view[:n])
                    done += n
                up["left"] -= size
                if up["aborted"]:
                    self._discard_upload(up)
                    return
                if last:
                    self._discard_upload(up)  # tar's input ends: it finishes, and op_untar answers
                    return
                if tree is None and up["left"] == 0:
                    self._finish_upload(rid, up)
                    return
            self.reply({"op": "taken", "id": rid})
        except (OSError, Failure) as exc:
            self.local.port.uploads.pop(rid, None)
            self._abort_upload(up)
            self.error(rid, exc.code if isinstance(exc, Failure) else "os", str(exc))

    @staticmethod
    def _put(up: dict[str, Any], data: memoryview) -> None:
        """Write a block of an upload; into a tar that has stopped reading, nothing (its exit says why)."""
        if up.get("broken"):
            return
        try:
            while data:
                data = data[os.write(up["fd"], data) :]
        except BrokenPipeError:
            if up.get("tree") is None:
                raise
            up["broken"] = True

    @contextmanager
    def _holding_disk(self) -> Iterator[int]:
        """The transfer disk, for this port's request alone while the block runs: one
        read or write of it, nothing that may wait on anything else."""
        xfer = self.xfer()
        if xfer is None:
            raise Failure("no_disk", "this sandbox has no transfer disk")
        with self.xfer_lock:
            self.xfer_owner = self.local.port
            try:
                yield xfer[0]
            finally:
                self.xfer_owner = None

    def op_taken(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.local.port.taken.get(rid)
        if event is not None:
            event.set()

    def _finish_upload(self, rid: int, up: dict[str, Any]) -> None:
        self.local.port.uploads.pop(rid, None)
        up["closed"] = True
        os.fchmod(up["fd"], up["mode"])
        if up.get("mtime") is not None:
            os.utime(up["fd"], (up["mtime"], up["mtime"]))
        os.close(up["fd"])
        os.replace(up["tmp"], up["path"])
        self.reply({"op": "ok", "id": rid})

    def _abort_upload(self, up: dict[str, Any]) -> None:
        """Close and remove a half-written upload. A thread copying into it right now
        does that itself when its window is done: the reader thread never waits."""
        up["aborted"] = True  # before the try: the copying thread checks it under the lock
        if up["lock"].acquire(blocking=False):
            try:
                self._discard_upload(up)
            finally:
                up["lock"].release()

    @staticmethod
    def _discard_upload(up: dict[str, Any]) -> None:
        if up["closed"]:
            return
        up["closed"] = True
        try:
            os.close(up["fd"])
        except OSError:
            pass
        if up.get("tree") is not None:
            up["tree"].set()
        elif up["tmp"] is not None:
            try:
                os.unlink(up["tmp"])
            except OSError:
                pass

    def op_read_file(self, rid: int, msg: dict[str, Any]) -> None:
        path = self._guest_path(msg)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_NOFOLLOW if msg.get("nofollow") else 0))
        except FileNotFoundError:
            raise Failure("not_found", "%s does not exist in the sandbox" % path) from None
        except IsADirectoryError:
            raise Failure("is_dir", "%s is a directory" % path) from None
        except OSError as exc:
            if exc.errno != 40:  # ELOOP: a symlink, asked not to be followed
                raise
            raise Failure("not_file", "%s is a symlink" % path) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Failure("is_dir", "%s is a directory" % path)
            if not stat.S_ISREG(st.st_mode):
                raise Failure("not_file", "%s is not a regular file" % path)
            self.reply({"op": "file", "id": rid, "size": st.st_size, "mode": st.st_mode & 0o777})
            left = st.st_size
            xfer = self.xfer() if msg.get("via") == "disk" and left > P.TRANSFER_BLOCK else None
            if xfer is not None:
                window = self._window(msg, xfer[1])
                sent = self._send_via_disk(rid, lambda view, pos: os.preadv(fd, [view], pos), window, left)
                if sent < left:
                    raise Failure("changed", "%s shrank while it was read" % path)
                left = 0
            while left:
                chunk = os.read(fd, min(P.CHUNK, left))
                if not chunk:
                    raise Failure("changed", "%s shrank while it was read" % path)
                self.send(P.encode(P.DATA, chunk, rid, P.FILE))
                left -= len(chunk)
        finally:
            os.close(fd)
        self.reply({"op": "ok", "id": rid})

    def _send_via_disk(
        self, rid: int, read: Callable[[memoryview, int], int], window: int, size: int = MAX_TREE
    ) -> int:
        """Send up to ``size`` bytes through the transfer disk, a window at a time, each taken
        by the host. ``read(view, pos)`` fills ``view`` with the bytes from ``pos`` on, fewer
        only at the end; the disk is held only to write each block. Returns how many were sent."""
        view = aligned_block()
        event = threading.Event()
        self.local.port.taken[rid] = event
        conn = self.local.conn
        port: Port = self.local.port
        try:
            pos = 0
            ended = False
            while pos < size and not ended:
                chunk = 0
                while chunk < min(window, size - pos):
                    if conn != port.nonce:
                        raise Failure("cancelled", "the host went away")
                    n = min(P.TRANSFER_BLOCK, window - chunk, size - pos - chunk)
                    got = read(view[:n], pos + chunk)
                    if got:
                        with self._holding_disk() as fd:
                            if conn != port.nonce:
                                raise Failure("cancelled", "the host went away")
                            os.pwritev(fd, [view[: round_up(got)]], chunk)
                    chunk += got
                    if got < n:
                        ended = True
                        break
                if not chunk:
                    break
                event.clear()
                if conn != port.nonce:  # sync() sets the nonce before the event
                    raise Failure("cancelled", "the host went away")
                self.reply({"op": "disk_data", "id": rid, "size": chunk})
                if not event.wait(120) or conn != port.nonce:
                    raise Failure("cancelled", "the host stopped taking the file")
                pos += chunk
            return pos
        finally:
            self.local.port.taken.pop(rid, None)
