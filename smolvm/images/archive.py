"""An image as one file, to carry to another machine: ``image save`` and ``image load``.

The file is a plain tar: ``smolvm-image.json`` first (what the image is, and the
sha256 and size of each other member), then ``kernel``, ``initrd.img`` and
``rootfs.qcow2``. The root disk is the image's whole chain flattened into one
qcow2 disk (``qemu-img convert``), so a saved image needs nothing else to load:
not the image it was built on, nor any layer.

Loading trusts nothing in the file. Members are only those four, regular files,
each within its bound, written to a staging directory while their sums are taken;
a sum or size that differs from the index, a truncated file, or a root disk that
is not a plain qcow2 disk with no backing file (one naming a host file would read
it) is refused, and the staging goes. Only then is the image filed under its name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from ..exceptions import ImageError, ValidationError
from . import layers
from .store import FILES, ImageStore, ImageVersion, check_name, sha256_file

INDEX = "smolvm-image.json"
FORMAT = 1
INDEX_MAX = 1 << 20
LIMITS = {"kernel": 256 << 20, "initrd.img": 1 << 30, "rootfs.qcow2": 1 << 40}  # bytes per member
KEPT = ("distro", "suite", "kernel_version", "kernel_format", "disk_size_mib", "protocol_version", "config", "steps")


def save(name: str, dest: Path) -> Path:
    """Write image ``name`` to ``dest`` (replaced whole, never half-written)."""
    store = ImageStore()
    image = store.load(name, full_check=True)
    if dest.is_dir():
        raise ValidationError(f"{dest} is a directory: give the file to save the image to, such as {dest / name}.tar")
    dest = dest.absolute()
    # A name of its own, made here and written through its descriptor: no link planted in
    # its place is followed.
    handle, name_part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    part = Path(name_part)
    work = Path(tempfile.mkdtemp(dir=store.root, prefix=".save-"))
    try:
        flat = work / "rootfs.qcow2"
        proc = subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(image.rootfs), str(flat)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(f"could not flatten the {name!r} image's disk: {proc.stderr.strip()[:300]}")
        files = {"kernel": image.kernel, "initrd.img": image.initrd, "rootfs.qcow2": flat}
        index = {
            "format": FORMAT,
            "name": name,
            "saved_at": time.time(),
            "manifest": {k: image.manifest[k] for k in KEPT if k in image.manifest},
            "files": {m: {"sha256": sha256_file(p), "size": p.stat().st_size} for m, p in files.items()},
        }
        data = json.dumps(index, indent=2).encode()
        raw = os.fdopen(handle, "wb")
        handle = -1  # the file object owns it now
        with raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            entry = tarfile.TarInfo(INDEX)
            entry.size, entry.mtime = len(data), int(time.time())
            tar.addfile(entry, io.BytesIO(data))
            for member, path in files.items():
                tar.add(path, arcname=member, recursive=False)
        part.chmod(0o644)
        os.replace(part, dest)
    except BaseException:
        if handle >= 0:
            os.close(handle)
        part.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def load(source: Path, name: str | None = None) -> ImageVersion:
    """File the image saved in ``source`` under its own name, or ``name``."""
    store = ImageStore()
    store.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=store.root, prefix=".load-"))
    try:
        try:
            tar = tarfile.open(source, "r:")
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(
                f"{source} is not a saved SmolVM image ({exc}): make one with 'smolvm image save'"
            ) from None
        with tar:
            index = _read_index(tar, source)
            target = check_name(name or str(index.get("name")))
            if target == "default":
                raise ImageError(
                    "the default image is made by 'smolvm setup': load this one under another name (--name)"
                )
            if (store.root / target / "current").is_symlink():
                raise ImageError(
                    f"an image named {target!r} exists: remove it first ('smolvm image rm {target}'), "
                    "or load this one under another name (--name)"
                )
            seen = set()
            while (member := _next(tar, source)) is not None:  # the members after the index, in order
                _extract(tar, member, index["files"], work, source)
                seen.add(member.name)
        missing = set(FILES) - seen
        if missing:
            raise ImageError(f"{source} is truncated or incomplete: it lacks {', '.join(sorted(missing))}")
        # Judged by the header's fields: a name QEMU would read up to a NUL must not pass.
        size_mib = index["manifest"].get("disk_size_mib")
        limit = size_mib << 20 if isinstance(size_mib, int) and 0 < size_mib <= 1 << 20 else 0
        try:
            layers.check_header(work / "rootfs.qcow2", max_size=limit, backing=False)
        except ImageError as exc:
            raise ImageError(f"{source}: {exc}") from None
        manifest = {
            **{k: v for k, v in index["manifest"].items() if k in KEPT},
            "name": target,
            "recipe": hashlib.sha256(index["files"]["rootfs.qcow2"]["sha256"].encode()).hexdigest()[:16],
            "built_at": time.time(),
            "loaded_from": str(source),
        }
        _check_manifest(manifest, source)
        for filename in FILES:
            (work / filename).chmod(0o444)
        return store.install(target, work, manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _next(tar: tarfile.TarFile, source: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ImageError(f"{source} is truncated or damaged: {exc}") from None


def _read_index(tar: tarfile.TarFile, source: Path) -> dict[str, Any]:
    first = _next(tar, source)
    if first is None or first.name != INDEX or not first.isfile() or first.size > INDEX_MAX:
        raise ImageError(f"{source} is not a saved SmolVM image: it does not start with {INDEX}")
    stream = tar.extractfile(first)
    assert stream is not None
    try:
        index = json.loads(stream.read(INDEX_MAX))
    except (ValueError, RecursionError):
        raise ImageError(f"{source}'s {INDEX} is not valid JSON: the file is damaged") from None
    if not isinstance(index, dict):
        raise ImageError(f"{source}'s {INDEX} is not an index: the file is damaged")
    files = index.get("files")
    if index.get("format") != FORMAT or not isinstance(files, dict) or set(files) != set(FILES):
        raise ImageError(f"{source} was saved in a format this SmolVM does not read (format {index.get('format')!r})")
    for member, entry in files.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
        if not ok or not 0 <= entry["size"] <= LIMITS[member]:
            raise ImageError(f"{source}'s index is damaged at {member}")
    if not isinstance(index.get("manifest"), dict):
        raise ImageError(f"{source}'s index lacks the image's manifest")
    return index


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, files: dict[str, Any], work: Path, source: Path) -> None:
    """One member into ``work``, checked against the index as it is written."""
    if member.name not in files or (work / member.name).exists():
        raise ImageError(f"{source} holds {member.name!r}, which no saved image has: refused")
    if not member.isfile():
        raise ImageError(f"{source} holds {member.name} as something other than a file: refused")
    expected = files[member.name]
    if member.size != expected["size"]:
        raise ImageError(f"{source}: {member.name} is {member.size} bytes, its index says {expected['size']}")
    stream = tar.extractfile(member)
    assert stream is not None
    digest = hashlib.sha256()
    written = _copy(stream, work / member.name, digest, member.size)
    if written != expected["size"] or digest.hexdigest() != expected["sha256"]:
        raise ImageError(f"{source}: {member.name} fails its sha256 check: the file is damaged or was altered")


def _copy(stream: IO[bytes], dest: Path, digest: Any, size: int) -> int:
    """Copy ``size`` bytes at most, leaving holes where the data is zeros (disks are sparse)."""
    written = 0
    with open(dest, "xb") as out:
        while written < size:
            try:
                chunk = stream.read(min(1 << 20, size - written))
            except (OSError, tarfile.TarError, EOFError) as exc:
                raise ImageError(f"the saved image is truncated or damaged at {dest.name}: {exc}") from None
            if not chunk:
                break
            digest.update(chunk)
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            written += len(chunk)
        out.truncate(written)
    return written


def _check_manifest(manifest: dict[str, Any], source: Path) -> None:
    from .. import protocol

    size = manifest.get("disk_size_mib")
    if not isinstance(size, int) or not 256 <= size <= 1 << 20:
        raise ImageError(f"{source}'s manifest gives no sound disk size")
    if manifest.get("protocol_version") != protocol.VERSION:
        raise ImageError(
            f"{source} holds a guest agent of protocol {manifest.get('protocol_version')!r}, this SmolVM speaks "
            f"{protocol.VERSION}: save it again with this version of SmolVM"
        )
    config = manifest.get("config")
    if config is not None and not isinstance(config, dict):
        raise ImageError(f"{source}'s manifest has a malformed config")
    workdir = (config or {}).get("workdir")
    if workdir is not None and not (isinstance(workdir, str) and workdir.startswith("/")):
        raise ImageError(f"{source}'s manifest has a malformed working directory")
    if not all(isinstance(s, str) for s in manifest.get("steps") or []):
        raise ImageError(f"{source}'s manifest has malformed steps")
