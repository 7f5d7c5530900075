"""The host's system packages: what SmolVM needs from Debian/Ubuntu, and installing it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .backends.qemu import MAPPED_MEMORY_QEMU, QEMU_BINARY, qemu_version
from .exceptions import HostError

# Debian package -> why SmolVM needs it
PACKAGES = {
    "qemu-system-x86": "the hypervisor",
    "qemu-utils": "qemu-img, for copy-on-write sandbox disks",
    "mmdebstrap": "builds the guest's root filesystem",
    "e2fsprogs": "mkfs.ext4, turns it into a disk image",
    "cpio": "packs the guest's initramfs",
    "lz4": "unpacks the kernel for direct boot",
    "zstd": "unpacks zstd-compressed kernels and modules",
    "openssh-client": "ssh, for 'smolvm sandbox ssh'",
}


def missing_packages() -> list[str]:
    missing = []
    for name in PACKAGES:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${db:Status-Status}", name], capture_output=True, text=True
            ).stdout
        except FileNotFoundError:
            raise HostError("this host has no dpkg: SmolVM's setup supports Debian and Ubuntu hosts") from None
        if out.strip() != "installed":
            missing.append(name)
    return missing


def install_packages(names: list[str]) -> None:
    """apt-get install ``names`` (root only), refreshing the package lists first."""
    if not names:
        return
    if os.geteuid() != 0:
        raise HostError(
            f"missing system packages: {' '.join(names)}. Install them with "
            f"'sudo apt-get install {' '.join(names)}' or run 'sudo smolvm setup'"
        )
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *names]):
        _apt(argv)


BACKPORTS_LIST = Path("/etc/apt/sources.list.d/smolvm-bookworm-backports.sources")
QEMU_PACKAGES = ["qemu-system-x86", "qemu-utils"]


def _installed_qemu() -> tuple[int, int] | None:
    binary = shutil.which(QEMU_BINARY)
    return qemu_version(binary) if binary else None


def _os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip().strip('"') for k, _, v in (line.partition("=") for line in lines) if k}


def debian_mirror(sources: Path = Path("/etc/apt")) -> tuple[str, str | None] | None:
    """The URI (and keyring) of the host's own apt source for Debian 12's main suite,
    from its deb822 ``.sources`` files or one-line ``sources.list`` entries."""
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and "bookworm" in fields.get("suites", "").split():
                uri = [u for u in fields.get("uris", "").split() if _debian_archive(u)]
                main = "main" in fields.get("components", "").split()
                if uri and main and fields.get("enabled", "yes").lower() != "no":
                    return uri[0], fields.get("signed-by")
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == "bookworm" and "main" in words[3:]:
                if _debian_archive(words[1]):
                    return words[1], None
    return None


def _debian_archive(uri: str) -> bool:
    """Whether a source's URI is a Debian archive (its path ends in /debian), not a
    vendor's repository that happens to serve bookworm too."""
    return uri.rstrip("/").endswith("/debian")


def newer_qemu() -> str | None:
    """On Debian 12 as root: QEMU from bookworm-backports, from the mirror the host's own
    sources name, when the installed one is older than 8.2. Returns what it did or why
    it did not (None: nothing to do). SMOLVM_KEEP_QEMU=1 keeps the installed one."""
    if os.environ.get("SMOLVM_KEEP_QEMU") == "1" or os.geteuid() != 0:
        return None
    release = _os_release()
    version = _installed_qemu()
    if release.get("ID") != "debian" or release.get("VERSION_CODENAME") != "bookworm":
        return None
    if version is not None and version >= MAPPED_MEMORY_QEMU:  # see smolvm/backends/qemu.py
        return None
    mirror = debian_mirror()
    if mirror is None:
        return "no apt source for bookworm found to take bookworm-backports from; QEMU stays as it is"
    uri, keyring = mirror
    stanza = f"Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n"
    stanza += f"Signed-By: {keyring or '/usr/share/keyrings/debian-archive-keyring.gpg'}\n"
    BACKPORTS_LIST.write_text("# Added by 'smolvm setup' for QEMU 8.2 or later (see README)\n" + stanza)
    try:
        _apt(["apt-get", "update", "-q"])
        _apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", "-t", "bookworm-backports", *QEMU_PACKAGES])
    except HostError as exc:
        BACKPORTS_LIST.unlink(missing_ok=True)  # a source that does not work would fail every later update
        try:
            _apt(["apt-get", "update", "-q"])
        except HostError:
            pass
        return f"could not install QEMU from bookworm-backports ({exc}); QEMU stays as it is"
    qemu_version.cache_clear()  # the binary is another now
    return "installed QEMU {}.{} from bookworm-backports".format(*(_installed_qemu() or (0, 0)))


def _apt(argv: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise HostError(f"'{' '.join(argv)}' failed:\n{tail}")
