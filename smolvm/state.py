"""The state store: one SQLite database of sandboxes and snapshots, safe to share between processes."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import SnapshotNotFoundError, VMAlreadyExistsError, VMNotFoundError
from .paths import data_dir
from .types import SnapshotInfo, SnapshotType, VMConfig, VMState

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    config     TEXT NOT NULL,
    pid        INTEGER,
    accel      TEXT,
    note       TEXT,
    image_dir  TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
SNAPSHOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         TEXT PRIMARY KEY,
    name       TEXT,
    vm_id      TEXT NOT NULL,
    type       TEXT NOT NULL,
    config     TEXT NOT NULL,
    image_dir  TEXT NOT NULL,
    accel      TEXT NOT NULL,
    files      TEXT NOT NULL,
    created_at REAL NOT NULL,
    machine    TEXT NOT NULL
)
"""
SNAPSHOT_COLUMNS = "id, name, vm_id, type, config, image_dir, accel, files, created_at, machine"


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    state: VMState
    config: VMConfig
    pid: int | None
    accel: str | None
    note: str | None
    image_dir: str
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "memory": self.config.memory,
            "vcpus": self.config.vcpus,
            "cpu_limit": self.config.cpu_limit,
            "disk_size": self.config.disk_size,
            "image": self.config.image,
            "internet": self.config.internet_settings.model_dump(),
            "mounts": [m.model_dump() for m in self.config.mounts],
            "fast_start": self.config.fast_start,
            "pid": self.pid,
            "accel": self.accel,
            "note": self.note,
            "image_dir": self.image_dir,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot's metadata. ``files``: for each file of its directory, its sha256 and
    size, and ``seen``, the (inode, mtime, ctime) it had when its sum was last checked."""

    id: str
    name: str | None
    vm_id: str
    type: SnapshotType
    config: VMConfig  # of the sandbox it was taken from
    image_dir: str
    accel: str
    files: dict[str, dict[str, Any]]
    created_at: float
    machine: dict[str, Any]  # the QEMU version, device layout and agent protocol that saved it

    def info(self) -> SnapshotInfo:
        size = sum(int(entry.get("stored", entry.get("size", 0))) for entry in self.files.values())  # on disk
        return SnapshotInfo(
            snapshot_id=self.id, vm_id=self.vm_id, type=self.type, size=size, created_at=self.created_at, name=self.name
        )


class StateStore:
    """Sandbox records. Each call is one transaction; writers take SQLite's lock up front."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "state.db"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            db.execute(SNAPSHOT_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(snapshots)")}
            if "machine" not in columns:  # made by a development version: its snapshots restore nowhere
                db.execute("ALTER TABLE snapshots ADD COLUMN machine TEXT NOT NULL DEFAULT '{}'")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _record(row: tuple[Any, ...]) -> SandboxRecord:
        vm_id, state, config, pid, accel, note, image_dir, created_at = row
        return SandboxRecord(
            vm_id, VMState(state), VMConfig.model_validate_json(config), pid, accel, note, image_dir, created_at
        )

    def add(self, config: VMConfig, image_dir: str) -> SandboxRecord:
        """Record a new sandbox in state 'created'; its id must be free."""
        assert config.vm_id is not None
        now = time.time()
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO sandboxes (id, state, config, image_dir, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (config.vm_id, VMState.CREATED.value, config.model_dump_json(), image_dir, now, now),
                )
        except sqlite3.IntegrityError:
            raise VMAlreadyExistsError(
                f"a sandbox named {config.vm_id!r} already exists: pick another name, or delete it first "
                f"with 'smolvm sandbox delete {config.vm_id}'"
            ) from None
        return self.get(config.vm_id)

    def get(self, vm_id: str) -> SandboxRecord:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, state, config, pid, accel, note, image_dir, created_at FROM sandboxes WHERE id = ?",
                (vm_id,),
            ).fetchone()
        if row is None:
            raise VMNotFoundError(f"no sandbox named {vm_id!r}: 'smolvm sandbox list' shows the ones there are")
        return self._record(row)

    def all(self) -> list[SandboxRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, state, config, pid, accel, note, image_dir, created_at FROM sandboxes ORDER BY created_at"
            ).fetchall()
        return [self._record(row) for row in rows]

    def update(self, vm_id: str, **fields: Any) -> None:
        allowed = {"state", "pid", "accel", "note"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        values = [v.value if isinstance(v, VMState) else v for v in fields.values()]
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as db:
            db.execute(f"UPDATE sandboxes SET {sets}, updated_at = ? WHERE id = ?", (*values, time.time(), vm_id))

    def mark_dead(self, vm_id: str, pid: int | None, note: str) -> None:
        """Record that the hypervisor with ``pid`` died, unless the record moved on meanwhile."""
        with self._write() as db:
            db.execute(
                "UPDATE sandboxes SET state = ?, pid = NULL, note = ?, updated_at = ? "
                "WHERE id = ? AND pid IS ? AND state IN (?, ?)",
                (VMState.ERROR.value, note, time.time(), vm_id, pid, VMState.RUNNING.value, VMState.PAUSED.value),
            )

    def remove(self, vm_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (vm_id,))

    def exists(self, vm_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (vm_id,)).fetchone() is not None

    # -- snapshots --------------------------------------------------------
    @staticmethod
    def _snapshot(row: tuple[Any, ...]) -> SnapshotRecord:
        snap_id, name, vm_id, kind, config, image_dir, accel, files, created_at, machine = row
        return SnapshotRecord(
            snap_id,
            name,
            vm_id,
            SnapshotType(kind),
            VMConfig.model_validate_json(config),
            image_dir,
            accel,
            json.loads(files),
            created_at,
            json.loads(machine),
        )

    def add_snapshot(self, record: SnapshotRecord) -> None:
        with self._write() as db:
            db.execute(
                f"INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.vm_id,
                    record.type.value,
                    record.config.model_dump_json(),
                    record.image_dir,
                    record.accel,
                    json.dumps(record.files),
                    record.created_at,
                    json.dumps(record.machine),
                ),
            )

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        with self._connect() as db:
            row = db.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        if row is None:
            raise SnapshotNotFoundError(
                f"no snapshot with id {snapshot_id!r}: 'smolvm snapshot list' shows the ones there are"
            )
        return self._snapshot(row)

    def all_snapshots(self) -> list[SnapshotRecord]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created_at").fetchall()
        return [self._snapshot(row) for row in rows]

    def snapshot_exists(self, snapshot_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone() is not None

    def update_snapshot_files(self, snapshot_id: str, files: dict[str, dict[str, Any]]) -> None:
        with self._write() as db:
            db.execute("UPDATE snapshots SET files = ? WHERE id = ?", (json.dumps(files), snapshot_id))

    def remove_snapshot(self, snapshot_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
