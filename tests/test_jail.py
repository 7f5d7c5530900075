"""QEMU's jail (smolvm/jail.py) and its seccomp filter: the uid choice as pure logic,
and real sandboxes whose QEMU is looked at through /proc and QMP.

Boots in this module: the shared ``vm`` fixture (1), a second sandbox beside it (1),
one whose first-choice uid is in use (1), one unjailed under the rootless filter (1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, needs_image

from smolvm import SmolVM, cgroups, jail, locks
from smolvm.backends.qemu import qmp
from smolvm.exceptions import HostError
from smolvm.paths import sandbox_dir

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or jail.blocker() is not None, reason="QEMU is jailed only by a root that can jail it"
)

# Every device a default sandbox's QEMU has, and why. Anything else is a failure.
DEVICES = {
    "virtio-blk-device": "the root disk, and the transfer disk for bulk file moves",
    "virtio-serial-device": "the agent's ports and the egress proxy's net port",
    "virtserialport": "one per agent port, and the net port",
    "virtio-net-device": "user-mode networking: port forwards, SSH, the egress relay",
    "virtio-rng-device": "entropy for the guest's kernel",
    "virtio-mmio": "microvm's fixed transports, most of them empty",
    "isa-serial": "the console (ttyS0) that 'sandbox logs' shows",
    "isabus-bridge": "holds the ISA devices below",
    "mc146818rtc": "the wall clock the guest boots with",
    "isa-pit": "the timer the kernel calibrates against under TCG",
    "isa-i8259": "the legacy interrupt controller, pair of",
    "ioapic": "interrupt routing for the virtio devices",
    "kvmvapic": "microvm's APIC helper (created with the APIC)",
    "acpi-ged-x86": "ACPI events: the guest's power-off",
    "acpi-ged": "the same device, as newer QEMUs name it",
    "fw_cfg_io": "hands the kernel, initrd and command line to the guest",
}
BACKED = {"virtio-blk-device": 2, "virtio-serial-device": 1, "virtio-net-device": 1, "virtio-rng-device": 1}


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def qemu_pid(vm: SmolVM) -> int:
    pid = vm._refresh().pid
    assert pid is not None
    return pid


# == the uid choice: no VM ===================================================


def test_candidates_stay_in_the_range_and_start_where_the_key_hashes() -> None:
    first = list(jail.candidates("/data/sandboxes/a"))
    assert len(first) == jail.TRIES and len(set(first)) == jail.TRIES
    assert all(jail.UID_BASE <= uid < jail.UID_BASE + jail.UID_COUNT for uid in first)
    assert first == list(jail.candidates("/data/sandboxes/a"))
    assert first[0] != next(jail.candidates("/data/sandboxes/b"))


def test_accounts_groups_and_subordinate_ranges_are_taken(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "status").write_text(
        "Name:\tx\nUid:\t1900000007\t1900000007\t1900000007\t1900000007\nGid:\t5\t5\t5\t5\n"
    )
    (proc / "self").mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("svc:x:1900000001:1900000002::/:/bin/false\nbroken line\n")
    (etc / "group").write_text("grp:x:1900000003:\n")
    (etc / "subuid").write_text("alice:1900000100:65536\nnonsense\n")
    ids, ranges = jail.taken(etc, proc)
    assert {1900000001, 1900000002, 1900000003, 1900000007, 5} <= ids
    for uid in (1900000001, 1900000002, 1900000003, 1900000007, 1900000100, 1900065635):
        assert not jail.free(uid, ids, ranges)
    assert jail.free(1900000004, ids, ranges)
    assert jail.free(1900065636, ids, ranges)


def test_a_taken_uid_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "sb"
    home.mkdir()
    first, second = list(jail.candidates("key"))[:2]
    monkeypatch.setattr(jail, "taken", lambda: ({first}, []))
    monkeypatch.setattr(os, "chown", lambda *a: None)  # not root in every run of the quick set
    with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as cell:
        assert (cell.uid, cell.gid) == (second, second)
        assert cell.args((7, 2)) == ["-runas", f"{second}:{second}", "-chroot", str(home / "jail")]
        assert cell.args((10, 0)) == ["-run-with", f"chroot={home / 'jail'},user={second}:{second}"]
        # Held: a second start at the same moment does not get it.
        with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as other:
            assert other.uid not in (first, second)
        # Whoever inherited the lock (QEMU) holds the uid after the start is done.
        kept = os.dup(cell.lock)
    try:
        assert locks.try_lock(tmp_path / "locks" / f"{second}.lock") is None
        with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as again:
            assert again.uid != second
    finally:
        os.close(kept)
    with jail.taken_for(home, "key", lock_dir=tmp_path / "locks") as freed:
        assert freed.uid == second  # its holder gone, the uid is free again


def test_whatever_stands_in_the_jails_place_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "chown", lambda *a: None)
    root = tmp_path / "jail"
    root.symlink_to("/etc")  # a link would make /etc QEMU's root
    assert jail.make_root(tmp_path) == root
    assert root.is_dir() and not root.is_symlink() and list(root.iterdir()) == []
    root.chmod(0o777)
    jail.make_root(tmp_path)
    assert root.stat().st_mode & 0o777 == 0o555  # QEMU may enter it, never write in it


def fake_self(
    tmp_path: Path, caps: str, uid_map: str | None, setgroups: str = "allow", gid_map: str | None = None
) -> Path:
    me = tmp_path / "self"
    me.mkdir()
    (me / "status").write_text(f"Name:\tpython\nCapEff:\t{caps}\nCapBnd:\t000001ffffffffff\n")
    if uid_map is not None:
        (me / "uid_map").write_text(uid_map)
        (me / "gid_map").write_text(gid_map or uid_map)
        (me / "setgroups").write_text(setgroups + "\n")
    return me


def test_a_gid_map_short_of_the_range_blocks_too(tmp_path: Path) -> None:
    whole = "         0          0 4294967295\n"
    me = fake_self(tmp_path, "000001ffffffffff", whole, gid_map="         0     100000      65536\n")
    assert "maps no gids" in (jail.blocker(me) or "")


def test_a_bounding_set_without_the_caps_blocks(tmp_path: Path) -> None:
    me = fake_self(tmp_path, "000001ffffffffff", None)
    (me / "status").write_text("CapEff:\t000001ffffffffff\nCapBnd:\t0000000000000000\n")
    assert "CAP_SETGID" in (jail.blocker(me) or "")


def test_a_root_that_cannot_jail_warns_at_each_start_and_runs_unjailed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from smolvm.backends.qemu import QemuBackend

    monkeypatch.setattr(jail, "wanted", lambda: True)
    monkeypatch.setattr(jail, "blocker", lambda: "root here lacks CAP_SYS_CHROOT")
    with caplog.at_level("WARNING", logger="smolvm"):
        assert QemuBackend._jailed() is False
    assert "NOT jailed" in caplog.text and "CAP_SYS_CHROOT" in caplog.text
    monkeypatch.setattr(jail, "blocker", lambda: None)
    assert QemuBackend._jailed() is True


@pytest.mark.parametrize(
    ("caps", "uid_map", "setgroups", "why"),
    [
        ("000001ffffffffff", "         0          0 4294967295\n", "allow", None),  # the host's root
        ("000001ffffffffff", None, "allow", None),  # no user namespaces at all
        ("000001ffffffffff", "         0     100000      65536\n", "allow", "maps no uids"),  # rootless podman
        ("000001ffffffffff", "         0          0 4294967295\n", "deny", "denies setgroups"),
        ("00000000a80425fb", "         0          0 4294967295\n", "allow", None),  # docker's default set has all three
        ("00000000a80025fb", "         0          0 4294967295\n", "allow", "CAP_SYS_CHROOT"),  # one that dropped it
        ("0000000000000000", "         0          0 4294967295\n", "allow", "CAP_SETGID, CAP_SETUID"),
    ],
)
def test_a_root_that_cannot_jail_is_told_why(
    tmp_path: Path, caps: str, uid_map: str | None, setgroups: str, why: str | None
) -> None:
    reason = jail.blocker(fake_self(tmp_path, caps, uid_map, setgroups))
    assert reason is None if why is None else why in (reason or "")


SETID_PROBE = """
import os, sys
uid = int(sys.argv[1])
def tried(call, *args):
    try:
        call(*args)
        return "ok"
    except OSError as exc:
        return os.strerror(exc.errno)
