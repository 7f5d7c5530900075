"""What a hypervisor backend does for a sandbox. QEMU is the first; others plug in here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import protocol

if TYPE_CHECKING:
    from ..mounts import Mount


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one sandbox's machine."""

    vm_id: str
    kernel: Path
    initrd: Path
    memory: int  # MiB
    vcpus: int
    accel: str  # "kvm" or "tcg"
    home: Path  # the machine's files: disk.qcow2, transfer.img
    runtime: Path  # its sockets (a short path: unix socket paths are limited)
    resize_disk: bool = False
    transfer: bool = True  # give it a transfer disk for bulk file transfer
    incoming: Path | None = None  # a saved machine state to resume instead of booting
    # A file that holds the guest's memory: mapped private (copy-on-write, its pages
    # shared with every other machine mapping it), the state then holding the devices
    # only; with ram_fill, a new file the loaded state's memory is written into.
    ram: Path | None = None
    ram_fill: bool = False
    hold: bool = False  # with ``incoming``: leave the loaded machine paused, to be saved again
    mounts: tuple[Mount, ...] = ()  # host folders shared in (smolvm/mounts.py)
    cpu_limit: float | None = None  # cores QEMU may use in all; None: as many as it has vCPUs
    pid_file: Path | None = None  # written with the hypervisor's pid as soon as it is started

    @property
    def disk(self) -> Path:
        return self.home / "disk.qcow2"

    @property
    def transfer_disk(self) -> Path | None:
        """A raw file the guest sees as a second disk."""
        return self.home / "transfer.img" if self.transfer else None

    @property
    def control_socket(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def net_socket(self) -> Path:
        """The net port's: the egress proxy's control frames (see smolvm/netproxy.py)."""
        return self.runtime / "net.sock"

    @property
    def agent_sockets(self) -> tuple[Path, ...]:
        """One per agent port: each serves one host connection at a time."""
        return tuple(self.runtime / f"agent-{i}.sock" for i in range(protocol.PORTS))


class Backend(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> int:
        """Start the machine detached from this process; return its pid once it runs
        (with ``spec.incoming``: once the saved state is loaded and the machine resumed)."""

    def save(self, spec: LaunchSpec, dest: Path, ram_apart: bool = False) -> None:
        """Stop the machine and write its whole state (memory, devices) to ``dest``;
        ``ram_apart``: all but the memory, which is in ``spec.ram`` already."""

    def machine(self, spec: LaunchSpec) -> dict[str, Any]:
        """What a state saved from the running machine needs to load: hypervisor version and layout."""

    def owns(self, spec: LaunchSpec, pid: int) -> bool:
        """Whether ``pid`` is this sandbox's hypervisor process (not a reused pid)."""

    def forward(self, spec: LaunchSpec, host_port: int, guest_port: int) -> None:
        """Let 127.0.0.1:``host_port`` on the host reach ``guest_port`` in the running guest."""

    def unforward(self, spec: LaunchSpec, host_port: int) -> None: ...

    def pause(self, spec: LaunchSpec) -> None: ...

    def resume(self, spec: LaunchSpec) -> None: ...

    def console(self, spec: LaunchSpec) -> bytes:
        """Console output produced since the last call (bounded)."""

    def stop(self, spec: LaunchSpec, pid: int | None, timeout: float = 5.0) -> None:
        """End the machine; kill its process if it does not go in time."""
