"""Host folders mounted in sandboxes: the rules (pure), then real sandboxes."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, needs_image

from smolvm import Mount, SmolVM, VMConfig, jail
from smolvm.exceptions import HostError
from smolvm.exceptions import ValidationError as SmolValidationError
from smolvm.mounts import MAX_MOUNTS, check_host_folders, open_folder, qemu_args, qemu_identity, resolved

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, and a jailed QEMU)")


# -- the rules ------------------------------------------------------------------------
def test_a_mount_is_read_only_and_at_the_hosts_path_by_default(tmp_path: Path) -> None:
    m = Mount(tmp_path)
    assert (m.host, m.guest, m.writable) == (str(tmp_path), str(tmp_path), False)
    rel = Mount("./x/../data", "/data/")
    assert rel.host == os.path.join(os.getcwd(), "data") and rel.guest == "/data"


@pytest.mark.parametrize(
    ("text", "host", "guest", "writable"),
    [
        ("/srv/a", "/srv/a", "/srv/a", False),
        ("/srv/a:rw", "/srv/a", "/srv/a", True),
        ("/srv/a:/data", "/srv/a", "/data", False),
        ("/srv/a:/data:ro", "/srv/a", "/data", False),
        ("/srv/a:/data:rw", "/srv/a", "/data", True),
    ],
)
def test_the_cli_form(text: str, host: str, guest: str, writable: bool) -> None:
    m = Mount.parse(text)
    assert (m.host, m.guest, m.writable) == (host, guest, writable)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("/", "whole host"),
        ("/srv/a:/data:rw:x", "HOST[:GUEST][:rw]"),
        (":/data", "HOST[:GUEST][:rw]"),
        ("/srv/a:data", "must be absolute"),
        ("/srv/a:/", "hide /proc"),
        ("/srv/a:/proc/x", "hide /proc"),
        ("/srv/a:/opt/smolvm", "hide /opt/smolvm"),
        ("/srv/a:/usr", "hide /usr"),
        ("/srv/a:/etc", "hide the guest's /etc"),
        ("/srv/a:/data/../etc", "'..'"),
        ("/srv/new\nline", "control characters"),
        ("/srv/a:/da\x1bta", "control characters"),
        ("/srv/\udcff", "not valid text"),
        ("/srv/a://proc", "hide /proc"),
        ("/srv/a://", "hide /proc"),
        ("/srv/a:/opt", "hide /opt/smolvm"),
        ("/srv/a:/usr/lib", "hide /usr"),
        ("/srv/a:/var/run/x", "hide /var/run"),
    ],
)
def test_bad_mounts_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(SmolValidationError, match=re.escape(says)):
        Mount.parse(text)


def test_mounts_together_cannot_share_or_nest_guest_paths_or_be_too_many(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two mounts on the guest path /d"):
        VMConfig(mounts=[Mount(tmp_path, "/d"), Mount(tmp_path, "/d/")])
    with pytest.raises(ValueError, match="nest"):
        VMConfig(mounts=[Mount(tmp_path, "/d/e"), Mount(tmp_path, "/d")])
    with pytest.raises(ValueError, match=f"room for {MAX_MOUNTS}"):
        VMConfig(mounts=[Mount(tmp_path, f"/m{i}") for i in range(MAX_MOUNTS + 1)])
    assert len(VMConfig(mounts=[Mount(tmp_path, "/d"), Mount(tmp_path, "/de")]).mounts) == 2  # a prefix is no nest


def test_host_folders_may_not_nest_when_one_is_writable_and_links_are_resolved_once(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="nest, and one is writable"):
        VMConfig(mounts=[Mount(tmp_path, "/a", writable=True), Mount(tmp_path / "in", "/b")])
    assert len(VMConfig(mounts=[Mount(tmp_path, "/a"), Mount(tmp_path / "in", "/b")]).mounts) == 2
    (tmp_path / "link").symlink_to(tmp_path / "in")
    assert resolved([Mount(tmp_path / "link", "/b")])[0].host == str(tmp_path / "in")
    with pytest.raises(ValueError, match="nest"):  # found once the link is resolved
        resolved([Mount(tmp_path / "link", "/b", writable=True), Mount(tmp_path / "in", "/c")])


def test_a_folder_is_opened_for_qemu_only_where_it_was_when_the_sandbox_was_made(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    mount = resolved([Mount(tmp_path / "real", "/d")])[0]
    fd = open_folder(mount)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "real"))
        assert qemu_args([mount], [fd])[1].startswith(f"local,id=share0,path=/proc/self/fd/{fd},")
    finally:
        os.close(fd)
    (tmp_path / "real").rename(tmp_path / "moved")
    (tmp_path / "real").symlink_to(tmp_path / "other")  # the last step a link now
    with pytest.raises(HostError, match="cannot open"):
        open_folder(mount)
    os.unlink(tmp_path / "real")
    (tmp_path / "hop").symlink_to(tmp_path)
    hop = Mount.model_construct(host=str(tmp_path / "hop" / "other"), guest="/d", writable=False)
    with pytest.raises(HostError, match="now leads to"):  # a link earlier in the path
        open_folder(hop)


def test_as_root_where_qemu_cannot_be_jailed_mounts_are_refused(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jail, "wanted", lambda: True)
    monkeypatch.setattr(jail, "blocker", lambda: "CAP_SETUID is missing")
    with pytest.raises(SmolValidationError, match="mounts need QEMU jailed.*CAP_SETUID"):
        check_host_folders([Mount(tmp_path, "/d")], data_dir)


def test_a_mount_survives_the_state_stores_round_trip(tmp_path: Path) -> None:
    config = VMConfig(mounts=[Mount(tmp_path, "/data", writable=True)])
    again = VMConfig.model_validate(config.model_dump())
    assert again.mounts == config.mounts


def test_host_folders_must_exist_be_folders_and_not_hold_smolvms_data(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "file").write_text("x")
    (data_dir / "sandboxes").mkdir(exist_ok=True)
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file", "not a folder"),
        (data_dir, "SmolVM's own"),
        (data_dir / "sandboxes", "SmolVM's own"),
        (data_dir.parent, "SmolVM's own"),
        (Path("/tmp"), "SmolVM's own"),  # holds the sockets' directory, /tmp/smolvm-UID
        (Path("/run"), "SmolVM's own"),  # holds the jail's uid locks
    ]
    for path, says in cases:
        with pytest.raises(SmolValidationError, match=says):
            check_host_folders([Mount(path, "/d")], data_dir)
    tmp_path.chmod(0o755)  # as root, a folder of root's must be open to others
    check_host_folders([Mount(tmp_path, "/d")], data_dir)


def test_shares_come_after_every_other_device_with_their_own_tags(tmp_path: Path) -> None:
    args = qemu_args([Mount(tmp_path, "/a"), Mount(str(tmp_path) + ",x", "/b", writable=True)])
    assert args[1].startswith(f"local,id=share0,path={tmp_path},") and "readonly=on" in args[1]
    assert f"path={tmp_path},,x," in args[5] and "readonly=off" in args[5]  # a comma cannot add an option
    assert args[3] == "virtio-9p-device,fsdev=share0,mount_tag=smolvm0"
    assert args[7] == "virtio-9p-device,fsdev=share1,mount_tag=smolvm1"


@as_root
def test_qemu_serves_mounts_as_their_owner_and_never_a_writable_root_folder(tmp_path: Path) -> None:
    mine, other, roots = tmp_path / "mine", tmp_path / "other", tmp_path / "roots"
    for d in (mine, other, roots):
        d.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    os.chown(other, 2, 2)  # another user's
    os.chown(mine, NOBODY, 0)  # a group of root's on the folder is not taken
    nogroup = pwd.getpwuid(NOBODY).pw_gid
    assert qemu_identity([Mount(mine, "/a", writable=True), Mount(roots, "/b")]) == (NOBODY, nogroup)
    roots.chmod(0o755)
    assert qemu_identity([Mount(roots, "/b")]) is None  # the jail's own uid reads what all may read
    roots.chmod(0o750)
    with pytest.raises(HostError, match="closed to others"):
        qemu_identity([Mount(roots, "/b")])
    with pytest.raises(HostError, match="root's power"):
        qemu_identity([Mount(roots, "/b", writable=True)])
    with pytest.raises(HostError, match="different owners"):
        qemu_identity([Mount(mine, "/a"), Mount(other, "/b")])


# -- real sandboxes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ro = tmp_path_factory.mktemp("ro")
    rw = tmp_path_factory.mktemp("rw")
    (ro / "hello.txt").write_text("hello from the host\n")
    (ro / "sub").mkdir()
    (ro / "sub" / "deep.txt").write_text("deep\n")
    ro.chmod(0o755)  # root's, read-only: served by the jail's own uid, which reads what others may
    if os.geteuid() == 0:
        os.chown(rw, NOBODY, NOBODY)  # served by its owner; a writable folder of root's is refused
    return ro, rw


@pytest.fixture(scope="module")
def mounted(folders: tuple[Path, Path]) -> Iterator[SmolVM]:
    ro, rw = folders
    with SmolVM(mounts=[Mount(ro, "/data"), Mount(rw, "/scratch", writable=True)]) as vm:
        yield vm


@needs_image
def test_a_read_only_mount_is_read_and_root_in_the_guest_cannot_write_it(
    mounted: SmolVM, folders: tuple[Path, Path]
) -> None:
    ro, _ = folders
    assert mounted.run("cat /data/hello.txt /data/sub/deep.txt").stdout == "hello from the host\ndeep\n"
    assert mounted.files.read("/data/hello.txt") == "hello from the host\n"
    # root remounts it writable in the guest: QEMU still serves no write
    attempt = mounted.run(
        "id -u; mount -o remount,rw /data && echo remounted; echo x > /data/new.txt; echo x >> /data/hello.txt;"
        " rm -f /data/sub/deep.txt; mkdir /data/d; chmod 777 /data/hello.txt; true"
    )
    assert attempt.stdout.splitlines()[0] == "0"
    assert "Read-only file system" in attempt.stderr
    assert sorted(p.name for p in ro.rglob("*")) == ["deep.txt", "hello.txt", "sub"]
    assert (ro / "hello.txt").read_text() == "hello from the host\n"
    assert (ro / "hello.txt").stat().st_mode & 0o777 == 0o644


@needs_image
def test_a_writable_mounts_changes_appear_at_once_on_both_sides(mounted: SmolVM, folders: tuple[Path, Path]) -> None:
    _, rw = folders
    made = mounted.run("echo made in the guest > /scratch/out.txt && mkdir -p /scratch/d/e")
    assert made.exit_code == 0, made.stderr
    assert (rw / "out.txt").read_text() == "made in the guest\n"
    assert (rw / "d" / "e").is_dir()
    if os.geteuid() == 0:
        assert (rw / "out.txt").stat().st_uid == NOBODY  # written by QEMU as the folder's owner
    (rw / "from-host.txt").write_text("the host wrote this\n")
    assert mounted.run("cat /scratch/from-host.txt").stdout == "the host wrote this\n"
    (rw / "from-host.txt").unlink()
    assert mounted.run("test -e /scratch/from-host.txt; echo $?").stdout == "1\n"


@needs_image
def test_mounts_are_in_info_and_qemu_serves_them_as_the_owner(mounted: SmolVM, folders: tuple[Path, Path]) -> None:
    ro, rw = folders
    assert mounted.info()["mounts"] == [
        {"host": str(ro), "guest": "/data", "writable": False},
        {"host": str(rw), "guest": "/scratch", "writable": True},
    ]
    shown = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "info", mounted.vm_id], capture_output=True, text=True, timeout=60
    ).stdout
    assert f"{ro} -> /data (read-only)" in shown and f"{rw} -> /scratch (rw)" in shown
    if jail.wanted() and jail.blocker() is None:
        pid = mounted.info()["pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}" in status
        assert "Seccomp:\t2" in status and "CapEff:\t0000000000000000" in status


@needs_image
def test_a_sandbox_with_mounts_restarts_with_them(mounted: SmolVM, folders: tuple[Path, Path]) -> None:
    _, rw = folders
    mounted.stop()
    (rw / "while-stopped.txt").write_text("seen after the restart\n")
    mounted.start()
    assert mounted.boot_timings["resumed_template"] == 0.0  # its own disk boots cold
    assert mounted.run("cat /scratch/while-stopped.txt").stdout == "seen after the restart\n"


@needs_image
def test_a_new_sandbox_with_a_mount_starts_from_a_template(folders: tuple[Path, Path]) -> None:
    ro, _ = folders
    with SmolVM(mounts=[Mount(ro, "/data")]) as vm:
        assert vm.boot_timings["resumed_template"] == 1.0
        assert vm.run("cat /data/hello.txt").stdout == "hello from the host\n"
        assert vm.run("hostname").stdout.strip() == vm.vm_id


@needs_image
def test_the_cli_mounts_and_refuses_bad_mounts_without_a_traceback(folders: tuple[Path, Path]) -> None:
    ro, _ = folders
    ok = subprocess.run(
        [str(SMOLVM_BIN), "run", "--mount", f"{ro}:/in", "--", "cat", "/in/hello.txt"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (ok.returncode, ok.stdout) == (0, "hello from the host\n"), ok.stderr
    before = SmolVM.list()
    for bad in (f"{ro}/nope", "/", f"{ro}:/in:rw:x", f"{ro}:/in --mount {ro}:/in"):
        args = [a for part in bad.split(" --mount ") for a in ("--mount", part)]
        proc = subprocess.run(
            [str(SMOLVM_BIN), "sandbox", "create", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1 and proc.stderr.startswith("error:"), proc.stderr
        assert "Traceback" not in proc.stderr
    assert [r.id for r in SmolVM.list()] == [r.id for r in before]  # nothing made, nothing lost
