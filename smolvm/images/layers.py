"""The build cache: one read-only qcow2 layer for each build step that changed the disk.

A layer is named by its key, a hash of its parent's key and its step, so an
unchanged prefix of steps finds its layers again (as Docker's cache does). Its
disk reads through to its parent's disk: the base image's root disk, or the
layer before. Layout under ``<images>/layers``::

    <key>/disk.qcow2   read-only; its header names the parent's disk
    <key>/meta.json    written last: the step, its parent, when and how big
    .new-<random>/     a build's layers until they are checked and named

The disk was written by a builder sandbox's QEMU, so its header is not taken on
trust: the backing file it names is written anew (the parent SmolVM chose), and a
disk with any feature beyond what QEMU writes for a plain overlay (an external
data file could name any host file) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import ImageError
from ..paths import images_dir

DISK = "disk.qcow2"
META = "meta.json"
QCOW2_MAGIC = b"QFI\xfb"
# Incompatible features QEMU writes for an overlay: dirty, corrupt, compression type,
# extended L2. Bit 2, an external data file, is what a hostile header would use.
KNOWN_FEATURES = 0b11011


def layers_dir() -> Path:
    return images_dir() / "layers"


@dataclass(frozen=True)
class Layer:
    key: str
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / DISK

    def meta(self) -> dict[str, Any]:
        value = json.loads((self.dir / META).read_text())
        return value if isinstance(value, dict) else {}


def find(key: str, root: Path | None = None) -> Layer | None:
    """The finished layer of ``key``, or None (a layer is finished once its meta is written)."""
    layer = Layer(key, (root or layers_dir()) / key)
    return layer if (layer.dir / META).is_file() and layer.disk.is_file() else None


def disk_of(key: str) -> Path:
    layer = find(key)
    if layer is None:
        raise ImageError(f"layer {key} is gone from the build cache: build the image again")
    return layer.disk


def staging(root: Path | None = None) -> Path:
    """A directory for one build's new layers, beside the finished ones (same filesystem)."""
    base = root or layers_dir()
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base, prefix=".new-"))


MAX_DISK = 1 << 40  # bytes of virtual size any disk of SmolVM's may claim


def virtual_size(disk: Path) -> int:
    """The size a qcow2 disk's header gives (for a disk of SmolVM's own making)."""
    with open(disk, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != QCOW2_MAGIC:
        raise ImageError(f"the disk {disk} is not a qcow2 disk")
    return int(struct.unpack(">Q", header[24:32])[0])


def check_header(disk: Path, max_size: int = MAX_DISK, backing: bool = True) -> None:
    """Refuse a disk that is not a plain qcow2 overlay: wrong magic, a feature bit (an
    external data file above all) SmolVM's overlays never have, a virtual size beyond
    ``max_size`` (the guest could fill the host's disk), or, without ``backing``, any
    backing file at all (judged by the header's fields, not by whether its name reads)."""
    try:
        with open(disk, "rb") as f:
            header = f.read(80)
    except OSError as exc:
        raise ImageError(f"cannot read the disk {disk}: {exc.strerror}") from None
    if len(header) < 80 or header[:4] != QCOW2_MAGIC:
        raise ImageError(f"the disk {disk} is not a qcow2 disk: the machine that wrote it was tampered with")
    version, name_offset, name_size = struct.unpack(">IQI", header[4:20])
    size = struct.unpack(">Q", header[24:32])[0]
    incompatible = struct.unpack(">Q", header[72:80])[0] if version >= 3 else 0
    if version not in (2, 3) or incompatible & ~KNOWN_FEATURES:
        raise ImageError(
            f"the disk {disk} uses qcow2 features SmolVM never writes (version {version}, "
            f"features {incompatible:#x}): the machine that wrote it was tampered with"
        )
    if size > max_size:
        raise ImageError(f"the disk {disk} claims {size} bytes, over the {max_size} it may have: refused")
    if not backing and (name_offset or name_size):
        raise ImageError(f"the disk {disk} reads through to another file: it must hold its whole disk")


def _qemu_img(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=False, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ImageError(f"could not {what}: qemu-img took over 30 minutes") from None
    if proc.returncode != 0:
        raise ImageError(f"could not {what}: {proc.stderr.strip()[:300]}")


def rebase(disk: Path, base: Path, *, safe: bool = False) -> None:
    """Name ``base`` as the qcow2 backing file of ``disk``: in the header alone, or with
    ``safe``, first copying in what reads differently through ``base`` than through the
    disk's current base (folding that base into the disk). Check the header first: a safe
    rebase reads through what it names."""
    argv = ["rebase", "-q", *([] if safe else ["-u"]), "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk)]
    _qemu_img(argv, "fold a disk into a layer" if safe else "name a layer's base")


def commit(
    key: str, disk: Path, parent: Path, meta: dict[str, Any], root: Path | None = None, max_size: int = MAX_DISK
) -> tuple[Layer, bool]:
    """Check a staged layer's disk, name ``parent`` as its base, and file it under ``key``;
    the layer, and whether it is this one. If another build filed the same key meanwhile,
    that one is kept and this one dropped (its blocks differ: a layer made over this one
    must not be put over that one)."""
    base = root or layers_dir()
    check_header(disk, max_size)
    rebase(disk, parent)  # the parent is the disk this one was made over
    check_header(disk, max_size)
    disk.chmod(0o444)
    home = Path(tempfile.mkdtemp(dir=base, prefix=".new-"))
    ours = False
    try:
        os.rename(disk, home / DISK)
        size = (home / DISK).stat().st_blocks * 512
        record = dict(meta, key=key, parent=str(parent), created_at=time.time(), bytes_on_disk=size)
        (home / META).write_text(json.dumps(record, indent=2))
        try:
            os.rename(home, base / key)
            ours = True
        except OSError:  # filed meanwhile (a directory that is not empty is never replaced)
            pass
    finally:
        if not ours:
            shutil.rmtree(home, ignore_errors=True)
    layer = find(key, base)
    if layer is None:
        raise ImageError(
            f"the build cache could not keep layer {key}: {base / key} is in the way; run 'smolvm image prune'"
        )
    return layer, ours


def chain(key: str | None, root: Path | None = None) -> list[str]:
    """The keys of a layer and of every layer under it, top first."""
    keys: list[str] = []
    while key:
        layer = find(key, root)
        if layer is None:
            break
        keys.append(key)
        parent = layer.meta().get("parent_key")
        key = parent if isinstance(parent, str) else None
    return keys


def prune(keep: Iterable[str], root: Path | None = None, grace: float = 3600.0) -> list[Path]:
    """Remove layers no image needs (``keep``: every key an image version's chain holds),
    and staging left by builds that died more than ``grace`` seconds ago."""
    base = root or layers_dir()
    wanted = set(keep)
    removed = []
    for entry in base.iterdir() if base.is_dir() else []:
        stale = entry.name.startswith(".new-") and time.time() - entry.stat().st_mtime > grace
        if stale or (not entry.name.startswith(".") and entry.name not in wanted):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
