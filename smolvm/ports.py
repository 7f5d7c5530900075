"""Ports the host forwards into a sandbox, on 127.0.0.1 only, and their record.

QEMU's user-mode network adds and removes a forward on a running machine
(``hostfwd_add`` / ``hostfwd_remove`` over QMP); the record in the sandbox's
directory lets any process list them. It belongs to one run of the
hypervisor (its pid): forwards go when the machine stops, and so does the
record's meaning.
"""

from __future__ import annotations

import builtins
import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .exceptions import ValidationError
from .paths import sandbox_dir, write_json
from .types import VMState

if TYPE_CHECKING:
    from .sandbox import SmolVM


@dataclass(frozen=True)
class ExposedPort:
    host_port: int  # on the host's 127.0.0.1
    guest_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"


def check_port(port: object, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValidationError(f"{what} must be a port number from 1 to 65535, not {port!r}")
    return port


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now (QEMU binds it next; a race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_use(port: int) -> bool:
    """Whether something on this host already holds 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def load(path: Path, pid: int | None) -> list[ExposedPort]:
    """The forwards recorded for the machine running as ``pid`` (none for another run)."""
    try:
        data = json.loads(path.read_text())
        if data.get("pid") != pid or pid is None:
            return []
        return [ExposedPort(int(p["host_port"]), int(p["guest_port"])) for p in data["ports"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def save(path: Path, pid: int | None, ports: list[ExposedPort]) -> None:
    write_json(path, {"pid": pid, "ports": [asdict(p) for p in sorted(ports, key=lambda p: p.host_port)]})


class Ports:
    """Ports of the sandbox reachable from this host's 127.0.0.1: ``vm.ports``
    (``SmolVM.expose_local``, ``unexpose_local`` and ``list_exposed`` call these)."""

    def __init__(self, vm: SmolVM) -> None:
        self._vm = vm

    def _file(self) -> Path:
        return sandbox_dir(self._vm.vm_id) / "ports.json"

    def expose(self, guest_port: int, host_port: int | None = None) -> int:
        """Make ``guest_port`` in the sandbox reachable at 127.0.0.1:``host_port`` on this host
        (a free port unless given; never another address) and return the host port.
        Added on the running sandbox; gone when it stops."""
        check_port(guest_port, "guest_port")
        if host_port is not None:
            check_port(host_port, "host_port")
        record = self._vm._require(VMState.RUNNING, "expose a port of")
        with self._vm._locked(sandbox_dir(self._vm.vm_id) / "ports.lock", "changing its ports", 30):
            current = load(self._file(), record.pid)
            if host_port is not None and any(p.host_port == host_port for p in current):
                raise ValidationError(f"127.0.0.1:{host_port} is already exposed for this sandbox")
            port = self._vm._forward(self._vm._spec(record), guest_port, host_port)
            save(self._file(), record.pid, [*current, ExposedPort(port, guest_port)])
        return port

    def close(self, host_port: int) -> None:
        """Stop forwarding 127.0.0.1:``host_port`` into the sandbox."""
        check_port(host_port, "host_port")
        record = self._vm._refresh()
        with self._vm._locked(sandbox_dir(self._vm.vm_id) / "ports.lock", "changing its ports", 30):
            current = load(self._file(), record.pid)
            if not any(p.host_port == host_port for p in current):
                raise ValidationError(
                    f"127.0.0.1:{host_port} is not exposed for sandbox {self._vm.vm_id!r} "
                    "('smolvm sandbox port list NAME' shows what is)"
                )
            self._vm._backend.unforward(self._vm._spec(record), host_port)
            save(self._file(), record.pid, [p for p in current if p.host_port != host_port])

    def list(self) -> builtins.list[ExposedPort]:
        """The ports exposed with ``expose`` on the running sandbox."""
        record = self._vm._refresh()
        if record.state not in (VMState.RUNNING, VMState.PAUSED):
            return []
        return load(self._file(), record.pid)
