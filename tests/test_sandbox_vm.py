"""The SmolVM facade. Argument checks need no VM; everything marked ``vm`` boots real QEMU sandboxes.

Boots in this module: the shared ``vm`` fixture (1), a second sandbox for the
context-manager / copy-on-write test (1), the stop/start lifecycle (2), the
killed-hypervisor test (1), and two product-bug tests (3).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON, needs_image, qemu_pid_gone, run_python

from smolvm import CommandResult, SmolVM, SmolVMError, VMConfig, VMState
from smolvm.exceptions import (
    GuestFileNotFoundError,
    OperationTimeoutError,
    OutputLimitError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from smolvm.paths import runtime_dir, sandbox_dir
from smolvm.sandbox import check_env, check_guest_path, check_id
from smolvm.state import SandboxRecord, StateStore

BAD_IDS = ["../../x", "a;b", "", "UPPER", "Abc", "-x", "a" * 49, "a b", "a/b", "x\0y"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def record_ids() -> set[str]:
    return {r.id for r in StateStore().all()}


# == argument checks: no VM ===================================================


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_id_on_create(bad: str) -> None:
    before = record_ids()
    with pytest.raises(ValidationError):
        SmolVM(vm_id=bad)
    assert record_ids() == before


@pytest.mark.parametrize("bad", [*BAD_IDS, None, 42])
def test_invalid_id_on_from_id(bad: object) -> None:
    with pytest.raises(ValidationError):
        SmolVM.from_id(bad)  # type: ignore[arg-type]


def test_check_id_accepts_good_ids() -> None:
    assert check_id("vm-1") == "vm-1"
    assert check_id("a" * 48) == "a" * 48


def test_from_id_unknown() -> None:
    with pytest.raises(VMNotFoundError, match="nosuch"):
        SmolVM.from_id("nosuch")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": 1},
        {"memory": 127},
        {"memory": 10**6},
        {"vcpus": 0},
        {"vcpus": (os.cpu_count() or 1) + 1},
        {"vcpus": 1000},
        {"disk_size": 10},
    ],
)
def test_out_of_range_config(kwargs: dict[str, int]) -> None:
    before = record_ids()
    with pytest.raises(ValidationError) as info:
        SmolVM(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, SmolVMError)
    assert next(iter(kwargs)) in str(info.value)
    assert record_ids() == before


@pytest.mark.parametrize(
    "env",
    [{"1BAD": "x"}, {"A-B": "x"}, {"": "x"}, {"A B": "x"}, {"A=B": "x"}, {"PATH;rm": "x"}, {"A": "nul\0"}, {"A": 1}],
)
def test_check_env_rejects(env: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        check_env(env)  # type: ignore[arg-type]


def test_check_env_accepts() -> None:
    env = {"A": "", "_x1": "spaces and 'quotes' and $dollar", "LONG_NAME_2": "ü"}
    assert check_env(env) == env


def test_check_env_rejects_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        check_env({"A\n": "x"})


@pytest.mark.parametrize("path", ["relative/path", "", "/a\0b", "/" + "a" * 5000, None])
def test_check_guest_path_rejects(path: object) -> None:
    with pytest.raises(ValidationError):
        check_guest_path(path)


# == a created, never-started sandbox: needs the image, boots nothing ==========


@needs_image
def test_created_sandbox_without_boot(tmp_path: Path) -> None:
    box = SmolVM(memory=256)
    try:
        assert box.vm_id.startswith("vm-")
        assert box.status is VMState.CREATED
        info = box.info()
        assert info["state"] == "created" and info["pid"] is None and info["memory"] == 256
        assert (sandbox_dir(box.vm_id) / "disk.qcow2").is_file()
        assert box.vm_id in [r.id for r in SmolVM.list()]
        with pytest.raises(ValidationError, match="not running"):
            box.run("true")
        with pytest.raises(ValidationError):
            box.pause()
        with pytest.raises(ValidationError):
            box.resume()
        box.stop()  # nothing to stop: a no-op
        assert box.status is VMState.CREATED
        assert isinstance(box.logs(), str)
    finally:
        box.delete()
    assert box.vm_id not in record_ids()
    assert not sandbox_dir(box.vm_id).exists()
    box.delete()  # twice is harmless


@needs_image
def test_disk_smaller_than_image_rejected() -> None:
    before = record_ids()
    with pytest.raises(ValidationError, match="disk_size"):
        SmolVM(disk_size=1024)
    assert record_ids() == before


@needs_image
def test_run_argument_checks_happen_before_the_agent() -> None:
    box = SmolVM(memory=256)
    try:
        for cmd in ("", "   ", None):
            with pytest.raises(ValidationError):
                box.run(cmd)  # type: ignore[arg-type]
        for timeout in (0, -1, "5"):
            with pytest.raises(ValidationError):
                box.run("true", timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            box.run("true", cwd="relative")
        with pytest.raises(ValidationError):
            box.upload_file("/nonexistent/file", "/tmp/x")
    finally:
        box.delete()


@needs_image
def test_failed_start_leaves_sandbox_created() -> None:
    box = SmolVM(memory=256, fast_start=False)  # its broken disk, not one a first start remakes
    try:
        (sandbox_dir(box.vm_id) / "disk.qcow2").write_bytes(b"not a qcow2 image" * 100)
        with pytest.raises(SmolVMError):
            box.start()
        assert box.status is VMState.CREATED
        assert box.info()["pid"] is None
    finally:
        box.delete()
    assert box.vm_id not in record_ids()


@needs_image
def test_with_block_deletes_when_start_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_ACCEL", "bogus")
    before = record_ids()
    with pytest.raises(ValidationError, match="SMOLVM_ACCEL"), SmolVM(memory=256):
        pytest.fail("the with-body must not run when start fails")
    assert record_ids() == before


def test_list_tolerates_sandbox_deleted_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore()
    store.add(VMConfig(vm_id="racy-a"), "/nonexistent")
    store.add(VMConfig(vm_id="racy-b"), "/nonexistent")
    real_all = StateStore.all

    def all_then_another_process_deletes(self: StateStore) -> list[SandboxRecord]:
        records = real_all(self)
        StateStore().remove("racy-a")  # another process's delete lands between the two reads
        return records

    monkeypatch.setattr(StateStore, "all", all_then_another_process_deletes)
    try:
        assert "racy-b" in [r.id for r in SmolVM.list()]
    finally:
        store.remove("racy-a")
        store.remove("racy-b")


# == one shared running sandbox ==============================================


@pytest.mark.vm
def test_run_result(vm: SmolVM) -> None:
    assert vm.status is VMState.RUNNING
    assert vm.run("echo hello; exit 3") == CommandResult(exit_code=3, stdout="hello\n", stderr="")


@pytest.mark.vm
def test_ok_and_output(vm: SmolVM) -> None:
    r = vm.run("echo '  padded  '")
    assert r.ok
    assert r.output == "padded"
    assert not vm.run("false").ok


@pytest.mark.vm
def test_stderr_is_captured_separately(vm: SmolVM) -> None:
    r = vm.run("echo out; echo err >&2; exit 1")
    assert (r.exit_code, r.stdout, r.stderr) == (1, "out\n", "err\n")


@pytest.mark.vm
def test_killed_by_signal_reports_shell_style_code(vm: SmolVM) -> None:
    assert vm.run("kill -9 $$").exit_code == 128 + 9


@pytest.mark.vm
def test_runs_bash_as_root_with_hostname(vm: SmolVM) -> None:
    r = vm.run('echo "$BASH_VERSION"; id -u; hostname')
    bash_version, uid, hostname = r.stdout.splitlines()
    assert bash_version
    assert uid == "0"
    assert hostname == vm.vm_id


@pytest.mark.vm
def test_cwd_and_per_command_env(vm: SmolVM) -> None:
    assert vm.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert vm.run("pwd").stdout == "/root\n"
    assert vm.run('printf %s "$ONE_OFF"', env={"ONE_OFF": "x y 'z'"}).stdout == "x y 'z'"
    assert vm.run('printf %s "${ONE_OFF-unset}"').stdout == "unset"  # not kept
    with pytest.raises(ValidationError):
        vm.run("true", env={"bad name": "x"})


@pytest.mark.vm
def test_missing_cwd_is_an_error(vm: SmolVM) -> None:
    with pytest.raises(SmolVMError):
        vm.run("true", cwd="/no/such/dir")
    assert vm.run("echo fine").stdout == "fine\n"


@pytest.mark.vm
def test_large_output_arrives_whole(vm: SmolVM) -> None:
    n = 30_000_000
    r = vm.run(f"head -c {n} /dev/zero | tr '\\0' a", timeout=120)
    assert r.exit_code == 0
    assert len(r.stdout) == n
    assert r.stdout.count("a") == n
    assert r.stderr == ""


@pytest.mark.vm
def test_stdout_and_stderr_interleaved_in_bulk(vm: SmolVM) -> None:
    n = 2_000_000
    r = vm.run(f"(head -c {n} /dev/zero | tr '\\0' o) & (head -c {n} /dev/zero | tr '\\0' e >&2); wait", timeout=120)
    assert r.stdout == "o" * n
    assert r.stderr == "e" * n


@pytest.mark.vm
def test_output_limit(vm: SmolVM) -> None:
    with pytest.raises(OutputLimitError):
        vm.run("yes", max_output=1_000_000, timeout=60)
    assert vm.run("echo still-works").stdout == "still-works\n"
    assert vm.run("pgrep -x yes").exit_code == 1  # the flood was stopped, not left running
    # under the limit is fine
    assert len(vm.run("head -c 900000 /dev/zero", max_output=1_000_000).stdout) == 900_000


@pytest.mark.vm
def test_timeout_kills_the_process_group(vm: SmolVM) -> None:
    vm.run("pkill -x sleep; true")
    started = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        vm.run("sleep 300 & sleep 300", timeout=2)
    assert time.monotonic() - started < 12
    r = vm.run("pgrep -x sleep")
    assert r.exit_code == 1, f"sleep processes survived the timeout: {r.stdout!r}"
    assert vm.run("echo after-timeout").stdout == "after-timeout\n"


@pytest.mark.vm
def test_a_cancelled_command_is_killed_with_its_group(vm: SmolVM) -> None:
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    r = vm.run("echo begun; sleep 300 & sleep 300", timeout=120, cancel=cancel)
    assert r.exit_code == 137 and r.stdout == "begun\n"
    assert time.monotonic() - started < 10
    assert vm.run("pgrep -x sleep").exit_code == 1, "sleep processes survived the cancel"
    assert vm.run("echo after-cancel", cancel=threading.Event()).stdout == "after-cancel\n"


@pytest.mark.vm
def test_background_child_holding_pipes_does_not_hang_run(vm: SmolVM) -> None:
    started = time.monotonic()
    r = vm.run("sleep 60 & echo bg-started", timeout=30)
    assert r.stdout == "bg-started\n"
    assert time.monotonic() - started < 10
    vm.run("pkill -x sleep; true")


@pytest.mark.vm
def test_upload_download_binary_exact(vm: SmolVM, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    vm.upload_file(local, "/data/deep/new/dirs/blob.bin")  # parents are created
    r = vm.run("sha256sum /data/deep/new/dirs/blob.bin; stat -c %s /data/deep/new/dirs/blob.bin")
    digest_line, size_line = r.stdout.splitlines()
    assert digest_line.split()[0] == sha256(data)
    assert int(size_line) == len(data)
    back = tmp_path / "back" / "blob.bin"
    vm.download_file("/data/deep/new/dirs/blob.bin", back)
    assert sha256(back.read_bytes()) == sha256(data)
    assert [p.name for p in back.parent.iterdir()] == ["blob.bin"]  # no temp files left


@pytest.mark.vm
def test_upload_overwrites_and_keeps_mode(vm: SmolVM, tmp_path: Path) -> None:
    local = tmp_path / "script.sh"
    local.write_text("#!/bin/sh\necho v1\n")
    local.chmod(0o755)
    vm.upload_file(str(local), "/root/script.sh")
    assert vm.run("stat -c %a /root/script.sh").output == "755"
    assert vm.run("/root/script.sh").stdout == "v1\n"
    local.write_text("#!/bin/sh\necho v2\n")
    vm.upload_file(local, "/root/script.sh")
    assert vm.run("/root/script.sh").stdout == "v2\n"
    assert vm.run("ls -A /root | grep -c smolvm-upload").output == "0"


@pytest.mark.vm
def test_empty_file_round_trip(vm: SmolVM, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    vm.upload_file(empty, "/tmp/empty")
    assert vm.run("stat -c %s /tmp/empty").output == "0"
    out = tmp_path / "empty.back"
    vm.download_file("/tmp/empty", out)
    assert out.read_bytes() == b""


@pytest.mark.vm
def test_download_missing_file(vm: SmolVM, tmp_path: Path) -> None:
    local = tmp_path / "never.bin"
    with pytest.raises(GuestFileNotFoundError) as info:
        vm.download_file("/no/such/file", local)
    assert isinstance(info.value, SmolVMError)
    assert not local.exists()
    assert list(tmp_path.iterdir()) == []  # no partial file either


@pytest.mark.vm
def test_failed_download_does_not_clobber_local_file(vm: SmolVM, tmp_path: Path) -> None:
    local = tmp_path / "precious.txt"
    local.write_text("precious")
    with pytest.raises(GuestFileNotFoundError):
        vm.download_file("/no/such/file", local)
    assert local.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


@pytest.mark.vm
def test_download_of_a_directory_is_refused(vm: SmolVM, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        vm.download_file("/etc", tmp_path / "etc")
    assert not (tmp_path / "etc").exists()
    with pytest.raises(ValidationError):
        vm.download_file("/etc/hostname", tmp_path)  # local side is a directory
    with pytest.raises(ValidationError):
        vm.download_file("/dev/zero", tmp_path / "zero")  # not a regular file: refused, not read forever
    assert not (tmp_path / "zero").exists()


@pytest.mark.vm
def test_upload_errors(vm: SmolVM, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        vm.upload_file(tmp_path / "missing", "/tmp/x")
    local = tmp_path / "f"
    local.write_text("x")
    with pytest.raises(ValidationError):
        vm.upload_file(local, "relative/x")
    with pytest.raises(ValidationError):
        vm.upload_file(local, "/etc")  # a directory in the guest
    assert vm.run("test -d /etc").ok
    with pytest.raises(SmolVMError):
        vm.upload_file(local, "/etc/hostname/below-a-file")
    assert vm.run("test -f /etc/hostname").ok


@pytest.mark.vm
def test_env_vars(vm: SmolVM) -> None:
    tricky = 'it\'s "quoted" $HOME `x` \\ ;\nsecond line'
    vm.set_env_vars({"SMOL_FOO": "bar baz", "SMOL_TRICKY": tricky})
    assert vm.run('printf %s "$SMOL_FOO"').stdout == "bar baz"
    assert vm.run('printf %s "$SMOL_TRICKY"').stdout == tricky
    env = vm.list_env_vars()
    assert env["SMOL_FOO"] == "bar baz" and env["SMOL_TRICKY"] == tricky
    # a login shell sees them too
    assert vm.run("bash -lc 'printf %s \"$SMOL_TRICKY\"'").stdout == tricky
    # per-command env wins over the persistent one
    assert vm.run('printf %s "$SMOL_FOO"', env={"SMOL_FOO": "override"}).stdout == "override"
    assert vm.unset_env_vars(["SMOL_FOO", "SMOL_NEVER_SET"]) == ["SMOL_FOO"]
    assert vm.unset_env_vars("SMOL_TRICKY") == ["SMOL_TRICKY"]
    assert vm.run('printf %s "${SMOL_FOO-unset}"').stdout == "unset"
    env = vm.list_env_vars()
    assert "SMOL_FOO" not in env and "SMOL_TRICKY" not in env


@pytest.mark.vm
@pytest.mark.parametrize("bad", [{"1BAD": "x"}, {"A-B": "x"}, {"": "x"}, {"A": "nul\0"}])
def test_env_vars_invalid(vm: SmolVM, bad: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        vm.set_env_vars(bad)


@pytest.mark.vm
def test_unset_env_invalid(vm: SmolVM) -> None:
    with pytest.raises(ValidationError):
        vm.unset_env_vars(["bad-name"])


@pytest.mark.vm
def test_duplicate_id_leaves_first_intact(vm: SmolVM) -> None:
    vm.run("echo keep > /root/dup-check")
    with pytest.raises(VMAlreadyExistsError):
        SmolVM(vm_id=vm.vm_id)
    assert vm.status is VMState.RUNNING
    assert vm.run("cat /root/dup-check").stdout == "keep\n"
    assert (sandbox_dir(vm.vm_id) / "disk.qcow2").is_file()


@pytest.mark.vm
def test_from_id_in_another_process(vm: SmolVM) -> None:
    vm.set_env_vars({"SMOL_FROM_PARENT": "p"})
    code = (
        "from smolvm import SmolVM\n"
        f"with SmolVM.from_id({vm.vm_id!r}) as box:\n"
        "    r = box.run('echo child-$((6*7)) $SMOL_FROM_PARENT')\n"
        "    print(r.stdout, end='')\n"
        "    print(box.status.value)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "child-42 p\nrunning\n"
    # leaving the child's with-block did not delete it
    assert vm.vm_id in record_ids()
    assert vm.status is VMState.RUNNING
    assert vm.run("echo parent").stdout == "parent\n"


@pytest.mark.vm
def test_concurrent_runs_from_threads(vm: SmolVM) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            handle = vm if i % 2 else SmolVM.from_id(vm.vm_id)
            results[i] = handle.run(f"echo {i}").stdout
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert results == {i: f"{i}\n" for i in range(6)}


def _start_child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(PYTHON), "-c", code], env=os.environ.copy())


@pytest.mark.vm
def test_host_killed_mid_upload(vm: SmolVM, tmp_path: Path) -> None:
    """A host process dying mid-frame leaves the agent mid-frame; the next connection pads it out and works."""
    data = os.urandom(40 * 1024 * 1024)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    child = _start_child(
        f"from smolvm import SmolVM; SmolVM.from_id({vm.vm_id!r}).upload_file({str(local)!r}, '/root/killed.bin')"
    )
    time.sleep(2.5)
    child.kill()
    child.wait()
    started = time.monotonic()
    assert vm.run("echo resynced").stdout == "resynced\n"
    assert time.monotonic() - started < 15
    assert vm.run("echo clean").stdout == "clean\n"
    # no half-written destination, and no temp file left behind once the guest has seen
    # the host gone (the port it left may be noticed after another port has answered)
    check = "ls -A /root | grep -c smolvm-upload; test -e /root/killed.bin && sha256sum /root/killed.bin"
    deadline = time.monotonic() + 5
    while (lines := vm.run(check).stdout.splitlines())[0] != "0" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lines[0] == "0"
    if len(lines) > 1:  # the upload beat the kill: then the file must be whole
        assert lines[1].split()[0] == sha256(data)
    vm.run("rm -f /root/killed.bin")


@pytest.mark.vm
def test_pause_resume(vm: SmolVM) -> None:
    vm.pause()
    try:
        assert vm.status is VMState.PAUSED
        assert SmolVM.from_id(vm.vm_id).status is VMState.PAUSED
        with pytest.raises(ValidationError, match="paused"):
            vm.run("true")
        with pytest.raises(ValidationError):
            vm.pause()
        with pytest.raises(ValidationError):
            vm.start()
    finally:
        vm.resume()
    assert vm.status is VMState.RUNNING
    assert vm.run("echo resumed").stdout == "resumed\n"
    with pytest.raises(ValidationError):
        vm.resume()


@pytest.mark.vm
def test_logs(vm: SmolVM) -> None:
    first = vm.logs()
    assert isinstance(first, str)
    vm.run("echo something")
    assert isinstance(vm.logs(), str)


@pytest.mark.vm
def test_list_and_info(vm: SmolVM) -> None:
    records = {r.id: r for r in SmolVM.list()}
    assert records[vm.vm_id].state is VMState.RUNNING
    info = vm.info()
    assert info["id"] == vm.vm_id
    assert info["state"] == "running"
    assert info["accel"] == "tcg"  # forced by conftest
    assert isinstance(info["pid"], int) and not qemu_pid_gone(info["pid"], vm.vm_id)
    assert vm.vm_id in repr(vm)


# == more sandboxes ==========================================================


class _Escape(Exception):
    pass


@pytest.mark.vm
def test_context_manager_and_separate_disks(vm: SmolVM) -> None:
    """Two sandboxes have separate copy-on-write disks; the with-block deletes what it created, even on error."""
    vm.run("echo only-in-first > /root/marker")
    vm.set_env_vars({"SMOL_FIRST_ONLY": "1"})
    with pytest.raises(_Escape), SmolVM(memory=256, vcpus=2) as other:
        vid = other.vm_id
        assert other.run("nproc").output == "2"
        pid = other.info()["pid"]
        assert other.status is VMState.RUNNING
        assert isinstance(pid, int) and not qemu_pid_gone(pid, vid)
        assert vid != vm.vm_id
        assert other.run("test -e /root/marker").exit_code == 1
        assert "SMOL_FIRST_ONLY" not in other.list_env_vars()
        other.run("echo only-in-second > /root/marker2")
        assert vm.run("test -e /root/marker2").exit_code == 1
        assert vm.run("cat /root/marker").stdout == "only-in-first\n"
        raise _Escape
    assert vid not in record_ids()
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vid)
    assert wait_until(lambda: qemu_pid_gone(pid, vid), 5)
    assert not sandbox_dir(vid).exists()
    assert vm.run("echo first-still-fine").stdout == "first-still-fine\n"


@pytest.mark.vm
def test_lifecycle_stop_start_keeps_disk(tmp_path: Path) -> None:
    box = SmolVM(vm_id=f"life-{os.getpid()}", memory=256)
    try:
        assert box.status is VMState.CREATED
        assert box.start() is box
        assert box.status is VMState.RUNNING
        pid1 = box.info()["pid"]
        assert box.start().info()["pid"] == pid1  # already running: no-op
        box.run("echo persisted > /root/keep")
        box.set_env_vars({"SMOL_KEPT": "yes"})
        local = tmp_path / "up"
        local.write_bytes(b"\x00\x01binary\xff")
        box.upload_file(local, "/opt/up.bin")

        box.stop()
        assert box.status is VMState.STOPPED
        assert box.info()["pid"] is None
        assert wait_until(lambda: qemu_pid_gone(pid1, box.vm_id), 5)
        with pytest.raises(ValidationError, match="stopped"):
            box.run("true")
        box.stop()  # again: no-op
        assert box.status is VMState.STOPPED
        assert SmolVM.from_id(box.vm_id).status is VMState.STOPPED

        box.start()
        assert box.status is VMState.RUNNING
        assert box.info()["pid"] != pid1
        assert box.run("cat /root/keep").stdout == "persisted\n"
        assert box.list_env_vars().get("SMOL_KEPT") == "yes"
        assert box.run('printf %s "$SMOL_KEPT"').stdout == "yes"
        out = tmp_path / "down"
        box.download_file("/opt/up.bin", out)
        assert out.read_bytes() == b"\x00\x01binary\xff"
    finally:
        box.delete()
    assert box.vm_id not in record_ids()


@pytest.mark.vm
def test_killed_hypervisor_is_error_and_delete_cleans_up() -> None:
    box = SmolVM(memory=256, disk_size=6144)  # bigger than the image's: grown at boot
    try:
        box.start()
        size_mib = int(box.run("df -m --output=size / | tail -1").output)
        assert 5500 < size_mib <= 6144
        pid = box.info()["pid"]
        assert isinstance(pid, int)
        run_dir = runtime_dir(box.vm_id)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: qemu_pid_gone(pid, box.vm_id), 10)
        assert box.status is VMState.ERROR
        info = box.info()
        assert info["pid"] is None
        assert info["note"]
        assert SmolVM.from_id(box.vm_id).status is VMState.ERROR
        assert any(r.id == box.vm_id and r.state is VMState.ERROR for r in SmolVM.list())
        with pytest.raises(ValidationError, match="error"):
            box.run("true")
    finally:
        box.delete()
    assert box.vm_id not in record_ids()
    assert not sandbox_dir(box.vm_id).exists()
    assert not run_dir.exists()


# == regressions: bugs found and fixed ======================================


@pytest.mark.vm
def test_command_after_host_died_mid_command_gets_its_own_result() -> None:
    box = SmolVM(memory=256)
    try:
        box.start()
        child = _start_child(
            f"from smolvm import SmolVM; SmolVM.from_id({box.vm_id!r}).run('sleep 100; echo x', timeout=200)"
        )
        time.sleep(3)
        child.kill()
        child.wait()
        assert box.run("echo fresh") == CommandResult(exit_code=0, stdout="fresh\n", stderr="")
        assert box.run("echo second") == CommandResult(exit_code=0, stdout="second\n", stderr="")
    finally:
        box.delete()


@pytest.mark.vm
def test_stop_of_paused_sandbox_keeps_recent_writes() -> None:
    box = SmolVM(memory=256)
    try:
        box.start()
        box.run("echo written-before-pause > /root/recent")
        box.pause()
        box.stop()
        assert box.status is VMState.STOPPED
        box.start()
        assert box.run("cat /root/recent").stdout == "written-before-pause\n"
    finally:
        box.delete()


@pytest.mark.vm
def test_half_sent_frame_is_padded_out(vm: SmolVM) -> None:
    """A host that dies mid-frame leaves the agent waiting for the rest; the next connection
    on that port recovers. Done on every port, so whichever a command gets was left so."""
    from smolvm import protocol as P
    from smolvm.agent_client import AgentConnection

    frame = P.encode(P.DATA, os.urandom(P.MAX_PAYLOAD), stream=12345, channel=P.FILE)
    for sock in vm._spec().agent_sockets:
        conn = AgentConnection.open(sock, 30)
        conn.sock.sendall(frame[: len(frame) // 3])  # the agent now waits for 2/3 MiB more
        conn.close()
    started = time.monotonic()
    assert vm.run("echo recovered").stdout == "recovered\n"
    assert time.monotonic() - started < 20
    for _ in range(3):
        assert vm.run("echo again").stdout == "again\n"


@pytest.mark.vm
def test_transfer_larger_than_the_transfer_window(vm: SmolVM, tmp_path: Path) -> None:
    """Files bigger than the transfer disk go through it a window at a time, both ways."""
    from smolvm.agent_client import TRANSFER_WINDOW

    size = TRANSFER_WINDOW + 3 * 1024 * 1024 + 7
    local = tmp_path / "large.bin"
    with open(local, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size % (1 << 20)))
    vm.upload_file(local, "/root/large.bin", timeout=300)
    assert vm.run("stat -c %s /root/large.bin").output == str(size)
    assert vm.run("sha256sum /root/large.bin").stdout.split()[0] == sha256(local.read_bytes())
    back = tmp_path / "large.back"
    vm.download_file("/root/large.bin", back, timeout=300)
    assert back.stat().st_size == size
    assert sha256(back.read_bytes()) == sha256(local.read_bytes())
    vm.run("rm -f /root/large.bin")


@pytest.mark.vm
def test_guest_system_basics(vm: SmolVM) -> None:
    """What the initramfs and the agent set up: hostname, loopback, /dev links, system mounts."""
    assert vm.run("hostname").output == vm.vm_id
    assert ",UP," in vm.run("ip -br link show lo").stdout
    assert vm.run("readlink /dev/fd; readlink /dev/stdin").stdout.split() == ["/proc/self/fd", "/proc/self/fd/0"]
    mounts = {line.split()[1]: line.split()[2] for line in vm.run("cat /proc/mounts").stdout.splitlines()}
    for point, fstype in (("/", "ext4"), ("/proc", "proc"), ("/sys", "sysfs"), ("/run", "tmpfs"),
                          ("/dev", "devtmpfs"), ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs")):  # fmt: skip
        assert mounts.get(point) == fstype, point
    assert vm.run("python3 -c 'import sys; print(sys.version_info[0])'").output == "3"


@pytest.mark.vm
def test_upload_and_download_across_filesystems(vm: SmolVM) -> None:
    """The transfer disk lives in the data dir; files on another filesystem (tmpfs here) still move."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this host")
    data = os.urandom(3 * 1024 * 1024 + 5)
    src = shm / f"smolvm-test-{os.getpid()}.bin"
    back = shm / f"smolvm-test-{os.getpid()}.back"
    try:
        src.write_bytes(data)
        vm.upload_file(src, "/root/from-tmpfs.bin")
        vm.download_file("/root/from-tmpfs.bin", back)
        assert sha256(back.read_bytes()) == sha256(data)
    finally:
        src.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


