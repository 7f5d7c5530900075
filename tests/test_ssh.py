"""SSH into a real sandbox: keys the host made, the host key pinned, 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import shlex
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, listening_addresses

from smolvm import SmolVM, ssh
from smolvm.exceptions import GuestFileNotFoundError, HostError, OperationTimeoutError, ValidationError

# -- pure parts -----------------------------------------------------------------


def test_keys_are_private_and_known_hosts_pins_the_host_key(tmp_path: Path) -> None:
    keys = ssh.make_keys(tmp_path / "ssh", "box-1")
    for private in (keys.host_key, keys.client_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    line = keys.known_hosts.read_text().split()
    assert line[0] == "smolvm-box-1" and line[1] == "ssh-ed25519"
    assert line[2] == keys.host_public().get_base64()
    assert "PasswordAuthentication no" in keys.sshd_config.read_text()
    # Made once: a second call keeps the same keys.
    assert ssh.make_keys(tmp_path / "ssh", "box-1").host_public() == keys.host_public()
    other = ssh.make_keys(tmp_path / "other", "box-2")
    assert other.host_public() != keys.host_public()


def test_command_lines_trust_only_the_pinned_key(tmp_path: Path) -> None:
    keys = ssh.make_keys(tmp_path / "ssh", "box-1")
    lines = ssh.commands("box-1", keys, 40022)
    argv = shlex.split(lines["ssh"])
    assert argv[0] == "ssh" and argv[-1] == "root@127.0.0.1"
    assert "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={keys.known_hosts}" in argv
    assert "HostKeyAlias=smolvm-box-1" in argv
    assert argv[argv.index("-p") + 1] == "40022"
    assert "-P 40022" in lines["scp"]
    assert lines["port"] == 40022 and lines["host"] == "127.0.0.1"


def test_unknown_comm_channel() -> None:
    with pytest.raises(ValidationError, match="comm_channel"):
        SmolVM(comm_channel="telnet")


# -- a real sandbox ---------------------------------------------------------------


@pytest.fixture
def box(vm: SmolVM) -> SmolVM:
    """The module's own sandbox (conftest's ``vm``): the last test here breaks its SSH."""
    return vm


@pytest.mark.vm
def test_ssh_command_line_runs_with_the_pinned_key(box: SmolVM) -> None:
    lines = box.ssh_commands()
    proc = subprocess.run(
        [*shlex.split(lines["ssh"]), "echo over-ssh; hostname"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"over-ssh\n{box.vm_id}\n"
    assert listening_addresses(lines["port"]) == ["0100007F"]  # 127.0.0.1, nothing else
    assert box.ssh_commands()["port"] == lines["port"]  # set up once per boot


@pytest.mark.vm
def test_run_and_files_over_ssh(box: SmolVM, tmp_path: Path) -> None:
    over = SmolVM.from_id(box.vm_id, comm_channel="ssh")
    result = over.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    box.set_env_vars({"PERSISTED": "yes"})
    assert over.run("echo $PERSISTED $X; pwd", cwd="/tmp", env={"X": "1"}).stdout == "yes 1\n/tmp\n"
    assert over.run("wc -c", stdin=b"z" * 300_000).stdout == "300000\n"
    local = tmp_path / "up.bin"
    local.write_bytes(bytes(range(256)) * 4000)
    over.upload_file(local, "/root/ssh-dir/up.bin")
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    assert box.run("sha256sum /root/ssh-dir/up.bin").stdout.split()[0] == digest
    back = tmp_path / "back.bin"
    over.download_file("/root/ssh-dir/up.bin", back)
    assert back.read_bytes() == local.read_bytes()
    with pytest.raises(GuestFileNotFoundError):
        over.download_file("/root/no-such-file", tmp_path / "x")
    started = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        over.run("sleep 30", timeout=2)
    assert time.monotonic() - started < 20
    assert over.run("echo usable").stdout == "usable\n"


@pytest.mark.vm
def test_cli_ssh(box: SmolVM) -> None:
    printed = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "ssh", "--print", box.vm_id], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0 and "StrictHostKeyChecking=yes" in printed.stdout
    proc = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "ssh", box.vm_id, "--", "echo", "a b"], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (0, "a b\n")


@pytest.mark.vm
def test_a_changed_host_key_is_refused(box: SmolVM) -> None:
    """The guest's sshd given another key (a man in the middle, in effect): both paramiko
    and the printed ssh command line refuse, loudly. Last in the module: it breaks SSH."""
    lines = box.ssh_commands()
    box.run(
        f"rm -f {ssh.GUEST_HOST_KEY} && ssh-keygen -q -t ed25519 -N '' -f {ssh.GUEST_HOST_KEY} && "
        "kill -HUP $(cat /run/smolvm-sshd.pid) && sleep 1"
    )
    with pytest.raises(HostError, match="host key other than the one smolvm made"):
        SmolVM.from_id(box.vm_id, comm_channel="ssh").run("true")
    proc = subprocess.run([*shlex.split(lines["ssh"]), "true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr
