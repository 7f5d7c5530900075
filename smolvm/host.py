"""The host's system packages: what SmolVM needs from Debian/Ubuntu, and installing it."""

from __future__ import annotations

import os
import subprocess

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
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *names]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise HostError(f"'{' '.join(argv)}' failed:\n{tail}")
