"""The QEMU backend's pure parts: command line, kernel command line, TSC rate."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from smolvm import protocol
from smolvm.backends.base import LaunchSpec
from smolvm.backends.qemu import QemuBackend, kernel_cmdline, pid_alive, qemu_argv, tsc_khz
from smolvm.mounts import Mount


@pytest.fixture
def spec(tmp_path: Path) -> LaunchSpec:
    return LaunchSpec(
        vm_id="box-1",
        kernel=tmp_path / "img" / "vmlinuz",
        initrd=tmp_path / "img" / "initrd.img",
        memory=768,
        vcpus=2,
        accel="tcg",
        home=tmp_path / "sb",
        runtime=tmp_path / "run",
        transfer=False,
    )


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_argv_basics(spec: LaunchSpec) -> None:
    argv = qemu_argv(spec, binary="/usr/bin/qemu-x", khz=2_000_000)
    assert argv[0] == "/usr/bin/qemu-x"
    assert opt(argv, "-name") == ["smolvm-box-1"]
    assert opt(argv, "-M") == ["microvm,accel=tcg"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-m") == ["768"]
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-kernel") == [str(spec.kernel)]
    assert opt(argv, "-initrd") == [str(spec.initrd)]
    assert opt(argv, "-append") == [kernel_cmdline(spec, 2_000_000)]
    assert "-daemonize" not in argv  # QEMU starts no process, not even its own daemon
    assert "-nodefaults" in argv
    assert "-no-reboot" in argv


def test_argv_kvm_uses_host_cpu(spec: LaunchSpec) -> None:
    argv = qemu_argv(replace(spec, accel="kvm"))
    assert opt(argv, "-M") == ["microvm,accel=kvm"]
    assert opt(argv, "-cpu") == ["host"]


def test_argv_wires_disk_agent_and_control(spec: LaunchSpec) -> None:
    argv = qemu_argv(spec)
    drives = opt(argv, "-drive")
    assert len(drives) == 1
    assert f"file={spec.disk}" in drives[0].split(",")
    assert "format=qcow2" in drives[0].split(",")
    chardevs = opt(argv, "-chardev")
    devices = opt(argv, "-device")
    assert len(spec.agent_sockets) == protocol.PORTS
    for i, sock in enumerate(spec.agent_sockets):
        assert f"socket,id=agent{i},path={sock},server=on,wait=off" in chardevs
        assert f"virtserialport,chardev=agent{i},name={protocol.PORT_NAME}.{i}" in devices
    assert len(set(spec.agent_sockets)) == protocol.PORTS
    assert f"virtio-serial-device,max_ports={protocol.PORTS + 2}" in devices  # a console's port 0, the net port
    assert f"socket,id=net,path={spec.net_socket},server=on,wait=off" in chardevs
    net = devices.index(f"virtserialport,chardev=net,name={protocol.NET_PORT_NAME}")
    assert net == devices.index(f"virtserialport,chardev=agent{protocol.PORTS - 1},name={protocol.PORT_NAME}.7") + 1
    assert any(d.startswith("virtio-blk-device") for d in devices)
    assert opt(argv, "-qmp") == [f"unix:{spec.control_socket},server=on,wait=off"]


def test_argv_is_a_list_of_strings(spec: LaunchSpec) -> None:
    argv = qemu_argv(spec)
    assert all(isinstance(a, str) for a in argv)


def test_argv_keeps_paths_with_spaces_as_one_word(spec: LaunchSpec, tmp_path: Path) -> None:
    odd = replace(spec, kernel=tmp_path / "my images" / "vmlinuz")
    assert opt(qemu_argv(odd), "-kernel") == [str(tmp_path / "my images" / "vmlinuz")]


def test_backend_recognises_its_process_by_control_socket(spec: LaunchSpec) -> None:
    """owns() matches the QMP socket in the process's command line, guarding against pid reuse."""
    backend = QemuBackend()
    assert not backend.owns(spec, os.getpid())
    assert not backend.owns(spec, 2**22 + 12345)  # no such pid


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(2**22 + 12345)


# -- kernel command line ------------------------------------------------------


def test_cmdline_tcg(spec: LaunchSpec) -> None:
    args = kernel_cmdline(spec, 2_400_000).split()
    assert "console=ttyS0" in args
    assert "smolvm.hostname=box-1" in args
    assert "tsc=reliable" in args
    assert "tsc_early_khz=2400000" in args
    assert "smolvm.resize=1" not in args


def test_cmdline_tcg_without_khz(spec: LaunchSpec) -> None:
    args = kernel_cmdline(spec, None).split()
    assert "tsc=reliable" in args
    assert not any(a.startswith("tsc_early_khz") for a in args)


def test_cmdline_kvm_has_no_tsc_hints(spec: LaunchSpec) -> None:
    args = kernel_cmdline(replace(spec, accel="kvm"), 2_400_000).split()
    assert not any(a.startswith("tsc") for a in args)
    assert "smolvm.hostname=box-1" in args


