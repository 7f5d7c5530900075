"""The image store: built images on disk, each with a manifest of sha256 sums.

Layout under ``<data dir>/images``::

    <name>/<recipe>-<build>/kernel, initrd.img, rootfs.qcow2, manifest.json
    <name>/current -> <recipe>-<build>
    cache/tree-<key>/        the root filesystem tree, reused across agent changes

Image versions are kept while a sandbox's disk still refers to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import ImageError, ValidationError
from ..paths import images_dir
from ..types import ID_PATTERN, ID_RULE
from . import recipe

FILES = ("kernel", "initrd.img", "rootfs.qcow2")
BUILD_HINT = "run 'smolvm setup' (or 'smolvm image build') to build it"


@dataclass(frozen=True)
class ImageVersion:
    name: str
    dir: Path
    manifest: dict[str, Any]

    @property
    def kernel(self) -> Path:
        return self.dir / "kernel"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.qcow2"

    @property
    def recipe(self) -> str:
        return str(self.manifest["recipe"])

    @property
    def disk_size(self) -> int:
        return int(self.manifest["disk_size_mib"])

    def summary(self) -> dict[str, Any]:
        size = sum((self.dir / f).stat().st_size for f in FILES if (self.dir / f).exists())
        return {
            "name": self.name,
            "recipe": self.recipe,
            "kernel": self.manifest.get("kernel_version"),
            "release": f"{self.manifest.get('distro')} {self.manifest.get('suite')}",
            "disk_size_mib": self.disk_size,
            "bytes_on_disk": size,
            "built_at": self.manifest.get("built_at"),
            "path": str(self.dir),
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


RESERVED = ("cache", "templates", "layers")  # directories of the store, not images


def check_name(name: str) -> str:
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name):
        raise ValidationError(f"image name {name!r} is not valid: use {ID_RULE}")
    if name in RESERVED:
        raise ValidationError(f"{name!r} is kept for the image store's own use: name the image otherwise")
    return name


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or images_dir()

    def current_dir(self, name: str) -> Path:
        return self.root / check_name(name) / "current"

    def load(self, name: str = "default", *, full_check: bool = False) -> ImageVersion:
        """The current version of an image, checked against its manifest.

        Files whose size and mtime match the manifest are trusted; any other
        file (or every file, with ``full_check``) has its sha256 recomputed.
        Raises ImageError, saying how to fix it, when anything is off.
        """
        link = self.current_dir(name)
        try:
            version = link.resolve(strict=True)
            manifest = json.loads((version / "manifest.json").read_text())
        except (OSError, ValueError):
            if name != "default":
                raise ImageError(
                    f"there is no image named {name!r}: build it ('smolvm image build {name} -f Dockerfile', "
                    "or Image(...).build() in Python); 'smolvm image list' shows the images there are"
                ) from None
            raise ImageError(f"the {name!r} image is not built yet: {BUILD_HINT}") from None
        image = ImageVersion(name, version, manifest)
        for fname in FILES:
            self._check_file(image, fname, full_check)
        for key in manifest.get("layers") or []:  # a built image reads through its layers
            if not isinstance(key, str) or not (self.root / "layers" / key / "disk.qcow2").is_file():
                raise ImageError(f"the {name!r} image's layer {key} is gone from the build cache: build it again")
        return image

    @staticmethod
    def _check_file(image: ImageVersion, fname: str, full_check: bool) -> None:
        expected = image.manifest.get("files", {}).get(fname)
        path = image.dir / fname
        if not isinstance(expected, dict):
            raise ImageError(f"the {image.name!r} image's manifest lacks {fname}: {BUILD_HINT}")
        try:
            st = path.stat()
        except OSError:
            raise ImageError(f"the {image.name!r} image is missing {fname}: {BUILD_HINT}") from None
        unchanged = st.st_size == expected.get("size") and st.st_mtime_ns == expected.get("mtime_ns")
        if full_check or not unchanged:
            if st.st_size != expected.get("size") or sha256_file(path) != expected.get("sha256"):
                raise ImageError(f"the {image.name!r} image is corrupt ({fname} fails its sha256 check): {BUILD_HINT}")

    def is_current(self, name: str, recipe_hash: str) -> bool:
        try:
            return self.load(name).recipe == recipe_hash
        except ImageError:
            return False

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "current").is_symlink())

    def bases(self) -> list[Path]:
        """The image versions that built images stand on (their disks read through to them)."""
        found = set()
        for name in self.names():
            for version in (self.root / name).iterdir():
                try:
                    base = json.loads((version / "manifest.json").read_text()).get("base")
                except (OSError, ValueError):
                    continue
                if isinstance(base, dict) and isinstance(base.get("dir"), str):
                    found.add(Path(base["dir"]))
        return sorted(found)

    def install(self, name: str, build_dir: Path, manifest: dict[str, Any]) -> ImageVersion:
        """Move a finished build into place and point ``current`` at it."""
        manifest = dict(manifest, files={f: file_entry(build_dir / f) for f in FILES})
        (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        # A version directory is never replaced: sandbox disks refer to it by path.
        final = self.root / check_name(name) / f"{manifest['recipe']}-{secrets.token_hex(4)}"
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(build_dir, final)
        tmp_link = final.parent / ".current.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(final.name)
        os.replace(tmp_link, final.parent / "current")
        return self.load(name)

    def prune(self, name: str, in_use: Iterable[Path]) -> list[Path]:
        """Remove versions of ``name`` other than the current one that no sandbox uses."""
        keep = {p.resolve() for p in in_use}
        base = self.root / check_name(name)
        try:
            current = (base / "current").resolve(strict=True)
        except OSError:
            current = None
        removed = []
        for version in base.iterdir() if base.exists() else []:
            if version.is_symlink() or not version.is_dir() or version.resolve() in keep | {current}:
                continue
            shutil.rmtree(version)
            removed.append(version)
        return removed

    def remove(self, name: str, in_use: Iterable[Path]) -> None:
        base = self.root / check_name(name)
        if not (base / "current").is_symlink():
            raise ImageError(f"there is no image named {name!r}: 'smolvm image list' shows the ones there are")
        users = [p for p in in_use if base.resolve() in p.resolve().parents]
        if users:
            raise ImageError(
                f"{len(users)} sandboxes or snapshots still use the {name!r} image: delete them first "
                "('smolvm sandbox delete --all', 'smolvm snapshot delete ID')"
            )
        shutil.rmtree(base)


def default_recipe() -> str:
    return recipe.recipe_hash(*recipe.host_release())