@pytest.mark.vm
def test_run_on_a_paused_sandbox_fails_at_once(vm: SmolVM) -> None:
    other = SmolVM.from_id(vm.vm_id)  # another handle: its cached state says running
    vm.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ValidationError, match="paused"):
            other.run("true")
        assert time.monotonic() - started < 5
    finally:
        vm.resume()
    assert other.run("echo back").output == "back"


@pytest.mark.vm
@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1])
def test_run_rejects_unusable_timeouts(vm: SmolVM, timeout: float) -> None:
    with pytest.raises(ValidationError):
        vm.run("true", timeout=timeout)


@pytest.mark.vm
def test_a_command_that_exhausts_memory_is_killed_and_the_sandbox_lives(vm: SmolVM) -> None:
    """The kernel's OOM killer takes the hog, not the agent: the sandbox keeps working."""
    r = vm.run("tail /dev/zero; echo status=$?", timeout=240)
    assert r.stdout.strip() == "status=137"
    assert "Killed" in r.stderr
    assert vm.run("echo alive").output == "alive"


@pytest.mark.vm
def test_sandboxes_resumed_from_the_template_are_each_their_own() -> None:
    """Clones of one saved machine get their own name, the host's clock and reseeded randomness."""
    a, b = SmolVM(), SmolVM()
    try:
        a.start()
        b.start()
        assert a.boot_timings["resumed_template"] == 1.0 == b.boot_timings["resumed_template"]
        probe = "hostname; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
        (name_a, clock_a, rand_a), (name_b, clock_b, rand_b) = (vm.run(probe).stdout.split() for vm in (a, b))
        assert (name_a, name_b) == (a.vm_id, b.vm_id)
        assert abs(int(clock_a) - time.time()) < 30 and abs(int(clock_b) - time.time()) < 30
        assert rand_a != rand_b
        a.run("echo mine > /root/owned")
        assert b.run("test -e /root/owned").exit_code == 1
        a.stop()
        a.start()  # later starts boot the sandbox's own disk
        assert a.boot_timings["resumed_template"] == 0.0
        assert a.run("cat /root/owned; hostname").stdout.split() == ["mine", a.vm_id]
    finally:
        a.delete()
        b.delete()


