"""The CPU cap: each sandbox's QEMU in a cgroup of its own (smolvm/cgroups.py).

Boots in this module: two sandboxes, one of them capped below a core and kept busy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import needs_image

from smolvm import SmolVM, cgroups
from smolvm.exceptions import HostError, ValidationError

here = cgroups.tree(make=False)
can_cap = pytest.mark.skipif(isinstance(here, str), reason=f"no CPU caps on this host: {here}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"QEMU {pid} is in no cpu cgroup")


@needs_image
@can_cap
def test_a_busy_sandbox_gets_no_more_cpu_than_its_cap_and_its_group_goes_with_it() -> None:
    assert isinstance(here, cgroups.Tree)
    with SmolVM(cpu_limit=0.3) as vm:
        pid = vm.info()["pid"]
        assert vm.info()["cpu_limit"] == 0.3
        assert group_of(pid).endswith(f"/{cgroups.GROUP}/{pid}")
        assert vm.run("(timeout 6 sh -c 'while :; do :; done' >/dev/null 2>&1 &); echo started").output == "started"
        time.sleep(0.5)
        used, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(3)
        cores = (cpu_seconds(pid) - used) / (time.monotonic() - t0)
        assert 0.15 < cores < 0.36, cores  # busy, and held to its 0.3 cores
        assert vm.run("echo still answers").output == "still answers"
    assert not (here.root / str(pid)).exists()


@needs_image
@can_cap
def test_by_default_a_sandbox_may_use_as_many_cores_as_it_has_vcpus(vm: SmolVM) -> None:
    assert isinstance(here, cgroups.Tree)
    pid = vm.info()["pid"]
    group = here.root / str(pid)
    assert int((group / "cpu.cfs_quota_us").read_text()) == vm.config.vcpus * cgroups.PERIOD_US
    assert str(pid) in (group / "cgroup.procs").read_text().split()


@pytest.mark.parametrize("bad", [0, 0.01, -1, 65, float("nan"), "many"])
def test_a_cap_that_is_no_share_of_a_host_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="cpu_limit"):
        SmolVM(cpu_limit=bad)  # type: ignore[arg-type]


# -- the trees, on stand-ins (pure logic: where groups go, what is written) --
def test_a_v1_host_caps_in_the_cpu_hierarchy_under_this_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts, own = tmp_path / "mounts", tmp_path / "cgroup"
    hierarchy = tmp_path / "cpu,cpuacct"
    (hierarchy / "system.slice" / "ci.service").mkdir(parents=True)
    mounts.write_text(
        "proc /proc proc rw 0 0\n"
        "cgroup /x/memory cgroup rw,relatime,memory 0 0\n"
        f"cgroup {hierarchy} cgroup rw,relatime,cpu,cpuacct 0 0\n"
    )
    own.write_text("4:memory:/system.slice/ci.service\n2:cpu,cpuacct:/system.slice/ci.service\n0::/\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    expected = cgroups.Tree(hierarchy / "system.slice" / "ci.service" / "smolvm")
    assert cgroups.tree(mounts, own, make=False) == expected and not expected.root.exists()  # doctor: nothing made
    assert cgroups.tree(mounts, own) == expected and expected.root.is_dir()
    group = expected.place(7, 0.001)  # less than CFS takes: its least
    assert (group / "cpu.cfs_quota_us").read_text() == str(cgroups.MIN_QUOTA_US)
    assert (group / "cpu.cfs_period_us").read_text() == "100000"
    assert (group / "cgroup.procs").read_text() == "7"
    assert (expected.place(8, 1.5) / "cpu.cfs_quota_us").read_text() == "150000"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "normal user" in str(cgroups.tree(mounts, own))


def test_a_v2_host_or_none_says_why_there_is_no_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = tmp_path / "mounts"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert "systemd scope" in str(cgroups.tree(mounts, tmp_path / "cgroup"))
    mounts.write_text("cgroup /x/memory cgroup rw,memory 0 0\n")
    assert "no cgroup hierarchy" in str(cgroups.tree(mounts, tmp_path / "cgroup"))


def test_a_sweep_takes_empty_groups_once_they_are_no_longer_new(tmp_path: Path) -> None:
    tree = cgroups.Tree(tmp_path)
    old, new, busy = tmp_path / "100", tmp_path / "200", tmp_path / "300"
    for group in (old, new, busy):
        group.mkdir()
    (busy / "tasks").write_text("")  # not empty: as the kernel refuses a group with processes
    (tmp_path / "cpu.shares").write_text("1024")  # the hierarchy's own files are not groups
    long_ago = time.time() - cgroups.YOUNG - 5
    for group in (old, busy):
        os.utime(group, (long_ago, long_ago))
    tree.sweep()
    assert not old.exists() and new.exists() and busy.exists()
    cgroups.release(
        tree, 300, wait=0.05
    )  # (no process 300 is this test's child to reap)  # still busy: left for a later sweep, no error
    assert busy.exists()
    cgroups.release(tree, 200)
    assert not new.exists()
    cgroups.release(tree, 999999999)  # never made: nothing to do


@needs_image
def test_a_cap_asked_for_where_none_can_be_set_is_refused_before_qemu_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cgroups, "tree", lambda **_: "cgroup v1, where a normal user is given no cgroup of its own")
    vm = SmolVM(cpu_limit=0.5)
    try:
        with pytest.raises(HostError, match="cannot cap sandbox .* at 0.5 cores on this host: cgroup v1"):
            vm.start()
        assert vm.status.value != "running"
    finally:
        vm.delete()
