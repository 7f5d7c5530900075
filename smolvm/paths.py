"""Where SmolVM keeps its files: one data directory, overridable by SMOLVM_DATA_DIR."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import platformdirs

from .exceptions import HostError


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` in one step: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; leave room for the name


def data_dir() -> Path:
    env = os.environ.get("SMOLVM_DATA_DIR")
    # Absolute: QEMU runs in / and is handed these paths.
    path = (Path(env).expanduser() if env else Path(platformdirs.user_data_dir("smolvm"))).absolute()
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)  # sandbox disks and transfers are the user's data
    return path


def images_dir() -> Path:
    return data_dir() / "images"


def sandboxes_dir() -> Path:
    return data_dir() / "sandboxes"


def sandbox_dir(vm_id: str) -> Path:
    return sandboxes_dir() / vm_id


def runtime_base() -> Path:
    """Where sockets go when the data directory's path is too long for them."""
    return Path("/tmp") / f"smolvm-{os.getuid()}"


def runtime_dir(vm_id: str, create: bool = True) -> Path:
    """A directory for the sandbox's unix sockets, short enough for sun_path."""
    path = sandbox_dir(vm_id)
    if len(str(path / "agent.sock")) > SOCKET_PATH_MAX:
        digest = hashlib.sha256(str(data_dir()).encode()).hexdigest()[:12]
        base = runtime_base()
        path = base / f"{digest}-{vm_id}"
        if not create:
            return path
        base.mkdir(mode=0o700, exist_ok=True)
        # /tmp is shared: refuse a directory (or link) someone else made.
        st = base.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise HostError(f"{base} is not this user's directory: remove it, or set a shorter SMOLVM_DATA_DIR")
        if st.st_mode & 0o077:
            base.chmod(0o700)
    if create:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
