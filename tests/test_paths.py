"""Where SmolVM keeps files: SMOLVM_DATA_DIR and short socket directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smolvm import paths


def test_session_data_dir_is_isolated(data_dir: Path) -> None:
    assert paths.data_dir() == data_dir
    assert paths.images_dir() == data_dir / "images"
    assert paths.images_dir().is_symlink()  # to the real images, see conftest
    assert paths.sandbox_dir("abc") == data_dir / "sandboxes" / "abc"


def test_data_dir_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new" / "nested"
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(target))
    assert paths.data_dir() == target
    assert target.is_dir()


def test_runtime_dir_short_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path))
    run = paths.runtime_dir("box")
    assert run == tmp_path / "sandboxes" / "box"
    assert run.is_dir()


def test_runtime_dir_for_long_data_dir_fits_sun_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(long_dir))
    vm_id = "a" * 48
    run = paths.runtime_dir(vm_id)
    assert len(str(run / "agent.sock")) <= paths.SOCKET_PATH_MAX
    assert run.is_dir()
    assert run.stat().st_mode & 0o777 == 0o700
    assert vm_id in run.name
    assert paths.runtime_dir(vm_id) == run  # stable
    # another data dir gets another directory for the same id
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(long_dir) + "2")
    other = paths.runtime_dir(vm_id)
    assert other != run
    for d in (run, other):
        d.rmdir()


def test_runtime_dir_is_owned_by_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path / ("x" * 120)))
    run = paths.runtime_dir("box")
    assert run.stat().st_uid == os.getuid()
    run.rmdir()
