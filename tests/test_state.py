"""The SQLite state store, on a temp database."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from smolvm import VMConfig, VMState
from smolvm.exceptions import VMAlreadyExistsError, VMNotFoundError
from smolvm.state import StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state.db")


def test_add_and_get(store: StateStore) -> None:
    cfg = VMConfig(vm_id="box1", memory=256)
    rec = store.add(cfg, "/images/default/abc")
    assert rec.id == "box1"
    assert rec.state is VMState.CREATED
    assert rec.config == cfg
    assert rec.pid is None and rec.accel is None and rec.note is None
    assert rec.image_dir == "/images/default/abc"
    assert store.get("box1") == rec
    assert store.exists("box1")


def test_get_missing_raises(store: StateStore) -> None:
    assert not store.exists("nope")
    with pytest.raises(VMNotFoundError, match="nope"):
        store.get("nope")


def test_duplicate_add_raises_and_keeps_first(store: StateStore) -> None:
    store.add(VMConfig(vm_id="dup", memory=256), "/a")
    store.update("dup", state=VMState.RUNNING, pid=1234)
    with pytest.raises(VMAlreadyExistsError):
        store.add(VMConfig(vm_id="dup", memory=1024), "/b")
    rec = store.get("dup")
    assert rec.config.memory == 256
    assert rec.image_dir == "/a"
    assert rec.state is VMState.RUNNING and rec.pid == 1234


def test_update_fields(store: StateStore) -> None:
    store.add(VMConfig(vm_id="u"), "/a")
    store.update("u", state=VMState.RUNNING, pid=42, accel="tcg", note="hi")
    rec = store.get("u")
    assert (rec.state, rec.pid, rec.accel, rec.note) == (VMState.RUNNING, 42, "tcg", "hi")
    store.update("u", state=VMState.STOPPED, pid=None)
    rec = store.get("u")
    assert (rec.state, rec.pid, rec.accel) == (VMState.STOPPED, None, "tcg")


@pytest.mark.parametrize(
    "fields", [{}, {"config": "{}"}, {"id": "other"}, {"state": VMState.RUNNING, "image_dir": "/x"}]
)
def test_update_rejects_other_fields(store: StateStore, fields: dict[str, object]) -> None:
    store.add(VMConfig(vm_id="u"), "/a")
    with pytest.raises(ValueError):
        store.update("u", **fields)
    assert store.get("u").state is VMState.CREATED


def test_remove(store: StateStore) -> None:
    store.add(VMConfig(vm_id="r"), "/a")
    store.remove("r")
    assert not store.exists("r")
    store.remove("r")  # removing twice is harmless


def test_all_in_creation_order(store: StateStore) -> None:
    for name in ("c", "a", "b"):
        store.add(VMConfig(vm_id=name), "/a")
    assert [r.id for r in store.all()] == ["c", "a", "b"]


def test_as_dict(store: StateStore) -> None:
    rec = store.add(VMConfig(vm_id="d", memory=300, vcpus=1, disk_size=5000), "/img")
    d = rec.as_dict()
    assert d["id"] == "d"
    assert d["state"] == "created"
    assert (d["memory"], d["vcpus"], d["disk_size"], d["image"]) == (300, 1, 5000, "default")
    assert d["image_dir"] == "/img"
    assert isinstance(d["created_at"], float)


def test_two_stores_share_one_database(tmp_path: Path) -> None:
    a = StateStore(tmp_path / "s.db")
    b = StateStore(tmp_path / "s.db")
    a.add(VMConfig(vm_id="shared"), "/a")
    assert b.get("shared").id == "shared"
    b.update("shared", state=VMState.PAUSED)
    assert a.get("shared").state is VMState.PAUSED


def test_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    StateStore(path)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            s = StateStore(path)
            for i in range(10):
                s.add(VMConfig(vm_id=f"w{n}-{i}"), "/a")
                s.update(f"w{n}-{i}", state=VMState.RUNNING, pid=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records = StateStore(path).all()
    assert len(records) == 60
    assert all(r.state is VMState.RUNNING for r in records)


def test_default_path_is_in_data_dir(data_dir: Path) -> None:
    assert StateStore().path == data_dir / "state.db"
