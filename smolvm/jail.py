"""The jail a sandbox's QEMU runs in when SmolVM runs as root.

QEMU opens everything it needs (kernel, disks, sockets, a saved state) as
root, then, just before the machine runs, chroots into an empty directory of
the sandbox's own and drops to a uid and gid of the sandbox's own, with no
capabilities left (``-chroot`` and ``-runas``). A device-model escape then
holds an unprivileged identity that owns no file on the host, in a root where
nothing is, under seccomp filters that forbid starting processes and changing
ids to any but the jail's (see backends/setid_filter.py).

One uid per sandbox rather than one service user: two sandboxes' QEMUs are
then different users to the kernel, so one cannot signal, ptrace or read the
memory of the other. The uids come from a range no distribution allots
(above the 1879048191 that systemd gives containers, below the 2^31 that some
tools mishandle); a uid is taken only if no account, group, subordinate
range or running process already uses it.

Run as a normal user, QEMU is not jailed (it cannot chroot or change uid):
it runs as that user, which a sandbox's escape would become, under the same
seccomp filter, which then also denies changing ids.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import locks
from .exceptions import HostError

UID_BASE = 1_900_000_000
UID_COUNT = 65536
TRIES = 256  # candidates looked at before giving up
LOCK_DIR = Path("/run/smolvm-jail")  # one lock per uid, held by the QEMU that runs as it: host-wide, as uids are


@dataclass(frozen=True)
class Jail:
    uid: int
    gid: int
    root: Path  # empty, root-owned, not writable by the jailed QEMU
    lock: int | None  # a read-only descriptor of the uid's lock, for QEMU to inherit
    own_uid: bool = True  # False: the uid is a mount's owner's (smolvm/mounts.py), not reserved
    chroot: bool = True  # False for a QEMU serving mounts (see smolvm/mounts.py)

    @property
    def inherited(self) -> list[int]:
        return [self.lock] if self.lock is not None else []

    def args(self, qemu_version: tuple[int, int] = (7, 2)) -> list[str]:
        """QEMU's options for it: ``-runas`` and ``-chroot`` until 9.1 replaced them with ``-run-with``."""
        if qemu_version >= (9, 1):
            return ["-run-with", (f"chroot={self.root}," if self.chroot else "") + f"user={self.uid}:{self.gid}"]
        return ["-runas", f"{self.uid}:{self.gid}", *(["-chroot", str(self.root)] if self.chroot else [])]


def wanted() -> bool:
    """Whether QEMU is to be jailed: whenever SmolVM runs as root."""
    return os.geteuid() == 0


CAPS_NEEDED = {6: "CAP_SETGID", 7: "CAP_SETUID", 18: "CAP_SYS_CHROOT"}


def _maps(path: Path, first: int, count: int) -> bool:
    """Whether a uid_map or gid_map covers ids first..first+count-1 of this namespace."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return True  # no user namespaces here: every id is the host's
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            inside, count_here = int(parts[0]), int(parts[2])
            if inside <= first and first + count <= inside + count_here:
                return True
    return False


@functools.lru_cache(maxsize=1)
def blocker(proc_self: Path = Path("/proc/self")) -> str | None:
    """Why root cannot jail QEMU here, or None: root in a user namespace whose map lacks
    the jail's ids (rootless containers), or without the capabilities to change
    ids and root (a container that dropped them)."""
    try:
        status = dict(line.split(":", 1) for line in (proc_self / "status").read_text().splitlines() if ":" in line)
        # What QEMU, exec'd by root, will hold: root's bounding set, and what this process holds.
        caps = int(status["CapEff"].strip(), 16) & int(status["CapBnd"].strip(), 16)
    except (OSError, KeyError, ValueError):
        return "cannot read this process's capabilities"
    missing = [name for bit, name in CAPS_NEEDED.items() if not caps & (1 << bit)]
    if missing:
        return f"root here lacks {', '.join(missing)} (a container that dropped them)"
    for kind in ("uid", "gid"):
        if not _maps(proc_self / f"{kind}_map", UID_BASE, UID_COUNT):
            return f"this user namespace maps no {kind}s {UID_BASE}-{UID_BASE + UID_COUNT - 1} (a rootless container)"
    try:
        if (proc_self / "setgroups").read_text().strip() == "deny":
            return "this user namespace denies setgroups"
    except OSError:
        pass
    return None


def _rows(path: Path) -> list[list[str]]:
    """The colon-separated fields of each line of passwd, group, subuid and the like."""
    try:
        return [line.split(":") for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return []


def _ids_in(path: Path, field: int) -> set[int]:
    """The numeric ``field`` of every line (passwd: 2 is the uid, 3 the gid)."""
    return {int(row[field]) for row in _rows(path) if len(row) > field and row[field].isdigit()}


def _ranges_in(path: Path) -> list[range]:
    """Subordinate id ranges (/etc/subuid, /etc/subgid: name:start:count)."""
    return [
        range(int(row[1]), int(row[1]) + int(row[2]))
        for row in _rows(path)
        if len(row) == 3 and row[1].isdigit() and row[2].isdigit()
    ]


def process_ids(proc: Path = Path("/proc")) -> set[int]:
    """Every real, effective, saved and filesystem uid and gid a running process holds.
    Read from status, not the directory's owner: a QEMU that changed uid is not
    dumpable, and its /proc directory then belongs to root."""
    ids: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fd = os.open(os.path.join(entry.path, "status"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = os.read(fd, 4096)  # the ids are in its first lines
            finally:
                os.close(fd)
        except OSError:
            continue  # gone meanwhile
        ids |= _status_ids(status, (b"Uid:", b"Gid:"))
    return ids


def taken(etc: Path = Path("/etc"), proc: Path = Path("/proc")) -> tuple[set[int], list[range]]:
    """Ids this host already uses: accounts, groups, running processes; and the
    subordinate ranges handed to users for their containers."""
    ids = _ids_in(etc / "passwd", 2) | _ids_in(etc / "passwd", 3) | _ids_in(etc / "group", 2) | process_ids(proc)
    return ids, _ranges_in(etc / "subuid") + _ranges_in(etc / "subgid")


def candidates(key: str) -> Iterator[int]:
    """Ids to try for one sandbox, first the one its key hashes to, so that
    sandboxes started at once seldom want the same one."""
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % UID_COUNT
    for i in range(TRIES):
        yield UID_BASE + (start + i) % UID_COUNT


def free(uid: int, ids: set[int], ranges: Iterable[range]) -> bool:
    return uid not in ids and not any(uid in r for r in ranges)


UID_FILE = "qemu.uid"  # in the sandbox's directory: the uid its running QEMU took


def record(home: Path, cell: Jail | None) -> None:
    """Note (or forget) the uid this sandbox's QEMU runs as, for ``recorded``."""
    path = home / UID_FILE
    if cell is None or not cell.own_uid:  # an owner's uid has other processes: never matched by it
        path.unlink(missing_ok=True)
    else:
        path.write_text(str(cell.uid))


