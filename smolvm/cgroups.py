"""A cap on each sandbox's CPU: its QEMU in a cgroup of its own, ``smolvm/<pid>``.

The cap is a CFS quota: ``cores`` times a 100 ms period of CPU time, for all of
QEMU's threads together (its vCPUs, its main loop, its I/O threads). By default
a sandbox may use as many cores as it has vCPUs. Setting one needs the right to
make cgroups: root, on cgroup v1 (the ``cpu`` controller's hierarchy) or v2
(the ``cpu`` controller enabled for ``smolvm/``). A normal user's cgroups are
not touched: a v1 host delegates nothing to it, and on v2 the delegated part of
the tree is systemd's to hand out (``systemd-run --user --scope``), which SmolVM
does not do yet; ``smolvm doctor`` says which case a host is.

A group is removed when its QEMU has stopped; a group whose QEMU ended some
other way (killed, or the machine powered off) is removed by the next launch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("smolvm")
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the least CFS takes
GROUP = "smolvm"
YOUNG = 10.0  # seconds a group may be empty before a sweep takes it (another launch may be filling it)
MOUNTS = Path("/proc/self/mounts")


@dataclass(frozen=True)
class Tree:
    """Where SmolVM's groups go, in a hierarchy with the cpu controller."""

    root: Path
    version: int  # 1 or 2

    def place(self, pid: int, cores: float) -> Path:
        """Put process ``pid`` (all its threads) in a group of its own, capped at ``cores``."""
        group = self.root / str(pid)
        group.mkdir(exist_ok=True)
        quota = max(MIN_QUOTA_US, round(cores * PERIOD_US))
        try:
            if self.version == 2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
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


def tree(base: Path = Path("/sys/fs/cgroup"), mounts: Path = MOUNTS) -> Tree | str:
    """The tree caps go in here, made if need be, or why there is none."""
    if (base / "cgroup.controllers").is_file():
        if os.geteuid() != 0:
            return (
                "cgroup v2, run as a normal user: SmolVM does not ask systemd for a delegated cgroup yet; "
                "as root it caps each sandbox's CPU"
            )
        try:
            if "cpu" not in (base / "cgroup.controllers").read_text().split():
                return "cgroup v2 without the cpu controller"
            root = base / GROUP
            for level in (base, root):
                level.mkdir(exist_ok=True)
                (level / "cgroup.subtree_control").write_text("+cpu")
        except OSError as exc:
            return f"cgroup v2, but the cpu controller could not be enabled for {base / GROUP} ({exc.strerror})"
        return Tree(root, 2)
    hierarchy = _v1_cpu(mounts)
    if hierarchy is None:
        return "no cgroup hierarchy with the cpu controller is mounted"
    if os.geteuid() != 0:
        return "cgroup v1, where a normal user is given no cgroup of its own; as root SmolVM caps each sandbox's CPU"
    root = hierarchy / GROUP
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cgroup v1, but {root} could not be made ({exc.strerror})"
    return Tree(root, 1)


def _v1_cpu(mounts: Path) -> Path | None:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


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
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not this process's child: its parent reaps it
        time.sleep(0.01)
