"""A cap on each sandbox's CPU: its QEMU in a cgroup of its own, ``smolvm/<pid>``.

The cap is a CFS quota: ``cores`` times a 100 ms period of CPU time, for all of
QEMU's threads together (its vCPUs, its main loop, its I/O threads). By default
a sandbox may use as many cores as it has vCPUs. The group is made under this
process's own group of the ``cpu`` hierarchy, so what limits that (a systemd
unit's CPUQuota) limits QEMU too, and only the cpu hierarchy is changed: its
memory, pids and other groups stay the unit's. That takes root and cgroup v1.
On cgroup v2 every controller is one tree, and a group of its own would take
QEMU out of its unit's memory and task limits; a systemd scope per sandbox
would not, and is not done yet. A normal user's cgroups are not touched: v1
delegates nothing to it. ``smolvm doctor`` says which case a host is.

A group is removed when its QEMU has stopped; a group whose QEMU ended some
other way (killed, or the machine powered off) is removed by the next launch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import procfs

log = logging.getLogger("smolvm")
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the least CFS takes
GROUP = "smolvm"
YOUNG = 10.0  # seconds a group may be empty before a sweep takes it (another launch may be filling it)
MOUNTS = Path("/proc/self/mounts")
OWN = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Tree:
    """Where SmolVM's groups go, in a hierarchy with the cpu controller."""

    root: Path

    def place(self, pid: int, cores: float) -> Path:
        """Put process ``pid`` (all its threads) in a group of its own, capped at ``cores``."""
        group = self.root / str(pid)
        group.mkdir(exist_ok=True)
        quota = max(MIN_QUOTA_US, round(cores * PERIOD_US))
        try:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            release(self, pid)
            raise
        return group

    def sweep(self) -> None:
        """Remove every group whose processes have all ended (the kernel refuses the rest)."""
        try:
            groups = [p for p in self.root.iterdir() if p.name.isdigit()]
        except OSError:
            return
        for group in groups:
            try:
                if time.time() - group.stat().st_mtime > YOUNG:
                    group.rmdir()
            except OSError:
                pass  # its QEMU still runs


def tree(mounts: Path = MOUNTS, own: Path = OWN, make: bool = True) -> Tree | str:
    """The tree caps go in here, made if ``make`` and need be, or why there is none.
    Under this process's own group of the cpu hierarchy, so limits set above it
    (a systemd unit's CPUQuota) still hold."""
    try:
        table = [line.split() for line in mounts.read_text().splitlines()]
    except OSError:
        table = []
    hierarchy = next((Path(f[1]) for f in table if len(f) >= 4 and f[2] == "cgroup" and "cpu" in f[3].split(",")), None)
    if hierarchy is None:
        if any(f[2:3] == ["cgroup2"] for f in table):
            return (
                "cgroup v2, where QEMU would have to leave its systemd unit (and the unit's memory and task "
                "limits) for a group of its own; a systemd scope per sandbox would keep them, not done yet"
            )
        return "no cgroup hierarchy with the cpu controller is mounted"
    if os.geteuid() != 0:
        return "cgroup v1, where a normal user is given no cgroup of its own; as root SmolVM caps each sandbox's CPU"
    root = hierarchy / _own_path(own).lstrip("/") / GROUP
    if not make:
        return Tree(root) if os.access(root.parent, os.W_OK) else f"{root.parent} cannot be written"
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cgroup v1, but {root} could not be made ({exc.strerror})"
    return Tree(root)


def _own_path(own: Path) -> str:
    """This process's group in the cpu hierarchy (v1: a line "N:cpu,cpuacct:/path")."""
    try:
        for line in own.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def release(cells: Tree, pid: int, wait: float = 1.0) -> None:
    """Remove the group of a QEMU that has ended. Its last moments of exit, and as a
    zombie until reaped, still count as the group's: a child of this process is
    reaped here, and the group is given ``wait`` seconds to empty."""
    group = cells.root / str(pid)
    deadline = time.monotonic() + wait
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # a later sweep takes it
        _reap_zombie(pid)
        time.sleep(0.01)


def _reap_zombie(pid: int) -> None:
    """Reap ``pid`` if it is a zombie child of this process (an ended QEMU it launched)."""
    try:
        fields = procfs.stat(pid)
        if fields[0] == b"Z" and int(fields[1]) == os.getpid():
            os.waitpid(pid, os.WNOHANG)
    except (OSError, ValueError, IndexError):
        pass  # gone, or not ours