print(tried(os.setgid, 0), tried(os.setgid, uid), tried(os.setuid, 12345), tried(os.setuid, 0),
      tried(os.setuid, uid), os.getuid(), sep="|", flush=True)
os.setresuid(uid, uid, uid)
print("survived")
"""


@as_root
def test_the_setid_filter_lets_a_process_change_ids_only_to_its_jails(tmp_path: Path) -> None:
    """Run as root, with every capability, the filter alone refuses a setuid to any id but
    the jail's (root's own included), and kills a process for the other set*id calls."""
    from smolvm.backends.qemu import SETID_FILTER, limited

    uid = jail.UID_BASE + 4242
    cell = jail.Jail(uid, uid, tmp_path, None)
    argv = limited([sys.executable, "-I", "-S", "-c", SETID_PROBE, str(uid)], 256, cell)
    assert argv[:4] == [sys.executable, "-I", "-S", str(SETID_FILTER)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    denied = os.strerror(1)  # EPERM
    assert done.stdout.splitlines()[0].split("|") == [denied, "ok", denied, denied, "ok", str(uid)], done
    assert "survived" not in done.stdout and done.returncode == -31  # SIGSYS, at setresuid


def test_the_setid_filter_says_what_it_could_not_do() -> None:
    from smolvm.backends import setid_filter

    with pytest.raises(OSError):
        setid_filter.load(1, 1, lib="libno-such-seccomp.so.9")
    run = [sys.executable, "-I", "-S", str(Path(setid_filter.__file__))]
    usage = subprocess.run([*run, "x", "1"], capture_output=True, text=True, timeout=30, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    missing = subprocess.run(
        [*run, str(1 << 30), "0", "0", "/no/such/qemu"], capture_output=True, text=True, timeout=30, check=False
    )
    assert missing.returncode == 126 and "cannot start /no/such/qemu in its jail" in missing.stderr


def test_a_jail_that_cannot_be_made_says_so(tmp_path: Path) -> None:
    home = tmp_path / "not-a-dir"
    home.write_text("")
    with pytest.raises(HostError, match="cannot make the jail"):
        jail.make_root(home)


# == real sandboxes ==========================================================


@needs_image
def test_qemu_runs_under_its_seccomp_filter_with_nothing_but_its_devices(vm: SmolVM) -> None:
    pid = qemu_pid(vm)
    assert status(pid)["Seccomp"] == "2"
    tree = qmp(vm._spec().control_socket, "human-monitor-command", {"command-line": "info qtree"})
    devices = Counter(line.split("dev:")[1].split(",")[0].strip() for line in tree.splitlines() if "dev:" in line)
    assert set(devices) <= set(DEVICES), f"unexpected devices: {set(devices) - set(DEVICES)}"
    assert {name: devices[name] for name in BACKED} == BACKED
    assert devices["virtserialport"] == 9  # eight agent ports and the net port


@needs_image
@as_root
def test_qemu_is_jailed_when_run_as_root(vm: SmolVM) -> None:
    pid = qemu_pid(vm)
    st = status(pid)
    uids, gids = set(st["Uid"].split()), set(st["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1  # real, effective, saved and filesystem alike
    uid = int(uids.pop())
    assert uid != 0 and int(gids.pop()) != 0
    assert jail.UID_BASE <= uid < jail.UID_BASE + jail.UID_COUNT
    assert st["CapPrm"] == st["CapEff"] == st["CapAmb"] == "0" * 16  # its set*id calls gain it nothing
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp_filters"] == "2"  # SmolVM's of the set*id calls (setid_filter.py), and QEMU's own
    root = os.readlink(f"/proc/{pid}/root")
    assert root != "/"
    assert Path(root) == sandbox_dir(vm.vm_id) / "jail"
    assert os.listdir(f"/proc/{pid}/root") == []
    held = locks.try_lock(jail.LOCK_DIR / f"{uid}.lock")  # its QEMU holds its uid's lock
    assert held is None
    # A QEMU taken over could rewrite its argv: it is still found by its uid.
    from dataclasses import replace

    from smolvm.backends.qemu import QemuBackend

    spec = vm._spec()
    assert QemuBackend().owns(replace(spec, runtime=spec.runtime / "elsewhere"), pid)
    another = spec.home.parent / "another"  # no uid recorded there, nor its sockets on the command line
    assert not QemuBackend().owns(replace(spec, home=another, runtime=another), pid)
    assert vm.run("echo still works").output == "still works"


@needs_image
@as_root
def test_one_sandboxs_qemu_cannot_read_anothers_files(vm: SmolVM) -> None:
    with SmolVM() as other:
        mine, theirs = status(qemu_pid(vm)), status(qemu_pid(other))
        uid = int(mine["Uid"].split()[0])
        assert uid != int(theirs["Uid"].split()[0])  # a uid of its own, not a shared service user
        probe = 'for p; do if head -c1 "$p" >/dev/null 2>&1; then echo read; else echo denied; fi; done'
        targets = [str(sandbox_dir(other.vm_id) / "disk.qcow2"), str(sandbox_dir(other.vm_id) / "transfer.img")]
        out = subprocess.run(
            ["/bin/sh", "-c", probe, "sh", *targets], user=uid, group=uid, extra_groups=[], cwd="/",
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.stdout.split() == ["denied", "denied"], out
        # ... which root, as a check that the probe reads at all, can.
        assert subprocess.run(
            ["/bin/sh", "-c", probe, "sh", *targets], capture_output=True, text=True, check=False
        ).stdout.split() == ["read", "read"]


@needs_image
@as_root
def test_a_uid_in_use_is_not_taken(tmp_path: Path) -> None:
    """A process already running as the uid a sandbox would get first: it gets another."""
    name = "jail-busy-uid"
    wanted = next(jail.candidates(str(sandbox_dir(name))))
    squatter = subprocess.Popen(["sleep", "120"], user=wanted, group=wanted, extra_groups=[])
    try:
        with SmolVM(vm_id=name) as vm:
            uid = int(status(qemu_pid(vm))["Uid"].split()[0])
            assert uid != wanted and uid != 0
            assert vm.run("echo ok").output == "ok"
    finally:
        squatter.kill()
        squatter.wait()


@pytest.fixture
def unjailed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """QEMU as a normal user gets it: no jail, the whole filter."""
    monkeypatch.setattr(jail, "wanted", lambda: False)
    yield


@needs_image
def test_unjailed_qemu_denies_privilege_changes_too(unjailed: None) -> None:
    with SmolVM() as vm:
        st = status(qemu_pid(vm))
        assert st["Seccomp"] == "2"
        cmdline = Path(f"/proc/{qemu_pid(vm)}/cmdline").read_bytes().split(b"\0")
        assert b"-runas" not in cmdline
        assert any(b"elevateprivileges=deny" in arg and b"spawn=deny" in arg for arg in cmdline)
        assert vm.run("echo ok").output == "ok"


@needs_image
def test_qemu_cannot_map_more_than_its_memory_and_the_stated_overhead(vm: SmolVM) -> None:
    from smolvm.backends.qemu import ADDRESS_OVERHEAD_MIB

    pid = qemu_pid(vm)
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    line = next(line for line in limits if line.startswith("Max address space"))
    expected = (vm.config.memory + ADDRESS_OVERHEAD_MIB) << 20
    assert line.split()[3:5] == [str(expected), str(expected)]  # soft and hard alike
    assert Path(f"/proc/{pid}/environ").read_bytes() == b"MALLOC_ARENA_MAX=2\0"  # nothing of the host's
    # Under the cap it still does what a sandbox does at full tilt: parallel disk
    # writes (QEMU's I/O threads), memory filled, a file both ways.
    load = "for i in 1 2 3 4 5 6 7 8; do dd if=/dev/zero of=/tmp/f$i bs=1M count=24 oflag=direct 2>/dev/null & done; wait; sync"
    assert vm.run(load, timeout=120).ok
    assert vm.run("python3 -c 'x = bytearray(300 << 20); print(len(x))'", timeout=60).output == str(300 << 20)
    big = Path(os.environ.get("TMPDIR", "/tmp")) / f"jail-load-{os.getpid()}"
    try:
        big.write_bytes(os.urandom(32 << 20))
        vm.upload_file(str(big), "/tmp/big")
        vm.download_file("/tmp/big", str(big) + ".back")
        assert Path(str(big) + ".back").read_bytes() == big.read_bytes()
    finally:
        big.unlink(missing_ok=True)
        Path(str(big) + ".back").unlink(missing_ok=True)
    assert vm.run("rm -f /tmp/f*; echo ok").output == "ok"
    assert int(status(pid)["VmPeak"].split()[0]) * 1024 <= expected


def test_doctor_says_how_qemu_is_confined_and_what_is_not_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolvm import doctor

    check = doctor.hypervisor_check()
    assert check.status == ("ok" if jail.blocker() is None else "warn")
    assert ("uid of its own" in check.detail) == (os.geteuid() == 0)
    assert "spawn" in check.detail
    bounds = doctor.bounds_check()
    assert "RLIMIT_AS" in bounds.detail
    if isinstance(cgroups.tree(), str):
        assert bounds.status == "warn" and "CPU: not capped" in bounds.detail
    else:
        assert bounds.status == "ok" and "capped at its vCPUs' count of cores" in bounds.detail
    monkeypatch.setattr(cgroups, "tree", lambda **_: "cgroup v1, where a normal user is given no cgroup of its own")
    bounds = doctor.bounds_check()
    assert bounds.status == "warn" and "CPU: not capped (cgroup v1, where a normal user" in bounds.detail
    monkeypatch.setattr(jail, "wanted", lambda: True)
    monkeypatch.setattr(jail, "blocker", lambda: "root here lacks CAP_SYS_CHROOT")
    check = doctor.hypervisor_check()
    assert check.status == "warn" and "NOT jailed" in check.detail and "CAP_SYS_CHROOT" in check.detail


@needs_image
def test_a_saved_state_that_cannot_be_read_is_a_host_error(tmp_path: Path) -> None:
    """A HostError, before QEMU starts, so start() falls back to a cold boot rather than failing."""
    from dataclasses import replace

    from smolvm.backends.qemu import QemuBackend

    vm = SmolVM()
    try:
        sandbox_dir(vm.vm_id).mkdir(parents=True, exist_ok=True)
        spec = replace(vm._spec(), incoming=tmp_path / "gone.bin")
        with pytest.raises(HostError, match="cannot read the saved machine state"):
            QemuBackend().launch(spec)
        assert not ours_running(spec)
    finally:
        vm.delete()


@needs_image
def test_a_qemu_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    from dataclasses import replace

    from smolvm.backends.qemu import QemuBackend

    vm = SmolVM()
    try:
        spec = replace(vm._spec(), kernel=tmp_path / "no-such-kernel", transfer=False)
        sandbox_dir(vm.vm_id).mkdir(parents=True, exist_ok=True)
        with pytest.raises(HostError, match="QEMU failed to start: .*no-such-kernel"):
            QemuBackend().launch(spec)
        assert not ours_running(spec)
    finally:
        vm.delete()


def ours_running(spec: object) -> bool:
    """Whether a live (not zombie) QEMU of this spec runs."""
    from smolvm.backends.qemu import qmp_arg

    mark = qmp_arg(spec).encode()  # type: ignore[arg-type]
    for entry in Path("/proc").iterdir():
        try:
            alive = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and mark in (entry / "cmdline").read_bytes().split(b"\0"):
                return True
        except (OSError, NotADirectoryError, IndexError):
            continue
    return False


NORMAL_USER = 65534  # nobody
AS_NORMAL_USER = r"""
import json, os, urllib.request
from pathlib import Path
from smolvm import SmolVM

