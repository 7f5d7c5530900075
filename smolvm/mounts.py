"""Host folders shared into a sandbox, as virtio-9p filesystems.

QEMU serves each folder itself (``-fsdev local``): no root on the host, no
daemon. It opens the folder when it starts and answers the guest's file
operations inside it, with QEMU's own identity and permissions on the host;
``security_model=none`` keeps the files as they are on the host (no mapped
owners in extended attributes), so what the guest writes is an ordinary file
of QEMU's user. A read-only mount is read-only in QEMU (``readonly=on``): the
guest's root cannot write it, since no write request is served.

The guest mounts a share by its tag (``smolvm0``, ...) once its agent answers,
on every start: a cold boot finds the devices at boot, a resumed template (saved
with none) probes the transports it found empty when it booted.

Run as root, QEMU is jailed (smolvm/jail.py) and would reach the folders with
the jail's uid, which owns nothing. A sandbox with mounts therefore runs its
QEMU as the folders' owner instead (without capabilities, under the same
seccomp filter): the guest then writes files as that user. A writable mount
of a folder root owns is refused, since QEMU would need root's power over the
host to serve it; a read-only one is served with the jail's own uid, which
reads what everyone may read. Such a QEMU is not chrooted: QEMU's 9p server
sets a new file's mode through /proc/self/fd (measured: every create failed
in the empty root), and the folder's open descriptor would lead out of a
chroot through ".." anyway. What guards the host then is the uid.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import ValidationError as PydanticError

from . import jail
from .exceptions import HostError, ValidationError
from .paths import runtime_base

# Transports the machine has (QEMU's microvm makes 8 virtio-mmio slots), less the
# five devices every sandbox has: root and transfer disks, serial ports, net, rng.
MAX_MOUNTS = 3
TAG_PREFIX = "smolvm"  # the guest finds share i by its tag, smolvm<i>
PATH_MAX = 1024
# Where a mount would break the guest: at, under or above these trees...
GUEST_TREES = (
    *("/proc", "/sys", "/dev", "/run", "/var/run", "/var/lock", "/opt/smolvm"),
    *("/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot"),
)
# ...or on these directories themselves (a mount below them is fine).
GUEST_SYSTEM_DIRS = ("/", "/etc", "/var", "/tmp", "/root", "/home", "/opt", "/mnt")


def _plain(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"the {what} path is empty")
    if len(value) > PATH_MAX:
        raise ValueError(f"the {what} path is longer than {PATH_MAX} characters")
    bad = next((ch for ch in value if ch == ":" or ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        raise ValueError(f"the {what} path {value!r} holds {bad!r}: mount paths may not hold ':' or control characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"the {what} path {value!r} is not valid text") from None
    return value


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


class Mount(BaseModel):
    """A host folder seen in the sandbox: ``Mount("./data", "/data")`` (read-only),
    ``Mount("./out", "/out", writable=True)``. ``guest`` defaults to the folder's
    absolute path on the host, so paths in the guest's output mean the same there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    guest: str = ""
    writable: bool = False

    def __init__(self, host: str | os.PathLike[str], guest: str | None = None, writable: bool = False, **kw: Any):
        super().__init__(host=os.fspath(host), guest=guest or "", writable=writable, **kw)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        _plain(value, "host")
        path = os.path.normpath(os.path.abspath(os.path.expanduser(value)))
        if path == "/":
            raise ValueError("a mount of the host's / would show the guest the whole host: mount a folder")
        return path

    @field_validator("guest")
    @classmethod
    def _check_guest(cls, value: str) -> str:
        if not value:
            return value  # the host path, filled in below
        return check_guest_path(value)

    def model_post_init(self, _context: Any) -> None:
        if not self.guest:
            object.__setattr__(self, "guest", check_guest_path(self.host))

    @classmethod
    def parse(cls, text: str) -> Mount:
        """The CLI's form, ``HOST[:GUEST][:rw|:ro]``: read-only unless it ends in ``:rw``."""
        parts = text.split(":")
        writable = False
        if len(parts) > 1 and parts[-1] in ("rw", "ro"):
            writable = parts.pop() == "rw"
        if len(parts) > 2 or not parts[0]:
            raise ValidationError(
                f"--mount {text!r} is not HOST[:GUEST][:rw] (paths may not hold ':'): e.g. ./data:/data:rw"
            )
        try:
            return cls(parts[0], parts[1] if len(parts) > 1 else None, writable)
        except PydanticError as exc:
            raise ValidationError(f"--mount {text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    def describe(self) -> str:
        return f"{self.host} -> {self.guest} ({'rw' if self.writable else 'read-only'})"


def check_guest_path(value: str) -> str:
    _plain(value, "guest")
    if not value.startswith("/"):
        raise ValueError(f"the guest path {value!r} must be absolute (start with '/')")
    parts = value.split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"the guest path {value!r} may not hold '.' or '..'")
    path = str(PurePosixPath("/" + value.lstrip("/")))  # POSIX keeps a leading '//': the kernel does not
    for tree in GUEST_TREES:
        if _within(path, tree) or _within(tree, path):
            raise ValueError(f"a mount on {path} would hide {tree}, which the guest needs: choose another path")
    if path in GUEST_SYSTEM_DIRS:
        raise ValueError(f"a mount on {path} would hide the guest's {path}: mount below it, or elsewhere")
    return path


