"""Warm templates: a booted sandbox saved once, resumed by every new sandbox.

Under emulation a cold boot spends seconds in the kernel and in starting
Python; resuming a saved machine skips both. A template belongs to one image
version and one machine shape (memory, vCPUs, accelerator, shares): ``smolvm
setup`` makes the default shape's, the first start of any other shape makes
its own (``fast_start=False`` opts out). It holds the
saved machine state and the disk it was saved with, which new sandboxes'
disks are copy-on-write overlays of. On resume, the agent takes the
sandbox's own hostname, the host's clock and fresh entropy (see
``identify``), so clones share no randomness.

Layout: ``<images>/templates/<image version>/m<memory>-c<vcpus>-p<protocol>l<layout>q<qemu>-<accel>/``
with ``disk.qcow2`` (read-only), ``state.bin`` and ``meta.json``, written
last. A template is never replaced while its image version exists, since
sandbox disks refer to its disk by path; it goes when the version is pruned.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import locks, protocol
from .agent_client import AgentConnection, create_transfer_disk
from .backends.base import Backend, LaunchSpec
from .backends.qemu import MACHINE_LAYOUT, QemuBackend, create_overlay, qemu_binary, qemu_version
from .exceptions import OperationTimeoutError, SmolVMError
from .images import layers
from .images.store import ImageVersion
from .mounts import Mount
from .paths import images_dir

log = logging.getLogger("smolvm")
CREATE_WAIT = 300.0  # for another process making the same template
FAILED_WAIT = 3600.0  # seconds a shape whose template could not be made boots cold before it is tried again

WARM_UP = "bash -c true && python3 -c 'import json, subprocess'"  # what most first commands touch


@dataclass(frozen=True)
class Template:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.dir / "state.bin"

    def saved(self) -> SavedMachine:
        return SavedMachine(self.state, self.dir.name.rsplit("-", 1)[-1], cold_ok=True)


def template_dir(image: ImageVersion, memory: int, vcpus: int, accel: str, shares: int = 0) -> Path:
    """One per shape, agent protocol, device layout and QEMU version, so a newer smolvm or
    QEMU makes a template of its own beside an older one's, which disks may still read
    through to."""
    shape = f"m{memory}-c{vcpus}" + (f"-s{shares}" if shares else "")
    qemu = "q{}.{}".format(*qemu_version(qemu_binary()))  # a state loads only into the QEMU that saved it
    return images_dir() / "templates" / image.dir.name / f"{shape}-p{protocol.VERSION}l{MACHINE_LAYOUT}{qemu}-{accel}"


def find(image: ImageVersion, memory: int, vcpus: int, accel: str, shares: int = 0) -> Template | None:
    """The finished template for this shape, or None."""
    directory = template_dir(image, memory, vcpus, accel, shares)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("protocol") != protocol.VERSION or meta.get("layout") != MACHINE_LAYOUT:
        return None  # made by an older smolvm: a new one is made for this image version
    if not (directory / "state.bin").is_file():
        return None
    return Template(directory)


def for_sandbox(image: ImageVersion, memory: int, vcpus: int, accel: str, shares: int) -> Template | None:
    """The template a sandbox of this shape starts from: made if missing (a cold boot and
    a save, once). One that could not be made is not tried again for FAILED_WAIT: the
    sandbox boots cold meanwhile."""
    found = find(image, memory, vcpus, accel, shares)
    if found is not None:
        return found
    failed = _failed(template_dir(image, memory, vcpus, accel, shares))
    try:
        if time.time() - failed.stat().st_mtime < FAILED_WAIT:
            return None
    except OSError:
        pass  # never failed
    try:
        return create(image, memory, vcpus, accel, QemuBackend(), shares)
    except (SmolVMError, OSError) as exc:
        log.warning("smolvm: could not save a booted sandbox of this shape (%s); booting cold", exc)
        try:
            failed.write_text(f"{time.time():.0f} {exc}\n")
        except OSError:
            pass
        return None


def _failed(directory: Path) -> Path:
    """Where a failure to make the template at ``directory`` is remembered."""
    return directory.with_name(directory.name + ".failed")


def create(image: ImageVersion, memory: int, vcpus: int, accel: str, backend: Backend, shares: int = 0) -> Template:
    """Boot a sandbox of this shape, warm it up, save it. Idempotent; one maker at a time.

    ``shares``: with that many virtio-9p devices, serving an empty folder the guest
    never mounts (a mounted share cannot be saved). A sandbox resuming it brings
    its own folders in their place: what a share serves is the host's business,
    not part of the saved machine."""
    final = template_dir(image, memory, vcpus, accel, shares)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = locks.lock(final.with_name(final.name + ".lock"), CREATE_WAIT)
    except TimeoutError:
        raise OperationTimeoutError(f"another process has been making the template {final} for too long") from None
    try:
        found = find(image, memory, vcpus, accel, shares)
        return found if found is not None else _create(image, memory, vcpus, accel, backend, shares, final)
    finally:
        locks.unlock(lock)


def _create(
    image: ImageVersion, memory: int, vcpus: int, accel: str, backend: Backend, shares: int, final: Path
) -> Template:
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=".new-"))
    placeholder = work / "share"
    placeholder.mkdir()
    placeholder.chmod(0o555)  # open to the jail's uid whatever the umask
    spec = LaunchSpec(
        vm_id="template",
        kernel=image.kernel,
        initrd=image.initrd,
        memory=memory,
        vcpus=vcpus,
        accel=accel,
        home=work,
        runtime=work,
        mounts=tuple(Mount(placeholder.resolve(), f"/mnt/share{i}") for i in range(shares)),
    )
    pid = None
    try:
        create_overlay(image.rootfs, spec.disk)
        assert spec.transfer_disk is not None
        create_transfer_disk(spec.transfer_disk)
        pid = backend.launch(spec)
        with AgentConnection.open(spec.agent_sockets[0], 120, booting=True) as conn:
            conn.exec(WARM_UP, timeout=60)
            conn.call("sync_disks")
        time.sleep(0.2)  # let the agent see the host leave before the state is saved
        backend.save(spec, work / "state.bin")
        backend.stop(spec, pid, timeout=5)
        pid = None
        for path in (*spec.agent_sockets, spec.net_socket, spec.control_socket, spec.transfer_disk):
            path.unlink(missing_ok=True)
        if (work / "jail").is_dir():
            (work / "jail").rmdir()  # the saving QEMU's, empty: a sandbox makes its own
        # That QEMU had the disk open for writing (a guest may have taken it over, and any
        # image's guest is not ours): its header is checked and its base written anew.
        layers.check_header(spec.disk, layers.virtual_size(image.rootfs))
        layers.rebase(spec.disk, image.rootfs)
        spec.disk.chmod(0o444)
        meta = {
            "memory": memory,
            "vcpus": vcpus,
            "accel": accel,
            "protocol": protocol.VERSION,
            "layout": MACHINE_LAYOUT,
            "shares": shares,
            "created": time.time(),
        }
        (work / "meta.json").write_text(json.dumps(meta))
        if final.exists():  # a half-made one from a crash (a finished one was found above): no disk uses it
            shutil.rmtree(final)
        os.rename(work, final)
        _failed(final).unlink(missing_ok=True)
    except BaseException:
        if pid is not None:
            backend.stop(spec, pid, timeout=2)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Template(final)


def identify(conn: AgentConnection, vm_id: str, seed: str) -> None:
    """Give a started sandbox what is its own: its hostname, the host's time, fresh
    entropy, and a machine id and MAC derived from ``seed`` (the same at every start of
    one sandbox, different for each copy of a saved one)."""
    entropy = base64.b64encode(os.urandom(64)).decode()
    digest = hashlib.sha256(seed.encode()).hexdigest()
    mac = "52:54:00:" + ":".join(digest[i : i + 2] for i in (32, 34, 36))  # QEMU's local prefix
    conn.call(
        "identity", timeout=30, hostname=vm_id, time=time.time(), entropy=entropy, machine_id=digest[:32], mac=mac
    )


@dataclass(frozen=True)
class SavedMachine:
    """The machine a sandbox resumes at its first start instead of booting: a template's
    or a snapshot's. ``cold_ok``: whether its disk may boot cold if the state will not
    load (a template's may; a snapshot restored without its processes would be a lie)."""

    state: Path
    accel: str
    cold_ok: bool
    ram: Path | None = None  # its memory, apart from the state, mapped private (see LaunchSpec.ram)

    def write(self, path: Path) -> None:
        ram = str(self.ram) if self.ram else None
        path.write_text(
            json.dumps({"state": str(self.state), "accel": self.accel, "cold_ok": self.cold_ok, "ram": ram})
        )

    @classmethod
    def read(cls, path: Path) -> SavedMachine | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        try:
            data = json.loads(text)
            ram = Path(data["ram"]) if data.get("ram") else None
            return cls(Path(data["state"]), str(data["accel"]), bool(data["cold_ok"]), ram)
        except (ValueError, KeyError, TypeError):
            pass
        directory = Path(text)  # an older smolvm's marker: the template's directory
        return cls(directory / "state.bin", directory.name.rsplit("-", 1)[-1], True)


def prune(keep_versions: set[str]) -> None:
    """Remove templates of image versions that are gone."""
    root = images_dir() / "templates"
    if not root.exists():
        return
    for version in root.iterdir():
        if version.name not in keep_versions:
            shutil.rmtree(version, ignore_errors=True)


__all__ = ["SavedMachine", "Template", "create", "find", "for_sandbox", "identify", "prune"]
