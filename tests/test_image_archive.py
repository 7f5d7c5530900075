"""image save / image load (smolvm/images/archive.py): a self-contained file, and
everything a damaged or hostile one can be refused for."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, needs_image

from smolvm import Image, protocol
from smolvm.exceptions import ImageError, ValidationError
from smolvm.images import archive
from smolvm.images.store import ImageStore


def fake_archive(tmp_path: Path, **change: object) -> Path:
    """A small archive of the saved format: a real (tiny) qcow2 disk, stand-in kernel and initrd."""
    disk = tmp_path / "rootfs.qcow2"
    backing = change.pop("backing", None)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", str(disk), str(change.pop("size", "16M"))]
    if backing:
        argv[6:6] = ["-F", "raw", "-b", str(backing)]
    subprocess.run(argv, check=True)
    if change.pop("nul", False):  # a name QEMU reads up to its NUL: "/etc/passw"
        disk.write_bytes(disk.read_bytes().replace(b"/etc/passwd", b"/etc/passw\0"))
    contents = {"kernel": b"kernel bytes", "initrd.img": b"initrd bytes", "rootfs.qcow2": disk.read_bytes()}
    files = {m: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for m, d in contents.items()}
    manifest = {"disk_size_mib": 4096, "protocol_version": protocol.VERSION, "config": {}, "steps": []}
    index: object = {"format": 1, "name": "t-fake", "manifest": manifest, "files": files}
    if change.pop("list_index", False):
        index = [index]
    tamper = change.pop("tamper", None)
    if tamper:
        contents[str(tamper)] = b"X" + contents[str(tamper)][1:]
    path = tmp_path / "saved.tar"
    with tarfile.open(path, "w") as tar:

        def put(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
            entry = tarfile.TarInfo(name)
            entry.type = kind
            entry.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                entry.linkname = "/etc/passwd"
            tar.addfile(entry, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        if not change.pop("no_index", False):
            put(archive.INDEX, json.dumps(index).encode())
        for name, data in contents.items():
            if change.get("link") == name:
                put(name, b"", tarfile.SYMTYPE)
            else:
                put(name, data)
        if change.pop("extra", False):
            put("../escape", b"x")
    return path


def leftovers() -> list[str]:
    root = ImageStore().root
    return [p.name for p in root.iterdir() if p.name.startswith(".load-")] + (
        ["t-fake"] if (root / "t-fake").exists() else []
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"no_index": True}, "does not start with smolvm-image.json"),
        ({"tamper": "kernel"}, "kernel fails its sha256 check"),
        ({"tamper": "rootfs.qcow2"}, "rootfs.qcow2 fails its sha256 check"),
        ({"extra": True}, "holds '../escape', which no saved image has"),
        ({"link": "rootfs.qcow2"}, "rootfs.qcow2 as something other than a file"),
        ({"backing": "/etc/passwd"}, "reads through to another file"),
        ({"backing": "/etc/passwd", "nul": True}, "reads through to another file"),
        ({"size": "8G"}, "claims 8589934592 bytes, over the 4294967296"),
        ({"list_index": True}, "is not an index"),
    ],
)
def test_a_damaged_or_hostile_saved_image_is_refused_and_leaves_nothing(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = fake_archive(tmp_path, **change)
    with pytest.raises(ImageError, match=message):
        archive.load(path)
    assert leftovers() == []


def test_a_truncated_file_or_no_archive_at_all_is_refused(tmp_path: Path) -> None:
    path = fake_archive(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="truncated|damaged|incomplete"):
        archive.load(path)
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ImageError, match="not a saved SmolVM image"):
        archive.load(path)
    with pytest.raises(ImageError, match="not a saved SmolVM image"):
        archive.load(tmp_path / "missing.tar")
    assert leftovers() == []


def test_a_name_that_is_taken_or_malformed_is_refused(tmp_path: Path) -> None:
    if not (ImageStore().root / "default" / "current").is_symlink():
        pytest.skip("needs an image named default to collide with")
    with pytest.raises(ImageError, match="the default image is made by 'smolvm setup'"):
        archive.load(fake_archive(tmp_path), "default")
    with pytest.raises(ValidationError, match="not valid"):
        archive.load(fake_archive(tmp_path), "Bad Name")
    assert leftovers() == []


def smolvm(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **({"SMOLVM_DATA_DIR": str(data_dir)} if data_dir else {}))
    return subprocess.run([str(SMOLVM_BIN), *args], capture_output=True, text=True, timeout=600, env=env)


@needs_image
def test_a_saved_image_loads_where_no_other_image_exists_and_runs(tmp_path: Path, scratch_images: list[str]) -> None:
    name = "t-saved"
    scratch_images.append(name)
    token = secrets.token_hex(4)
    other = tmp_path / "elsewhere"  # a second data directory, with no image at all
    try:
        Image.from_image("default").run(f"echo {token} > /marker").env({"FROM_SAVE": "yes"}).build(name)
        saved = smolvm("image", "save", name, str(tmp_path / "img.tar"))
        assert saved.returncode == 0, saved.stderr
        loaded = smolvm("image", "load", str(tmp_path / "img.tar"), data_dir=other)
        assert loaded.returncode == 0, loaded.stderr
        assert (other / "images" / name / "current").is_symlink() and not (other / "images" / "default").exists()
        ran = smolvm("run", "--image", name, "--", "cat /marker; echo $FROM_SAVE", data_dir=other)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == [token, "yes"]
        again = smolvm("image", "load", str(tmp_path / "img.tar"), data_dir=other)
        assert again.returncode == 1 and f"an image named '{name}' exists" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)