def check_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """A sandbox's mounts together: not too many, no guest path twice or inside another."""
    if len(mounts) > MAX_MOUNTS:
        raise ValueError(f"{len(mounts)} mounts asked for; a sandbox has room for {MAX_MOUNTS}")
    for i, a in enumerate(mounts):
        for b in mounts[i + 1 :]:
            if (a.writable or b.writable) and (_within(a.host, b.host) or _within(b.host, a.host)):
                # else the guest could swap the inner folder for a link through the outer one
                raise ValueError(f"the host folders {a.host} and {b.host} nest, and one is writable: mount one of them")
            if a.guest == b.guest:
                raise ValueError(f"two mounts on the guest path {a.guest}: give each its own")
            if _within(a.guest, b.guest) or _within(b.guest, a.guest):
                raise ValueError(f"the guest paths {a.guest} and {b.guest} nest: mounts may not lie inside each other")
    return list(mounts)


def resolved(mounts: Sequence[Mount]) -> list[Mount]:
    """The mounts with their folders' links resolved, once, when a sandbox is made:
    its later starts serve these folders, not wherever a link then points."""
    out = []
    for mount in mounts:
        real = os.path.realpath(mount.host)
        _plain(real, "host")
        out.append(mount.model_copy(update={"host": real}))
    return check_mounts(out)


def check_host_folders(mounts: Sequence[Mount], data_dir: Path) -> None:
    """At create and at every start: each folder exists, is a folder, is not
    SmolVM's own (which holds every sandbox's disks), and, as root, can be served
    without root's power (``qemu_identity``)."""
    data = os.path.realpath(data_dir)
    for mount in mounts:
        try:
            st = os.stat(mount.host)
        except FileNotFoundError:
            raise ValidationError(f"the folder to mount, {mount.host}, does not exist: create it first") from None
        except OSError as exc:
            raise ValidationError(f"cannot use {mount.host} as a mount: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ValidationError(
                f"{mount.host} is not a folder: a mount shares a folder; copy a file in with upload_file"
            )
        real = os.path.realpath(mount.host)
        for own in (data, *(os.path.realpath(p) for p in (runtime_base(), jail.LOCK_DIR))):
            if _within(real, own) or _within(own, real):
                raise ValidationError(
                    f"{mount.host} holds or is inside SmolVM's own {own} (every sandbox's disks, "
                    "sockets or locks): mount another folder"
                )
    if mounts and jail.wanted():
        reason = jail.blocker()
        if reason is not None:
            raise ValidationError(
                f"mounts need QEMU jailed when SmolVM runs as root, and it cannot be here ({reason}): "
                "run SmolVM as a normal user, or without mounts"
            )
        qemu_identity(mounts)


