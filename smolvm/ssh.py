"""SSH into a sandbox with keys the host made, and the host key pinned: no trust on first use.

Per sandbox, in ``<sandbox dir>/ssh/``: the guest's host key (the host made
it and put it in the guest), the client key, and a known_hosts file holding
only the guest's host key, under the alias ``smolvm-<id>``. sshd runs in the
guest from a config file of ours, started on first use; the host reaches it
through a forward QEMU adds on 127.0.0.1 only. A server that shows any other
key is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import secrets
import select
import shlex
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import protocol as P
from .agent_client import partial_file
from .exceptions import (
    GuestError,
    GuestFileNotFoundError,
    HostError,
    OperationTimeoutError,
    OutputLimitError,
    ValidationError,
)

USER = "root"
GUEST_PORT = 22
GUEST_HOST_KEY = "/etc/ssh/smolvm_host_ed25519_key"
GUEST_AUTHORIZED_KEYS = "/etc/ssh/smolvm_authorized_keys"
GUEST_CONFIG = "/etc/ssh/smolvm_sshd_config"
ENV_FILE = "/etc/profile.d/zz-smolvm-env.sh"  # the agent's persisted variables (login shells read it)

SSHD_CONFIG = f"""\
# Written by smolvm. Keys were made by the host; no passwords.
Port {GUEST_PORT}
HostKey {GUEST_HOST_KEY}
PidFile /run/smolvm-sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {GUEST_AUTHORIZED_KEYS}
UseDNS no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""

# Run in the guest once the files are there: (re)start our sshd and wait until it
# listens (it writes its pid file after binding; it forks before that).
START_SSHD = (
    f"chmod 600 {GUEST_HOST_KEY} && mkdir -p /run/sshd && touch {ENV_FILE} && "
    "{ [ ! -e /run/smolvm-sshd.pid ] || kill $(cat /run/smolvm-sshd.pid) 2>/dev/null || true; } && "
    f"rm -f /run/smolvm-sshd.pid && /usr/sbin/sshd -f {GUEST_CONFIG} && "
    "for i in $(seq 200); do [ -s /run/smolvm-sshd.pid ] && exit 0; sleep 0.05; done; "
    "echo 'sshd did not come up' >&2; exit 1"
)
# paramiko logs a failed handshake from its own thread; the caller gets our error instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


@dataclass(frozen=True)
class Keys:
    dir: Path

    @property
    def host_key(self) -> Path:
        return self.dir / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    def host_public(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.host_key))


def alias(vm_id: str) -> str:
    """The name the pinned key is filed under in known_hosts, whatever port the forward has."""
    return f"smolvm-{vm_id}"


def _new_key(path: Path) -> str:
    """Write a fresh Ed25519 private key (OpenSSH format, 0600) and return its public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode()


def make_keys(directory: Path, vm_id: str) -> Keys:
    """The sandbox's keys and files for the guest, made once."""
    keys = Keys(directory)
    if keys.known_hosts.exists():
        return keys
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_public = _new_key(keys.host_key)
    client_public = _new_key(keys.client_key)
    (directory / "client_ed25519.pub").write_text(client_public + "\n")
    keys.authorized_keys.write_text(client_public + "\n")
    keys.sshd_config.write_text(SSHD_CONFIG)
    keys.known_hosts.write_text(f"{alias(vm_id)} {host_public}\n")  # written last: marks the set complete
    return keys


