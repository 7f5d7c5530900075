"""Ports the host forwards into a sandbox, on 127.0.0.1 only, and their record.

QEMU's user-mode network adds and removes a forward on a running machine
(``hostfwd_add`` / ``hostfwd_remove`` over QMP); the record in the sandbox's
directory lets any process list them. It belongs to one run of the
hypervisor (its pid): forwards go when the machine stops, and so does the
record's meaning.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from .exceptions import ValidationError
from .paths import write_json


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