def qemu_identity(mounts: Sequence[Mount]) -> tuple[int, int] | None:
    """Who a jailed QEMU runs as to serve these folders: their owner (uid, gid), or
    None for the jail's own uid (no mounts, or only read-only ones root owns)."""
    owners: dict[int, tuple[int, int, str]] = {}
    for mount in mounts:
        try:
            st = os.stat(mount.host)
        except OSError as exc:
            raise HostError(f"cannot use {mount.host} as a mount: {exc.strerror}") from None
        if st.st_uid == 0:
            if mount.writable:
                raise HostError(
                    f"{mount.host} is root's: serving it writable would give QEMU root's power over the "
                    "host. Give the folder to an unprivileged user (chown -R USER), mount it read-only, "
                    "or run SmolVM as that user"
                )
            if st.st_mode & 0o005 != 0o005:
                raise HostError(
                    f"{mount.host} is root's and closed to others: QEMU, jailed with a uid of its own, "
                    "could not read it. Open it to others (chmod o+rx) or give it to an unprivileged user"
                )
            continue
        try:  # the owner's own group: the folder's may be root's, or a powerful one (disk, docker)
            gid = pwd.getpwuid(st.st_uid).pw_gid
        except KeyError:
            raise HostError(
                f"{mount.host} belongs to uid {st.st_uid}, which has no account: give it to a user"
            ) from None
        if gid == 0:
            raise HostError(f"{mount.host} belongs to a user whose group is root's: QEMU would serve it with gid 0")
        owners.setdefault(st.st_uid, (st.st_uid, gid, mount.host))
    if len(owners) > 1:
        names = ", ".join(f"{host} (uid {uid})" for uid, _, host in owners.values())
        raise HostError(f"mounted folders of different owners: {names}; QEMU serves them as one user")
    if not owners:
        return None
    uid, gid, _ = next(iter(owners.values()))
    return uid, gid


def open_folder(mount: Mount) -> int:
    """The folder, opened for QEMU to inherit and serve (as ``/proc/self/fd/N``): what it
    serves is then the directory checked here, whatever is renamed or linked meanwhile.
    Refused if the path now leads anywhere but where it did when the sandbox was made."""
    try:
        fd = os.open(mount.host, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open the folder to mount, {mount.host}: {exc.strerror}") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        opened = None
    if opened != mount.host:
        os.close(fd)
        raise HostError(
            f"{mount.host} now leads to {opened}: a link was put in its path since the sandbox was made; "
            "put the folder back, or make a new sandbox"
        )
    return fd


def qemu_args(mounts: Sequence[Mount], fds: Sequence[int] | None = None) -> list[str]:
    """The shares, after every other device so the others keep their transports
    (a saved template's devices are where it left them). ``fds``: the folders, opened
    by ``open_folder`` and inherited, served in place of their paths."""
    from .backends.qemu import opt

    args = []
    for i, mount in enumerate(mounts):
        ro = "off" if mount.writable else "on"
        path = f"/proc/self/fd/{fds[i]}" if fds is not None else mount.host
        fsdev = f"local,id=share{i},path={opt(path)},security_model=none,readonly={ro},multidevs=remap"
        args += ["-fsdev", fsdev]
        args += ["-device", f"virtio-9p-device,fsdev=share{i},mount_tag={TAG_PREFIX}{i}"]
    return args


def guest_request(mounts: Sequence[Mount]) -> list[dict[str, Any]]:
    """What the agent's ``mount`` op is told."""
    return [{"tag": f"{TAG_PREFIX}{i}", "path": m.guest, "writable": m.writable} for i, m in enumerate(mounts)]