def recorded(home: Path) -> int | None:
    try:
        text = (home / UID_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_uids(pid: int) -> set[int]:
    """A process's real, effective, saved and filesystem uids (readable for any process,
    unlike its root, which needs ptrace rights over a non-dumpable one)."""
    return _status_ids(Path(f"/proc/{pid}/status").read_bytes(), (b"Uid:",))


def _status_ids(status: bytes, fields: tuple[bytes, ...]) -> set[int]:
    """The ids on the ``fields`` lines (b"Uid:", b"Gid:") of a /proc status file."""
    ids: set[int] = set()
    for line in status.split(b"\n"):
        if line.startswith(fields):
            ids.update(int(v) for v in line.split()[1:] if v.isdigit())
    return ids


def make_root(home: Path) -> Path:
    """The sandbox's jail root: an empty directory QEMU may enter but not write, so it
    stays empty (a killed QEMU leaves nothing in it). Anything else in its place goes."""
    root = home / "jail"
    try:
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            root.unlink()
        root.mkdir(mode=0o555, exist_ok=True)
        os.chown(root, 0, 0)
        root.chmod(0o555)
        if any(root.iterdir()):  # nobody could have put it there: fail safe
            raise HostError(f"QEMU's jail {root} is not empty: delete the sandbox, or empty it by hand")
    except OSError as exc:
        raise HostError(
            f"cannot make the jail for QEMU in {home} ({exc.strerror}): a data directory on a "
            "filesystem that root cannot write (NFS with root squash, a read-only mount) cannot "
            "hold sandboxes run as root; set SMOLVM_DATA_DIR to a local directory"
        ) from None
    return root


@contextmanager
def taken_for(
    home: Path, key: str, lock_dir: Path = LOCK_DIR, owner: tuple[int, int] | None = None, chroot: bool = True
) -> Iterator[Jail]:
    """A jail for one QEMU start: a uid nobody uses, and the lock that reserves it.
    QEMU inherits the lock (``Jail.lock``) and holds it for its life, so other
    SmolVM starts pass the uid over until that QEMU is gone, however it ends.
    The lock files stay, one per uid ever used, in /run (gone at reboot):
    removing one a QEMU holds would let a second start take the same uid.
    ``owner``: run as this (uid, gid) instead, the owner of the folders it serves;
    ``chroot``: whether to enter the empty root."""
    root = make_root(home)
    if owner is not None:
        yield Jail(owner[0], owner[1], root, None, own_uid=False, chroot=chroot)
        return
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ids, ranges = taken()
    except OSError as exc:
        raise HostError(f"cannot choose a uid for QEMU's jail ({exc}): {lock_dir} must be root's to write") from None
    for uid in candidates(key):
        if not free(uid, ids, ranges):
            continue
        try:
            # Read-only: QEMU holds it for life, and must not be able to write through it.
            fd = locks.try_lock(lock_dir / f"{uid}.lock", read_only=True)
        except OSError as exc:
            raise HostError(f"cannot lock a uid for QEMU's jail in {lock_dir}: {exc.strerror}") from None
        if fd is None:
            continue  # a QEMU runs as it, or another start is taking it
        try:
            yield Jail(uid, uid, root, fd, chroot=chroot)
            return
        finally:
            locks.unlock(fd)  # this process's copy; QEMU's holds on
    raise HostError(
        f"no free uid for QEMU's jail among {TRIES} tried in {UID_BASE}-{UID_BASE + UID_COUNT - 1}: "
        "accounts, subordinate ranges or processes use them; free some, or run SmolVM as a normal user"
    )
