"""The image store on a temp directory: install, verify, prune, remove. No real image is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smolvm.exceptions import ImageError, ValidationError
from smolvm.images.store import FILES, ImageStore


def make_build(root: Path, tag: str) -> Path:
    build = root / f".build-{tag}"
    build.mkdir(parents=True)
    for name in FILES:
        (build / name).write_bytes(f"{name} {tag} ".encode() * 100)
    return build


def manifest(recipe: str) -> dict[str, object]:
    return {"name": "default", "recipe": recipe, "disk_size_mib": 4096, "kernel_version": "6.1-test"}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def test_not_built(store: ImageStore) -> None:
    with pytest.raises(ImageError, match="not built"):
        store.load("default")
    assert store.names() == []
    assert not store.is_current("default", "abc")


def test_install_and_load(store: ImageStore) -> None:
    store.root.mkdir()
    img = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    assert img.dir.parent == store.root / "default" and img.dir.name.startswith("v1-")
    assert (store.root / "default" / "current").is_symlink()
    assert img.recipe == "v1" and img.disk_size == 4096
    assert img.kernel.name == "kernel" and img.initrd.name == "initrd.img" and img.rootfs.name == "rootfs.qcow2"
    loaded = store.load("default", full_check=True)
    assert loaded.dir == img.dir
    assert store.names() == ["default"]
    assert store.is_current("default", "v1") and not store.is_current("default", "v2")
    files = json.loads((img.dir / "manifest.json").read_text())["files"]
    assert set(files) == set(FILES)
    summary = loaded.summary()
    assert summary["bytes_on_disk"] == sum((img.dir / f).stat().st_size for f in FILES)


def test_reinstall_switches_current(store: ImageStore) -> None:
    store.root.mkdir()
    old = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    store.install("default", make_build(store.root, "v2"), manifest("v2"))
    assert store.load("default").recipe == "v2"
    assert old.dir.is_dir()  # old version kept until pruned


def test_missing_file_detected(store: ImageStore) -> None:
    store.root.mkdir()
    img = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    img.initrd.unlink()
    with pytest.raises(ImageError, match="missing initrd.img"):
        store.load("default")


def test_changed_file_detected(store: ImageStore) -> None:
    store.root.mkdir()
    img = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    img.kernel.write_bytes(b"tampered")
    with pytest.raises(ImageError, match="corrupt"):
        store.load("default")


def test_same_size_same_mtime_change_needs_full_check(store: ImageStore) -> None:
    store.root.mkdir()
    img = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    st = img.rootfs.stat()
    data = bytearray(img.rootfs.read_bytes())
    data[0] ^= 0xFF
    img.rootfs.write_bytes(bytes(data))
    os.utime(img.rootfs, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.load("default")  # the quick check trusts size+mtime
    with pytest.raises(ImageError, match="corrupt"):
        store.load("default", full_check=True)


def test_bad_names(store: ImageStore) -> None:
    for bad in ("../x", "Default", ""):
        with pytest.raises(ValidationError):
            store.load(bad)


def test_prune_keeps_current_and_used(store: ImageStore) -> None:
    store.root.mkdir()
    v1, v2, _ = (store.install("default", make_build(store.root, v), manifest(v)) for v in ("v1", "v2", "v3"))
    removed = store.prune("default", [v1.dir])
    assert removed == [v2.dir]
    assert v1.dir.is_dir()
    assert store.load("default").recipe == "v3"


def test_prune_through_symlinked_root_keeps_current(tmp_path: Path) -> None:
    real = tmp_path / "real-images"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    store = ImageStore(tmp_path / "link")
    for v in ("v1", "v2"):
        store.install("default", make_build(store.root, v), manifest(v))
    store.prune("default", [])
    assert store.load("default").recipe == "v2"


def test_remove(store: ImageStore, tmp_path: Path) -> None:
    store.root.mkdir()
    img = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    with pytest.raises(ImageError, match="no image named"):
        store.remove("other", [])
    with pytest.raises(ImageError, match="still use"):
        store.remove("default", [img.dir])
    assert store.load("default").recipe == "v1"
    store.remove("default", [tmp_path / "unrelated"])
    assert store.names() == []


def test_rebuilding_the_same_recipe_never_replaces_a_version_in_use(store: ImageStore) -> None:
    """Sandbox disks refer to their base image by path: a rebuild gets a directory of its own."""
    store.root.mkdir()
    first = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    (first.dir / "marker").write_text("a sandbox's backing file lives here")
    second = store.install("default", make_build(store.root, "v1"), manifest("v1"))
    assert second.dir != first.dir
    assert (first.dir / "marker").exists()
    assert store.load("default").dir == second.dir
    store.prune("default", in_use=[first.dir])
    assert first.dir.exists()
    store.prune("default", in_use=[])
    assert not first.dir.exists() and second.dir.exists()
