"""Lifetimes: ``timeout=`` and ``idle_timeout=`` end a sandbox with no Python process of ours left."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import needs_image, qemu_pid_gone, run_python

from smolvm import SmolVM
from smolvm.exceptions import ValidationError, VMNotFoundError
from smolvm.paths import sandbox_dir
from smolvm.watchdog import Lifetime, check_seconds, in_use, read, write


def watchdogs(directory: Path) -> list[int]:
    """Live (not zombie) watchdog processes of this sandbox directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a.endswith(b"watchdog.py") for a in args) and str(directory).encode() in args:
            found.append(int(proc.name))
    return found


def gone(vm_id: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            SmolVM.from_id(vm_id)
        except VMNotFoundError:
            return True
        time.sleep(0.25)
    return False


def test_the_earlier_of_deadline_and_idle_is_due() -> None:
    assert Lifetime().due(100.0) is None
    assert Lifetime(deadline=500.0).due(100.0) == 500.0
    assert Lifetime(idle=60.0).due(100.0) == 160.0
    assert Lifetime(deadline=500.0, idle=60.0).due(100.0) == 160.0
    assert Lifetime(deadline=120.0, idle=60.0).due(100.0) == 120.0


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "60", 10**9])
def test_bad_timeouts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="seconds"):
        check_seconds(bad, "timeout")
    with pytest.raises(ValidationError):
        SmolVM(timeout=bad)  # type: ignore[arg-type]


def test_a_torn_or_odd_lifetime_file_means_none(tmp_path: Path) -> None:
    write(tmp_path, Lifetime(123.0, 4.0))
    assert read(tmp_path) == Lifetime(123.0, 4.0)
    for text in ("{", "[]", json.dumps({"deadline": "soon"}), json.dumps({"idle": float("inf")}), "x" * 10_000):
        (tmp_path / "lifetime.json").write_text(text)
        assert read(tmp_path) == Lifetime()
    with in_use(tmp_path / "gone"):  # a directory deleted under a call is no error
        pass


@needs_image
def test_a_timeout_ends_the_sandbox_after_its_creator_has_exited() -> None:
    done = run_python(
        "from smolvm import SmolVM\nvm = SmolVM(vm_id='life-timeout', timeout=6).start()\nprint(vm.info()['pid'])\n"
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[-1])
    home = sandbox_dir("life-timeout")
    assert len(watchdogs(home)) == 1
    assert not gone("life-timeout", 3), "deleted well before its timeout"
    assert gone("life-timeout", 12), "still there long after its timeout"
    assert qemu_pid_gone(pid, "life-timeout")
    time.sleep(0.5)
    assert watchdogs(home) == []


@needs_image
def test_idle_is_counted_from_the_end_of_the_last_call_and_set_timeout_moves_the_deadline() -> None:
    vm = SmolVM(vm_id="life-idle", idle_timeout=4, timeout=600).start()
    try:
        ran = vm.run("sleep 7; echo survived", timeout=30)  # busy past the idle timeout
        assert ran.stdout == "survived\n"
        assert vm.run("echo again").stdout == "again\n"
        expires = vm.expires_at()
        assert expires is not None and expires - time.time() < 5
        vm.set_timeout(1)
        assert gone("life-idle", 6)
    finally:
        vm.delete()

    other = SmolVM(vm_id="life-extend", timeout=3).start()
    try:
        other.set_timeout(120)
        time.sleep(5)
        assert other.run("echo alive").stdout == "alive\n"
        other.set_timeout(None)
        assert other.expires_at() is None
        with pytest.raises(ValidationError, match="seconds"):
            other.set_timeout(-5)
    finally:
        other.delete()
    time.sleep(2.5)  # a watchdog notices its sandbox gone within a poll
    assert watchdogs(sandbox_dir("life-extend")) == []