@pytest.mark.vm
def test_a_guest_that_stops_answering_times_out_cleanly_and_recovers() -> None:
    box = SmolVM()
    try:
        box.start()
        # Freeze the agent from inside the guest for ~12 s (the shell outlives the command).
        box.run(
            "p=$(pgrep -f 'import agent' | head -1); "
            "(sleep 1; kill -STOP $p; sleep 12; kill -CONT $p) >/dev/null 2>&1 &"
        )
        time.sleep(2)
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError):
            box.run("echo frozen", timeout=2)
        assert time.monotonic() - started < 20
        assert wait_until(lambda: box.run("echo back", timeout=20).output == "back", 40)
    finally:
        box.delete()


@pytest.mark.vm
def test_output_streams_to_callbacks_as_it_arrives(vm: SmolVM) -> None:
    seen: list[tuple[float, str, str]] = []
    started = time.monotonic()
    r = vm.run(
        "echo first; echo oops >&2; sleep 3; printf '\\xc3'; sleep 0.5; printf '\\xa9\\n'",
        on_stdout=lambda text: seen.append((time.monotonic() - started, "out", text)),
        on_stderr=lambda text: seen.append((time.monotonic() - started, "err", text)),
    )
    ended = time.monotonic() - started
    assert r.stdout == "first\né\n" and r.stderr == "oops\n"
    assert "".join(t for _, kind, t in seen if kind == "out") == r.stdout  # the split 'é' arrives whole
    assert "".join(t for _, kind, t in seen if kind == "err") == r.stderr
    first_at = next(at for at, kind, text in seen if kind == "out" and "first" in text)
    assert ended - first_at > 2.5  # it came while the command still ran


