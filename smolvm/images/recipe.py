"""What goes into a guest image, and the hash that says when to rebuild it."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

# Bumped when the build steps change in a way the inputs below don't show.
BUILDER_VERSION = 1

# What an agent expects on a Linux box; python3 (not python3-minimal) brings the full stdlib.
PACKAGES = (
    "bash",
    "busybox-static",  # the initramfs's userland
    "ca-certificates",
    "coreutils",
    "curl",
    "git",
    "iproute2",
    "kmod",
    "openssh-server",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "tini",  # PID 1: reaps orphans, forwards signals
    "vim-tiny",  # an editor for the interactive shell
)
# Debian's generic kernel, not its cloud one: only the generic one has 9p (the
# folder mounts), as modules; it builds ext4 as a module too.
KERNEL_PACKAGES = {"debian": "linux-image-amd64", "ubuntu": "linux-image-kvm"}

# The generic kernel's drivers for hardware a microVM never has (sound cards, GPUs,
# USB, wireless; 300 MB of modules) are not installed: of drivers/ only these are.
# Filesystems, netfilter, crypto and the rest stay, for what users modprobe.
KEPT_DRIVERS = ("virtio", "block", "char", "net", "md")
DROPPED_NET_DRIVERS = ("wireless", "ethernet", "usb", "can", "wwan")


def dpkg_filters() -> list[str]:
    """dpkg path filters (applied in order, the last match wins) that leave the
    unused kernel modules out of the tree."""
    mods = "/lib/modules/*/kernel"
    return [
        f"path-exclude={mods}/sound/*",
        f"path-exclude={mods}/drivers/*",
        *(f"path-include={mods}/drivers/{d}/*" for d in KEPT_DRIVERS),
        *(f"path-exclude={mods}/drivers/net/{d}/*" for d in DROPPED_NET_DRIVERS),
    ]


# Loaded by the initramfs, with what they depend on (see guest/initramfs-init);
# those a kernel has built in are skipped. crc32c is asked for by name at mount
# time (ext4's metadata checksums), which nothing in the initramfs could load then.
MODULES = (
    *("virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng", "virtio_net"),
    *("crc32c_generic", "ext4", "9pnet_virtio", "9p"),
)

DISK_SIZE_MIB = 4096  # the root filesystem's size; a sandbox may ask for more

AGENT_FILES = (
    "agent.py",
    "wire.py",
    "commands.py",
    "terminal.py",
    "processes.py",
    "files.py",
    "watch.py",
    "limits.py",
    "net.py",
    "init.sh",
)  # to /opt/smolvm, with protocol.py beside them
GUEST_FILES = (*AGENT_FILES, "initramfs-init")


def guest_file(name: str) -> bytes:
    if name == "protocol.py":
        return resources.files("smolvm").joinpath("protocol.py").read_bytes()
    return resources.files("smolvm.guest").joinpath(name).read_bytes()


def packages(distro: str) -> list[str]:
    return sorted({*PACKAGES, KERNEL_PACKAGES.get(distro, KERNEL_PACKAGES["debian"])})


def tree_key(distro: str, suite: str) -> str:
    """Names the cached root filesystem tree: it depends on the package set only."""
    text = "\n".join([str(BUILDER_VERSION), distro, suite, *packages(distro), *dpkg_filters()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_hash(distro: str, suite: str) -> str:
    """Changes whenever anything that ends up in the image would change."""
    h = hashlib.sha256(tree_key(distro, suite).encode())
    for name in (*GUEST_FILES, "protocol.py"):
        h.update(name.encode() + b"\0" + guest_file(name) + b"\0")
    # The steps that assemble the image are part of its recipe too.
    h.update(resources.files("smolvm.images").joinpath("build.py").read_bytes())
    h.update(repr((MODULES, DISK_SIZE_MIB)).encode())
    return h.hexdigest()[:16]


def host_release(os_release: Path = Path("/etc/os-release")) -> tuple[str, str]:
    """(distro, suite) of the host: the guest is built from the host's own release and mirrors."""
    fields: dict[str, str] = {}
    try:
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    except OSError:
        pass
    distro = fields.get("ID", "")
    suite = fields.get("VERSION_CODENAME", "")
    if distro not in KERNEL_PACKAGES or not suite:
        return "debian", "bookworm"
    return distro, suite
