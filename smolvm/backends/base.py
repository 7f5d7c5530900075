"""What a hypervisor backend does for a sandbox. QEMU is the first; others plug in here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one sandbox's machine."""

    vm_id: str
    kernel: Path
    initrd: Path
    disk: Path
    memory: int  # MiB
    vcpus: int
    accel: str  # "kvm" or "tcg"
    agent_socket: Path
    control_socket: Path
    pidfile: Path
    resize_disk: bool = False
    transfer_disk: Path | None = None  # a raw file the guest sees as a disk, for bulk file transfer
    incoming: Path | None = None  # a saved machine state to resume instead of booting


class Backend(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> int:
        """Start the machine detached from this process; return its pid once it runs
        (with ``spec.incoming``: once the saved state is loaded and the machine resumed)."""

    def save(self, spec: LaunchSpec, dest: Path) -> None:
        """Stop the machine and write its whole state (memory, devices) to ``dest``."""

    def owns(self, spec: LaunchSpec, pid: int) -> bool:
        """Whether ``pid`` is this sandbox's hypervisor process (not a reused pid)."""

    def pause(self, spec: LaunchSpec) -> None: ...

    def resume(self, spec: LaunchSpec) -> None: ...

    def console(self, spec: LaunchSpec) -> bytes:
        """Console output produced since the last call (bounded)."""

    def stop(self, spec: LaunchSpec, pid: int | None, timeout: float = 5.0) -> None:
        """End the machine; kill its process if it does not go in time."""
