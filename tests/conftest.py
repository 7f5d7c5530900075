"""Test-session isolation and shared sandboxes.

Every session gets its own SMOLVM_DATA_DIR (state.db, sandboxes, accel
cache) so tests never see or touch anyone else's sandboxes. The built image
is large and slow to build, so the session's ``images`` is a symlink to the
real images directory, found before SMOLVM_DATA_DIR is overridden.

This runs at import time, before any test module imports smolvm, and the
environment is inherited by the CLI and ``python -c`` subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import pytest

REAL_DATA_DIR = Path(os.environ.get("SMOLVM_DATA_DIR") or platformdirs.user_data_dir("smolvm")).expanduser()
REAL_IMAGES_DIR = REAL_DATA_DIR / "images"

SESSION_DATA_DIR = Path(tempfile.mkdtemp(prefix="smolvm-test-"))
(SESSION_DATA_DIR / "images").symlink_to(REAL_IMAGES_DIR, target_is_directory=True)
os.environ["SMOLVM_DATA_DIR"] = str(SESSION_DATA_DIR)
# This host's KVM cannot run a guest; skip the ~8 s probe. tests/backends/test_accel.py
# unsets it where the probe itself is under test.
os.environ["SMOLVM_ACCEL"] = "tcg"
# Deterministic CLI output width (rich wraps at COLUMNS when set).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

REPO = Path(__file__).resolve().parent.parent
SMOLVM_BIN = REPO / ".venv" / "bin" / "smolvm"
PYTHON = Path(sys.executable)


# Tests that need the built image count as VM tests: the quick set (-m "not vm")
# runs without an image, and the full suite fails loudly, never skips, without one.
needs_image = pytest.mark.vm


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Safety net: no QEMU process or files outlive the session."""
    try:
        from smolvm import SmolVM

        for record in SmolVM.list():
            try:
                SmolVM.from_id(record.id).delete()
            except Exception as exc:
                print(f"\nconftest: could not delete leftover sandbox {record.id}: {exc}", file=sys.stderr)
    finally:
        if Path(os.environ.get("SMOLVM_DATA_DIR", "")) == SESSION_DATA_DIR:
            (SESSION_DATA_DIR / "images").unlink(missing_ok=True)  # never follow the link into real images
            shutil.rmtree(SESSION_DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return SESSION_DATA_DIR


@pytest.fixture(scope="module")
def vm() -> Iterator[object]:
    """One running sandbox shared by a test module; deleted at its end."""
    from smolvm import SmolVM

    sandbox = SmolVM()
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.delete()


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate Python process with this session's environment."""
    return subprocess.run(
        [str(PYTHON), "-c", code], capture_output=True, text=True, timeout=timeout, env=os.environ.copy(), check=False
    )


def qemu_pid_gone(pid: int, vm_id: str) -> bool:
    """True when ``pid`` is no longer sandbox ``vm_id``'s QEMU (gone, or a zombie nobody reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state == "Z" or f"smolvm-{vm_id}".encode() not in cmdline.split(b"\0")


def listening_addresses(port: int) -> list[str]:
    """The local addresses this host listens on at ``port``, as /proc/net/tcp{,6} spell them
    (127.0.0.1 is 0100007F)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


@pytest.fixture
def scratch_images() -> Iterator[list[str]]:
    """Names for this test's images, and everything its builds leave removed after it."""
    from smolvm import templates
    from smolvm.images import layers
    from smolvm.images.store import ImageStore

    store = ImageStore()
    before = set(os.listdir(layers.layers_dir())) if layers.layers_dir().is_dir() else set()
    names: list[str] = []
    yield names
    for name in names:
        shutil.rmtree(store.root / name, ignore_errors=True)
    for entry in set(os.listdir(layers.layers_dir())) - before if layers.layers_dir().is_dir() else set():
        shutil.rmtree(layers.layers_dir() / entry, ignore_errors=True)
    templates.prune({v.name for n in store.names() for v in (store.root / n).iterdir() if not v.is_symlink()})