@pytest.mark.vm
def test_a_template_that_will_not_load_falls_back_to_a_cold_boot(tmp_path: Path) -> None:
    box = SmolVM()
    try:
        marker = sandbox_dir(box.vm_id) / "resume-from"
        assert marker.exists(), "the default shape should start from the saved template"
        broken = tmp_path / "m512-c1-tcg"
        broken.mkdir()
        (broken / "state.bin").write_bytes(b"not a machine state" * 1000)
        marker.write_text(str(broken))
        box.start()
        assert box.boot_timings["resumed_template"] == 0.0
        assert box.run("hostname").output == box.vm_id
        assert not marker.exists()
    finally:
        box.delete()


def leftovers(data_dir: Path) -> set[str]:
    """Every file SmolVM keeps outside the shared images and the state database."""
    found = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.parts[len(data_dir.parts)] != "images"}
    found -= {name for name in found if name.startswith("state.db")} | {"sandboxes"}
    tmp = Path("/tmp") / f"smolvm-{os.getuid()}"
    return found | {str(p) for p in tmp.glob("*")} if tmp.exists() else found


@pytest.mark.vm
def test_nothing_of_a_deleted_sandbox_remains(data_dir: Path) -> None:
    before = leftovers(data_dir)
    for _ in range(3):
        with SmolVM() as vm:
            assert vm.run("true").ok
    SmolVM(vm_id="never-started").delete()  # a created one too
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id("never-started").start()
    assert leftovers(data_dir) - before == set()
