"""Watching a directory: inotify (through ctypes; the guest has no pip packages),
its events turned into created / modified / removed / renamed, in batches."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from typing import Any

from wire import BATCH_BYTES, Failure, Port, Wire, weight

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x400, 0x800, 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded
MAX_WATCHES = 8192  # directories one recursive watch follows
MAX_BATCH = 512  # events per message
TICK = 0.1  # how often a watch looks at its deadline and its host


class Watcher:
    def __init__(self, top: str, recursive: bool) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise Failure("watch_failed", "inotify: %s" % os.strerror(ctypes.get_errno()))
        self.recursive = recursive
        self.dirs: dict[int, str] = {}
        self.overflowed = False
        # A move's first half (cookie -> its event), held for the second, which may come
        # in the next read: a move out of the tree has none and is then reported removed.
        self.moved: dict[int, dict[str, Any]] = {}
        self.add(top, report=None)
        self.top_wd = min(self.dirs)  # the first watch added: the directory asked for

    def close(self) -> None:
        os.close(self.fd)

    def add(self, path: str, report: list[dict[str, Any]] | None) -> None:
        """Watch ``path`` (and, recursive, what is under it); what is found under a
        directory that appeared after the watch began is reported as created."""
        todo = [path]
        while todo:
            top = todo.pop()
            if len(self.dirs) >= MAX_WATCHES:
                self.overflowed = True
                return
            wd = self.libc.inotify_add_watch(self.fd, top.encode("utf-8", "surrogateescape"),
                                             MASK | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)  # fmt: skip
            if wd < 0:
                if top == path and report is None:
                    raise Failure("watch_failed", "cannot watch %s: %s" % (path, os.strerror(ctypes.get_errno())))
                continue  # gone again, or not a directory
            self.dirs[wd] = top
            if not self.recursive:
                return
            try:
                with os.scandir(top) as it:
                    entries = list(it)
            except OSError:
                continue
            for entry in entries:
                is_dir = entry.is_dir(follow_symlinks=False)
                if report is not None:
                    report.append({"type": "created", "path": entry.path, "is_dir": is_dir})
                if is_dir:
                    todo.append(entry.path)

    def read(self, wait: float) -> list[dict[str, Any]]:
        carried, self.moved = self.moved, {}
        data = b""
        if select.select([self.fd], [], [], wait)[0]:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                pass
        events = self._parse(data, carried)
        if not data:
            carried.update(self.moved)  # a quiet moment: no second half is coming
            self.moved = {}
        return [*self._gone(carried.values()), *events]

    def flush(self) -> list[dict[str, Any]]:
        """At the end: moves still waiting for their other half left the tree."""
        moved, self.moved = self.moved, {}
        return self._gone(moved.values())

    def _gone(self, moves: Any) -> list[dict[str, Any]]:
        """Moves that found no other half (reported removed): a directory's watches go with it,
        or what happens where it went would be reported under its old name."""
        moves = list(moves)
        for move in moves:
            if move["is_dir"]:
                self._rename(move["path"], None)
        return moves

    def _rename(self, old: str, new: str | None) -> None:
        """The watches of ``old`` and below follow it to ``new`` (their inodes moved), or end."""
        for wd, path in list(self.dirs.items()):
            if path == old or path.startswith(old + "/"):
                if new is None:
                    self.libc.inotify_rm_watch(self.fd, wd)
                    del self.dirs[wd]
                else:
                    self.dirs[wd] = new + path[len(old) :]

    def _parse(self, data: bytes, carried: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, cookie, length = EVENT.unpack_from(data, offset)
            raw = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            top = self.dirs.get(wd)
            if top is None:
                continue
            if mask & IN_IGNORED:
                del self.dirs[wd]
                continue
            is_dir = bool(mask & IN_ISDIR)
            path = os.path.join(top, raw.decode("utf-8", "surrogateescape")) if raw else top
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if wd == self.top_wd:
                    events.append({"type": "removed", "path": top, "is_dir": True})  # the watched one itself
                continue
            if mask & IN_CREATE:
                events.append({"type": "created", "path": path, "is_dir": is_dir})
                if is_dir and self.recursive:
                    self.add(path, events)
            elif mask & IN_MODIFY:
                last = events[-1] if events else None
                if not (last and last["type"] == "modified" and last["path"] == path):
                    events.append({"type": "modified", "path": path, "is_dir": is_dir})
            elif mask & IN_DELETE:
                events.append({"type": "removed", "path": path, "is_dir": is_dir})
            elif mask & IN_MOVED_FROM:
                self.moved[cookie] = {"type": "removed", "path": path, "is_dir": is_dir}
            elif mask & IN_MOVED_TO:
                gone = self.moved.pop(cookie, None) or carried.pop(cookie, None)
                if gone is not None:  # both halves seen: one rename; what is below it moved along
                    events.append({"type": "renamed", "path": path, "is_dir": is_dir, "old_path": gone["path"]})
                    if is_dir and self.recursive:
                        self._rename(gone["path"], path)
                else:  # from outside the tree: all of it is new here
                    events.append({"type": "created", "path": path, "is_dir": is_dir})
                    if is_dir and self.recursive:
                        self.add(path, events)
        return events


class Watch(Wire):
    def op_watch(self, rid: int, msg: dict[str, Any]) -> None:
        """Events under ``path`` until ``timeout`` or the host cancels: first 'watching'
        (nothing that happens after it is missed), then batches, then 'ok'."""
        port: Port = self.local.port
        path = msg.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise Failure("invalid", "path must be absolute")
        timeout = msg.get("timeout")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise Failure("invalid", "timeout must be 0 to 86400 seconds")
        if not os.path.isdir(path) or os.path.islink(path):
            raise Failure("not_dir", "%s is not a directory" % path)
        cancel = self._cancel_event(rid)
        watcher = Watcher(path, bool(msg.get("recursive")))
        try:
            self.reply({"op": "watching", "id": rid})
            deadline = time.monotonic() + timeout
            while not cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                events = watcher.read(min(left, TICK))
                batch: list[dict[str, Any]] = []
                size = 0
                for event in events:
                    batch.append(event)
                    size += weight(event)
                    if len(batch) == MAX_BATCH or size > BATCH_BYTES:
                        self.reply({"op": "events", "id": rid, "events": batch})
                        batch, size = [], 0
                if batch:
                    self.reply({"op": "events", "id": rid, "events": batch})
            last = watcher.flush()
            if last and not cancel.is_set():
                self.reply({"op": "events", "id": rid, "events": last})
            self.reply({"op": "ok", "id": rid, "overflowed": watcher.overflowed})
        finally:
            watcher.close()
            port.cancels.pop(rid, None)