with SmolVM() as vm:
    pid = vm._refresh().pid
    status = dict(l.split(":", 1) for l in Path(f"/proc/{pid}/status").read_text().splitlines())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    root = os.readlink(f"/proc/{pid}/root")
    Path("up.txt").write_text("from the host")
    vm.upload_file("up.txt", "/tmp/up.txt")
    vm.download_file("/tmp/up.txt", "back.txt")
    vm.spawn("cd /tmp && python3 -m http.server 8000")
    port = vm.expose_local(8000)
    body = b""
    for _ in range(100):
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/up.txt", timeout=5).read()
            break
        except OSError:
            import time; time.sleep(0.1)
    vm.stop()
    vm.start()
    again = vm.run("echo again").output
    print(json.dumps({
        "uid": status["Uid"].split(), "seccomp": status["Seccomp"].strip(),
        "root": root,
        "runas": b"-runas" in cmdline,
        "filter": [a.decode() for a in cmdline if b"spawn=deny" in a],
        "echo": vm.run("echo hi; id -u").output, "back": Path("back.txt").read_text(),
        "served": body.decode(), "again": again,
    }))
"""


@needs_image
@as_root
def test_a_normal_user_runs_sandboxes_unjailed_under_the_whole_filter() -> None:
    """What works as root works as a normal user: start, run, files, a port, stop and
    start; its QEMU runs as that user, with no jail and privilege changes denied."""
    top = Path(tempfile.mkdtemp(prefix="smolvm-user-"))  # not under pytest's 0700 directory
    try:
        as_normal_user(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def as_normal_user(top: Path) -> None:
    from smolvm.images.store import ImageStore

    image = ImageStore().load()
    home = top / "user"
    images = home / "data" / "images" / "default" / image.dir.name
    images.mkdir(parents=True)
    for f in image.dir.iterdir():  # world-readable files in root's 0700 directory
        try:
            os.link(f, images / f.name)
        except OSError:
            shutil.copy2(f, images / f.name)
    (images.parent / "current").symlink_to(image.dir.name)
    # Its directories become the user's; the image files stay root's (a hard link is
    # the same inode: chowning it would hand root's image over), readable by all.
    for path in (home, *home.rglob("*")):
        if path.is_dir() or path.is_symlink():
            os.lchown(path, NORMAL_USER, NORMAL_USER)
    top.chmod(0o755)
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    env = {
        "HOME": str(home), "SMOLVM_DATA_DIR": str(home / "data"), "SMOLVM_ACCEL": "tcg",
        "PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{site}", "PYTHONDONTWRITEBYTECODE": "1",
    }  # fmt: skip
    # The venv's own interpreter may live where only root looks (pyenv under /root):
    # the system's of the same version runs the same packages.
    python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    assert python.exists(), f"this test needs {python}, a Python a normal user can run, like the venv's"
    out = subprocess.run(
        [str(python), "-c", AS_NORMAL_USER], user=NORMAL_USER, group=NORMAL_USER, extra_groups=[],
        cwd=home, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["uid"] == [str(NORMAL_USER)] * 4
    assert seen["seccomp"] == "2"
    assert seen["root"] == "/" and seen["runas"] is False
    assert len(seen["filter"]) == 1 and "elevateprivileges=deny" in seen["filter"][0]
    assert seen["echo"] == "hi\n0"  # root in the guest, whoever runs it on the host
    assert seen["back"] == "from the host" == seen["served"]
    assert seen["again"] == "again"