def test_cmdline_resize(spec: LaunchSpec) -> None:
    assert "smolvm.resize=1" in kernel_cmdline(replace(spec, resize_disk=True), None).split()


def test_cmdline_has_no_duplicate_keys(spec: LaunchSpec) -> None:
    args = kernel_cmdline(replace(spec, resize_disk=True), 1000).split()
    keys = [a.split("=")[0] for a in args]
    assert len(keys) == len(set(keys))


# -- tsc_khz ------------------------------------------------------------------


def test_tsc_khz_parses_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.40GHz\n"
        "cpu MHz\t\t: 2399.998\ncache size\t: 36608 KB\n\nprocessor\t: 1\ncpu MHz\t\t: 1200.000\n"
    )
    assert tsc_khz(cpuinfo) == 2_399_998  # the first CPU's


@pytest.mark.parametrize(
    "text", ["", "processor\t: 0\nmodel name\t: x\n", "cpu MHz\t\t: fast\n", "cpu MHz\n", "cpu MHz\t\t:\n"]
)
def test_tsc_khz_unparseable(tmp_path: Path, text: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert tsc_khz(cpuinfo) is None


def test_tsc_khz_missing_file(tmp_path: Path) -> None:
    assert tsc_khz(tmp_path / "nope") is None


def test_tsc_khz_of_this_host_is_plausible() -> None:
    khz = tsc_khz()
    if khz is not None:
        assert 100_000 < khz < 10_000_000


def test_transfer_disk_comes_after_the_root_disk(spec: LaunchSpec, tmp_path: Path) -> None:
    TRANSFER_SERIAL = protocol.TRANSFER_SERIAL

    plain = qemu_argv(spec)
    assert not any("xfer" in a for a in plain)
    argv = qemu_argv(replace(spec, transfer=True))
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]]
    assert devices == ["virtio-blk-device,drive=root", f"virtio-blk-device,drive=xfer,serial={TRANSFER_SERIAL}"]
    assert f"id=xfer,file={spec.home / 'transfer.img'},format=raw,if=none,cache=writeback,auto-read-only=off" in argv


def test_network_is_closed_user_mode(spec: LaunchSpec) -> None:
    """slirp with restrict=on: the guest reaches nothing; no TAP, nothing needing root."""
    argv = qemu_argv(spec)
    netdevs = opt(argv, "-netdev")
    assert len(netdevs) == 1
    fields = netdevs[0].split(",")
    assert fields[0] == "user"
    assert "restrict=on" in fields
    assert not any(f.startswith("hostfwd") for f in fields)  # forwards are added at run time, on 127.0.0.1
    assert "virtio-net-device,netdev=net0" in opt(argv, "-device")


def test_a_state_qemu_dies_loading_is_a_host_error(spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU exiting while it loads a saved state resets QMP under us: that must read as
    'could not load' (HostError), which start() answers with a cold boot."""
    from smolvm.backends import qemu as qemu_mod
    from smolvm.exceptions import HostError, SmolVMError

    def reset(*args: object, **kwargs: object) -> object:
        raise SmolVMError("QEMU refused 'query-status': Connection reset by peer")

    stopped: list[int | None] = []
    monkeypatch.setattr(qemu_mod, "qmp", reset)
    backend = QemuBackend()
    monkeypatch.setattr(backend, "stop", lambda spec, pid, timeout=5.0: stopped.append(pid))
    with pytest.raises(HostError, match="could not load the saved sandbox state"):
        backend._resume_incoming(spec, 4242)
    assert stopped == [4242]


def test_qemu_may_start_no_process(spec: LaunchSpec) -> None:
    """Its seccomp filter denies spawn and privilege changes, so nothing may need them:
    a saved state comes in through an inherited descriptor, not an exec: command."""
    argv = qemu_argv(replace(spec, incoming=spec.home / "state.bin"), incoming_fd=7)
    sandbox = opt(argv, "-sandbox")[0].split(",")
    for rule in ("on", "obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
        assert rule in sandbox
    assert opt(argv, "-incoming") == ["fd:7"]
    assert not any(a.startswith(("exec:", "cmd:")) or ",cmd=" in a for a in argv)
    assert "-incoming" not in qemu_argv(spec)


def test_a_resumed_machine_loads_no_kernel(spec: LaunchSpec) -> None:
    """The saved state brings the guest's memory, kernel included: reading and placing a
    66 MB kernel that the state then overwrites was 0.05-0.1 s of every template start."""
    resumed = qemu_argv(replace(spec, incoming=spec.home / "state.bin"), incoming_fd=7)
    assert not {"-kernel", "-initrd", "-append"} & set(resumed)
    assert {"-kernel", "-initrd", "-append"} <= set(qemu_argv(spec))
    shares = qemu_argv(replace(spec, mounts=(Mount(spec.home, "/data"),)))
    assert shares.index("virtio-9p-device,fsdev=share0,mount_tag=smolvm0") > shares.index("virtio-rng-device")