def read_state(keys: Keys) -> dict[str, Any]:
    try:
        data = json.loads(keys.state.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ssh_argv(vm_id: str, keys: Keys, port: int) -> list[str]:
    """An ``ssh`` command line that trusts only the pinned key."""
    return [
        "ssh",
        "-i", str(keys.client_key),
        "-p", str(port),
        "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={keys.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"HostKeyAlias={alias(vm_id)}",
        "-o", "LogLevel=ERROR",
        f"{USER}@127.0.0.1",
    ]  # fmt: skip


def commands(vm_id: str, keys: Keys, port: int) -> dict[str, Any]:
    argv = ssh_argv(vm_id, keys, port)
    options = argv[1:-1]
    scp_options = ["-P" if o == "-p" else o for o in options]
    return {
        "ssh": shlex.join(argv),
        "scp": shlex.join(["scp", *scp_options]) + f" LOCAL {USER}@127.0.0.1:REMOTE",
        "rsync": "rsync -e " + shlex.quote(shlex.join(["ssh", *options])) + f" LOCAL {USER}@127.0.0.1:REMOTE",
        "host": "127.0.0.1",
        "port": port,
        "user": USER,
        "identity_file": str(keys.client_key),
        "known_hosts": str(keys.known_hosts),
        "host_key_alias": alias(vm_id),
    }


def connect(vm_id: str, keys: Keys, port: int, timeout: float = 15) -> paramiko.SSHClient:
    """A paramiko client that accepts the pinned host key and nothing else."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{port}", "ssh-ed25519", keys.host_public())
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            "127.0.0.1",
            port=port,
            username=USER,
            key_filename=str(keys.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except paramiko.BadHostKeyException:
        client.close()
        raise HostError(
            f"sandbox {vm_id!r}: the SSH server on 127.0.0.1:{port} presented a host key other than the one "
            "smolvm made for this sandbox; refusing to connect (something else may be answering on that port)"
        ) from None
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise HostError(f"sandbox {vm_id!r}: could not connect over SSH to 127.0.0.1:{port}: {exc}") from None
    return client


def run(
    client: paramiko.SSHClient,
    cmd: str,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    max_output: int,
    on_output: Callable[[int, bytes], None] | None = None,
    stdin: BinaryIO | None = None,
) -> tuple[int, bytes, bytes]:
    """``cmd`` with bash over an SSH session: (exit code, stdout, stderr). The guest's
    ``timeout`` kills the command's process group when time is up."""
    # The sandbox's persisted variables, as a command over the agent sees them.
    words = [f". {ENV_FILE} 2>/dev/null;"]
    words += [f"export {k}={shlex.quote(v)};" for k, v in (env or {}).items()]
    if cwd:
        words.append(f"cd {shlex.quote(cwd)} &&")
    words.append(f"exec timeout -s KILL {timeout:g} bash -c {shlex.quote(cmd)}")
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise HostError("the SSH connection to the sandbox is closed")
    started = time.monotonic()
    deadline = started + timeout + 15
    chan = transport.open_session(timeout=15)
    try:
        chan.exec_command(" ".join(words))
        feeder = threading.Thread(target=_feed, args=(chan, stdin), daemon=True)
        feeder.start()
        out: dict[int, list[bytes]] = {P.STDOUT: [], P.STDERR: []}
        total = 0
        while True:
            finished = chan.exit_status_ready() and chan.eof_received  # before the reads: nothing can follow
            got = False
            for channel, ready, recv in (
                (P.STDOUT, chan.recv_ready, chan.recv),
                (P.STDERR, chan.recv_stderr_ready, chan.recv_stderr),
            ):
                while ready():
                    data = recv(P.CHUNK)
                    got = True
                    total += len(data)
                    if total > max_output:
                        raise OutputLimitError(
                            f"the command wrote more than {max_output} bytes of output and was stopped; "
                            "redirect its output to a file in the sandbox and download that instead"
                        )
                    out[channel].append(data)
                    if on_output is not None:
                        on_output(channel, data)
            if finished:
                break
            if got:
                continue
            if time.monotonic() > deadline:
                raise OperationTimeoutError(f"command timed out after {timeout:g}s over SSH: {cmd!r}")
            select.select([chan], [], [], 0.1)
        code = chan.recv_exit_status()
    finally:
        chan.close()
    # The guest's ``timeout`` kills its own group too, so the session ends by a
    # signal and reports no exit status (paramiko says -1).
    if code in (-1, 128 + 9) and time.monotonic() - started >= timeout:
        raise OperationTimeoutError(
            f"command timed out after {timeout:g}s and was killed (the sandbox is still usable): {cmd!r}"
        )
    return (255 if code < 0 else code), b"".join(out[P.STDOUT]), b"".join(out[P.STDERR])


def _feed(chan: paramiko.Channel, source: BinaryIO | None) -> None:
    read = getattr(source, "read1", None) or getattr(source, "read", None)
    try:
        while read is not None:
            chunk = read(P.CHUNK)
            if not chunk:
                break
            chan.sendall(chunk)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command ended first; its result says how


def upload(client: paramiko.SSHClient, local: Path, guest: str, timeout: float) -> None:
    """Copy a host file into the guest over SFTP: written beside the target, then renamed."""
    parent, name = posixpath.split(guest)
    code, _, err = run(client, f"mkdir -p {shlex.quote(parent or '/')}", 30, max_output=1 << 16)
    if code != 0:
        raise ValidationError(f"upload to {guest} failed: {err.decode(errors='replace').strip()[:500]}")
    tmp = posixpath.join(parent, f".{name}.smolvm-upload-{secrets.token_hex(4)}")
    with client.open_sftp() as sftp:
        sftp.get_channel().settimeout(timeout)
        try:
            sftp.put(str(local), tmp)
            sftp.chmod(tmp, local.stat().st_mode & 0o777)
            sftp.posix_rename(tmp, guest)
        except BaseException:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise


def download(client: paramiko.SSHClient, guest: str, local: Path, timeout: float, max_size: int) -> None:
    """Copy a guest file to the host over SFTP; on failure no partial file is left.
    The guest's sftp-server is not trusted: no more than the size it announced
    (itself bounded, and within the free space here) is taken."""
    deadline = time.monotonic() + timeout
    with client.open_sftp() as sftp:
        sftp.get_channel().settimeout(min(timeout, 60))
        try:
            st = sftp.stat(guest)
        except FileNotFoundError:
            raise GuestFileNotFoundError(f"download of {guest} failed: it does not exist in the sandbox") from None
        size = st.st_size
        if st.st_mode is None or not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"download of {guest} failed: it is not a regular file")
        if size is None or not 0 <= size <= max_size:
            raise GuestError(f"the sandbox's sftp-server announced a bad size {size!r} for {guest}")
        with partial_file(local, size, guest) as f, sftp.open(guest, "rb") as remote:
            got = 0
            while True:
                data = remote.read(min(P.CHUNK, size - got + 1))
                if not data:
                    break
                got += len(data)
                if got > size:
                    raise GuestError(f"the sandbox sent more than the {size} bytes of {guest}")
                f.write(data)
                if time.monotonic() > deadline:
                    raise OperationTimeoutError(f"download of {guest} did not finish in {timeout:g}s")
