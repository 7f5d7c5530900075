"""Snapshots and forks: a sandbox saved as it runs, and new sandboxes made from it.

A snapshot is a directory ``<data>/snapshots/<id>/`` holding ``disk.qcow2``, a
read-only copy of the sandbox's own disk layer (it reads through to the same
template or image disk), and, for a full snapshot, ``state.bin``, the machine as
QEMU saves it: with QEMU 8.2 on, its devices only, and its memory apart in
``ram.bin``, which restored copies map private and so share (``_memory_apart``).
Its metadata, with the sha256 of each file, is a row of the state store. A sandbox restored from it is a new sandbox
like any other (its own id, disk overlay, sockets, keys) that resumes the saved
machine and is then given an identity of its own (``templates.identify``).

Restored sandboxes' disks read through to the snapshot's, so deleting a
snapshot they still use keeps its disk (and nothing else) until the last of
them is deleted; ``collect`` removes such kept disks once nothing refers to
them. A fork is a full snapshot no one can see: its sandboxes are made, then
it is deleted, and its disk stays for as long as they do.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import jail, procfs, templates
from .agent_client import create_transfer_disk
from .backends.base import Backend, LaunchSpec
from .backends.qemu import machine_key, mapped_memory_supported, qemu_binary, qemu_version, qmp_arg
from .exceptions import ImageError, SmolVMError, SnapshotError, ValidationError
from .images.store import ImageVersion, sha256_file
from .paths import SOCKET_PATH_MAX, data_dir, images_dir, sandboxes_dir
from .state import SnapshotRecord, StateStore
from .types import SnapshotInfo, SnapshotType, VMState

if TYPE_CHECKING:
    from .sandbox import SmolVM

log = logging.getLogger("smolvm")
DISK, STATE, RAM = "disk.qcow2", "state.bin", "ram.bin"
HELPER = "helper.json"  # in a snapshot being made: its maker, and the QMP socket of the QEMU splitting its memory out
HELPER_PID = "helper.pid"  # that QEMU's pid, written as soon as it is started
NAME_MAX = 128  # characters of a snapshot's label
SPACE_MARGIN = 64 << 20  # bytes kept free beyond what a snapshot's files take
GRACE = 600.0  # seconds an unlisted snapshot directory with a saved machine is left alone (a fork in progress)
MAKING_GRACE = 86400.0  # seconds before a snapshot still being made is taken for a crash's debris
FORK_MAX = 64
FORK_OVERHEAD_MIB = 96  # host memory a sandbox's QEMU takes beyond its guest's, measured at rest
FICLONE = 0x40049409


def snapshots_dir() -> Path:
    path = data_dir() / "snapshots"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# -- taking one -------------------------------------------------------------
def take(
    vm: SmolVM, kind: SnapshotType | str, name: str | None, listed: bool = True, memory_apart: bool = True
) -> SnapshotRecord:
    """Save ``vm`` as it is now. Full: paused for as long as QEMU takes to write its
    state and the disk layer is copied, then running again as before. Disk: the guest
    flushes its disk first, then it is paused for the copy. Nothing is left of a
    snapshot that failed, and the sandbox runs on either way."""
    kind = _check_kind(kind)
    label = _check_name(name)
    with vm._lifecycle():
        record = vm._refresh()
        if kind == SnapshotType.FULL and record.config.mounts:
            raise SnapshotError(
                f"cannot take a full snapshot of sandbox {vm.vm_id!r}: it has host folders mounted, and QEMU "
                "cannot save a machine with a mounted share; take a disk snapshot (--type disk) instead"
            )
        if record.state not in (VMState.RUNNING, VMState.PAUSED):
            raise ValidationError(
                f"cannot snapshot sandbox {vm.vm_id!r}: it is {record.state.value}; start it first "
                f"('smolvm sandbox start {vm.vm_id}')"
            )
        if kind == SnapshotType.DISK and record.state == VMState.PAUSED:
            raise ValidationError(
                f"cannot take a disk snapshot of sandbox {vm.vm_id!r}: it is paused and cannot flush its disk; "
                "resume it first, or take a full snapshot"
            )
        spec = vm._spec(record)
        machine = vm._backend.machine(spec)  # of the QEMU that saves it: restores need the same
        snap_id = ("snap-" if listed else "fork-") + secrets.token_hex(4)
        root = snapshots_dir()
        _check_space(root, spec.disk, record.config.memory if kind == SnapshotType.FULL else 0)
        work = root / f".new-{snap_id}"
        work.mkdir(mode=0o700)
        try:
            if kind == SnapshotType.DISK:
                with vm._agent() as conn:
                    conn.call("sync_disks", timeout=60)
            vm._connections.release()
            try:
                if kind == SnapshotType.FULL:
                    vm._backend.save(spec, work / STATE)  # stops the machine, and QEMU flushes the disk
                else:
                    vm._backend.pause(spec)  # stopping flushes what QEMU holds of the disk
                copy_sparse(spec.disk, work / DISK)
            finally:
                # Running again as it was; a paused one is let run for a moment and stopped
                # again, which takes its disks back from the finished save.
                vm._backend.resume(spec)
                if record.state == VMState.PAUSED:
                    vm._backend.pause(spec)
            # The copy's header names what it reads through to, and QEMU, which had the
            # disk open, could have rewritten it: set it to what it must be.
            rebase(work / DISK, expected_base(work / DISK, Path(record.image_dir)))
            if kind == SnapshotType.FULL and memory_apart and machine["qemu"] == _binary_machine()["qemu"]:
                if mapped_memory_supported():
                    _memory_apart(vm._backend, spec, work)
            files = {}
            for path in sorted(work.iterdir()):
                path.chmod(0o444)  # never written again: restored sandboxes' disks read through to it
                seen = _seen(path)  # before the sum: a write meanwhile changes what is seen after it
                # A fork's files are read by this call only, straight after: no sums to keep.
                digest = sha256_file(path) if listed else None
                if _seen(path) != seen:
                    raise SnapshotError(f"{path.name} changed while it was being summed: try again")
                files[path.name] = {"sha256": digest, "size": seen[1], "stored": _allocated(path), "seen": seen}
            accel = record.accel or "tcg"
            snap = SnapshotRecord(
                snap_id, label, vm.vm_id, kind, record.config, record.image_dir, accel, files, time.time(), machine
            )
            if listed:  # the row first: a directory with no row is one collect() may remove
                StateStore().add_snapshot(snap)
            try:
                os.rename(work, root / snap_id)
            except BaseException:
                StateStore().remove_snapshot(snap_id)
                raise
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise SnapshotError(f"the disk filled up while saving sandbox {vm.vm_id!r}: free some space") from None
            if isinstance(exc, SmolVMError) and not isinstance(exc, SnapshotError):
                raise SnapshotError(f"could not snapshot sandbox {vm.vm_id!r}: {exc}") from None
            raise
    return snap


def expected_base(disk: Path, image_dir: Path) -> Path:
    """What a sandbox's disk may read through to: its image's root disk, a template's disk
    of that image version, a snapshot's disk, or (a builder's) a build layer's; anything
    else in its header is refused, and so is a header with a qcow2 feature SmolVM never
    writes (an external data file would have QEMU, as root, open any host file)."""
    from .images import layers

    try:
        layers.check_header(disk)
    except ImageError as exc:
        raise SnapshotError(f"{exc}; delete the sandbox") from None
    named = backing_file(disk)
    # A plain absolute path only: QEMU would take "nbd:..." or "json:..." as a protocol,
    # and a ".." resolved here could differ from what QEMU opens. Links resolve alike.
    plain = named is not None and named.startswith("/") and ":" not in named and ".." not in Path(named).parts
    if named is not None and plain:
        base = Path(named).resolve()
        allowed = (
            base == (image_dir / "rootfs.qcow2").resolve()
            or (base.name == DISK and base.parent.parent == (images_dir() / "templates" / image_dir.name).resolve())
            or (base.name == DISK and base.parent.parent == snapshots_dir().resolve())
            or (
                base.name == layers.DISK
                and base.parent.parent == layers.layers_dir().resolve()
                and layers.find(base.parent.name) is not None  # a finished layer, not a build's staging
            )
        )
        if allowed and base.is_file():
            return Path(named)
    raise SnapshotError(
        f"the disk {disk} reads through to {named!r}, which is none of SmolVM's image, template or snapshot "
        "disks: it was tampered with; delete the sandbox"
    )


def rebase(disk: Path, base: Path) -> None:
    """Write ``base`` into the qcow2 header of ``disk`` as its qcow2 backing file."""
    from .images import layers

    try:
        layers.rebase(disk, base)
    except ImageError as exc:
        raise SnapshotError(f"could not set the snapshot disk's base: {exc}") from None


def _binary_machine() -> dict[str, Any]:
    """What a snapshot's machine must match to be restored here (see ``QemuBackend.machine``)."""
    return machine_key(*qemu_version(qemu_binary()))


def _memory_apart(backend: Backend, source: LaunchSpec, work: Path) -> None:
    """Turn a saved machine (``work/state.bin``) into its memory (``ram.bin``) and the
    rest (``state.bin``, small), so that restored copies map the memory from one file
    and share every page none of them has written (the page cache holds it once).
    A QEMU of the same shape loads the state into a shared mapping of the new file,
    held paused, and saves it again without its memory."""
    whole = work / "whole.bin"
    os.rename(work / STATE, whole)
    runtime = work if len(str(work / "agent-9.sock")) <= SOCKET_PATH_MAX else Path(tempfile.mkdtemp(dir="/tmp"))
    helper = LaunchSpec(
        vm_id="snapshot", kernel=source.kernel, initrd=source.initrd, memory=source.memory, vcpus=source.vcpus,
        accel=source.accel, home=work, runtime=runtime, incoming=whole, ram=work / RAM, ram_fill=True, hold=True,
        pid_file=work / HELPER_PID,
    )  # fmt: skip
    assert helper.transfer_disk is not None
    pid = None
    try:
        create_transfer_disk(helper.transfer_disk)
        # For collect(), should this process be killed before it ends the helper (its
        # longest part, loading the memory, is inside launch()).
        (work / HELPER).write_text(json.dumps({"qmp": qmp_arg(helper), "maker": _started(os.getpid())}))
        pid = backend.launch(helper)
        backend.save(helper, work / STATE, ram_apart=True)
    finally:
        if pid is not None:
            backend.stop(helper, pid, timeout=5)
        (work / HELPER).unlink(missing_ok=True)
        (work / HELPER_PID).unlink(missing_ok=True)
        for path in (whole, helper.transfer_disk, *helper.agent_sockets, helper.net_socket, helper.control_socket):
            path.unlink(missing_ok=True)
        for leftover in (work / "jail", *([runtime] if runtime != work else [])):
            shutil.rmtree(leftover, ignore_errors=True)
        (work / jail.UID_FILE).unlink(missing_ok=True)
    with open(work / RAM, "rb") as ram:
        os.fsync(ram.fileno())


def _check_kind(kind: SnapshotType | str) -> SnapshotType:
    try:
        kind = SnapshotType(kind)
    except ValueError:
        raise ValidationError(f"snapshot type {kind!r} is not one of full, disk") from None
    if kind == SnapshotType.DIFF:
        raise ValidationError("diff snapshots are not supported: take a full one (memory and disk) or a disk one")
    return kind


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not name.isprintable():
        raise ValidationError(f"a snapshot's name is printable text of 1 to {NAME_MAX} characters, not {name!r}")
    return name


def _check_space(root: Path, disk: Path, memory_mib: int) -> None:
    """Refuse before anything is written if the snapshot's files may not fit."""
    need = (memory_mib << 20) + _allocated(disk) + SPACE_MARGIN
    free = shutil.disk_usage(root).free
    if free < need:
        raise SnapshotError(
            f"not enough free disk space for a snapshot in {root}: it needs up to {need >> 20} MiB, "
            f"{free >> 20} MiB are free; free some space or delete old snapshots"
        )


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def copy_sparse(src: Path, dest: Path) -> None:
    """Copy a disk file: a reflink where the filesystem has them, else its data
    extents only, so the holes a guest's discards punched stay holes."""
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass  # no reflinks here: copy the data
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole is left
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
                if copied == 0:
                    break
                offset += copied
            pos = end
        os.ftruncate(fout.fileno(), size)
        os.fsync(fout.fileno())


def _seen(path: Path) -> list[int]:
    """What changes whenever a file is written: a file still showing these need not be
    hashed again (its ctime cannot be set back short of changing the clock)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# -- restoring --------------------------------------------------------------
def verify(snap: SnapshotRecord, directory: Path) -> None:
    """Refuse a snapshot whose files are missing, or not the ones saved."""
    wanted = {DISK} | ({STATE} if snap.type == SnapshotType.FULL else set()) | ({RAM} if RAM in snap.files else set())
    changed = False
    files = {name: dict(entry) for name, entry in snap.files.items()}
    for name in sorted(wanted):
        path, entry = directory / name, files.get(name)
        if entry is None or not path.is_file():
            raise SnapshotError(
                f"snapshot {snap.id!r} is damaged: its {name} is missing; "
                f"delete it ('smolvm snapshot delete {snap.id}')"
            )
        if entry.get("seen") == _seen(path):
            continue
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise SnapshotError(
                f"snapshot {snap.id!r} is damaged: its {name} is not the file that was saved; "
                f"delete it ('smolvm snapshot delete {snap.id}')"
            )
        entry["seen"], changed = _seen(path), True
    if snap.type == SnapshotType.FULL:
        here = _binary_machine()
        if snap.machine != here:
            raise SnapshotError(
                f"snapshot {snap.id!r} was taken by another QEMU or smolvm ({_describe(snap.machine)}) than this "
                f"one ({_describe(here)}), and a saved machine loads only into its own; a disk snapshot would restore"
            )
        from .backends.accel import choose_accel

        image = _image(snap)
        accel = choose_accel(image.kernel, image.initrd).accel
        if accel != snap.accel:
            raise SnapshotError(f"snapshot {snap.id!r} was taken under {snap.accel}, and this host runs {accel}")
    backing = backing_file(directory / DISK)
    if backing is None or not Path(backing).is_file():
        raise SnapshotError(
            f"snapshot {snap.id!r} cannot be restored: the disk of the image it was taken from is gone"
            f"{f' ({backing})' if backing else ''}; delete it"
        )
    if changed:
        StateStore().update_snapshot_files(snap.id, files)


def _describe(machine: dict[str, Any]) -> str:
    return f"QEMU {machine.get('qemu')}, devices {machine.get('layout')}, agent protocol {machine.get('protocol')}"


def restore(snapshot_id: str, vm_id: str | None = None) -> SmolVM:
    """A new running sandbox from a listed snapshot."""
    if not isinstance(snapshot_id, str) or not snapshot_id:
        raise ValidationError(f"{snapshot_id!r} is not a snapshot id: 'smolvm snapshot list' shows them")
    snap = StateStore().get_snapshot(snapshot_id)
    directory = snapshots_dir() / snap.id
    verify(snap, directory)
    return _restore(snap, directory, vm_id)


def _restore(snap: SnapshotRecord, directory: Path, vm_id: str | None) -> SmolVM:
    from .sandbox import SmolVM, check_id

    config = snap.config.model_copy(
        update={"vm_id": check_id(vm_id) if vm_id is not None else "vm-" + secrets.token_hex(4), "fast_start": False}
    )
    ram = directory / RAM if RAM in snap.files else None
    saved = templates.SavedMachine(directory / STATE, snap.accel, False, ram) if snap.type == "full" else None
    vm = SmolVM(config, _base=(directory / DISK, saved, _image(snap)))
    try:
        vm.start()
    except BaseException:
        vm.delete()
        raise
    return vm


def _image(snap: SnapshotRecord) -> ImageVersion:
    """The image version the snapshot was taken from: its kernel is the one in the saved memory."""
    directory = Path(snap.image_dir)
    try:
        image = ImageVersion(snap.config.image, directory, json.loads((directory / "manifest.json").read_text()))
    except (OSError, ValueError):
        image = None
    if image is None or not (image.kernel.is_file() and image.initrd.is_file()):
        raise SnapshotError(
            f"snapshot {snap.id!r} cannot be restored: the version of the {snap.config.image!r} image it was "
            f"taken from ({directory}) is gone; delete the snapshot"
        )
    return image


# -- forks --------------------------------------------------------------------
def fork(vm: SmolVM, count: int) -> list[SmolVM]:
    """``count`` new running sandboxes, each a copy of ``vm`` as it is now; ``vm`` runs on."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= FORK_MAX:
        raise ValidationError(f"a fork makes 1 to {FORK_MAX} sandboxes, not {count!r}")
    record = vm._refresh()
    need = count * (record.config.memory + FORK_OVERHEAD_MIB)
    available = _available_mib()
    if available is not None and need > available:
        raise ValidationError(
            f"a fork of {count} sandboxes of {record.config.memory} MiB needs about {need} MiB of host memory, "
            f"and {available} MiB are available: fork fewer"
        )
    if record.state != VMState.RUNNING:
        how = "resume" if record.state == VMState.PAUSED else "start"
        raise ValidationError(f"cannot fork sandbox {vm.vm_id!r}: it is {record.state.value}; {how} it first")
    if record.config.mounts:
        raise ValidationError(
            f"cannot fork sandbox {vm.vm_id!r}: it has host folders mounted, and QEMU cannot save a machine with "
            "a mounted share"
        )
    snap = take(vm, SnapshotType.FULL, None, listed=False, memory_apart=False)
    directory = snapshots_dir() / snap.id
    futures: list[concurrent.futures.Future[SmolVM]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(count, os.cpu_count() or 1, 4)) as pool:
            futures = [pool.submit(_restore, snap, directory, None) for _ in range(count)]
        # All have ended here, even after an interrupt (the pool waits for them).
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        return [future.result() for future in futures]
    except BaseException:
        concurrent.futures.wait(futures)  # an interrupt may have come while they still ran
        for future in futures:  # all or none: the copies that were made go
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().delete()
        raise
    finally:
        _forget_machine(directory)  # no more copies: its disk stays while they need it
        collect()


def _available_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- listing and deleting -----------------------------------------------------
def list_all() -> list[SnapshotInfo]:
    return [snap.info() for snap in StateStore().all_snapshots()]


def delete(snapshot_id: str) -> list[str]:
    """Delete a snapshot. Returns the sandboxes whose disks still read through to its
    disk, which is then kept (and nothing else of it) until they are deleted."""
    store = StateStore()
    snap = store.get_snapshot(snapshot_id)
    directory = snapshots_dir() / snap.id
    listed = {other.id for other in store.all_snapshots()} - {snap.id}
    disks = _disks()
    users = _users(directory / DISK, disks, listed)
    store.remove_snapshot(snap.id)
    if _dependents(directory / DISK, disks):  # named users, or a fork's children still being made
        _forget_machine(directory)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    collect()
    return users


def _forget_machine(directory: Path) -> None:
    """Remove what only a restore reads: the saved state and memory (running copies that
    map the memory keep it until they end; stopped ones boot their disk)."""
    for name in (STATE, RAM):
        (directory / name).unlink(missing_ok=True)


def _disks() -> list[Path]:
    """Every disk that may read through to a snapshot's: sandboxes' and snapshots'."""
    found = []
    for root in (sandboxes_dir(), snapshots_dir()):
        try:
            found += [entry / DISK for entry in root.iterdir() if (entry / DISK).is_file()]
        except OSError:
            continue
    return found


def _users(disk: Path, disks: list[Path], listed: set[str]) -> list[str]:
    """What still reads through to ``disk``: sandboxes, and listed snapshots (as
    "snapshot ID"); through an unlisted snapshot (a fork's, a deleted one's), its users."""
    names: set[str] = set()
    for other in _dependents(disk, disks):
        owner = other.parent
        if owner.parent == sandboxes_dir():
            names.add(owner.name)
        elif owner.name in listed:
            names.add(f"snapshot {owner.name}")
        else:
            names.update(_users(other, disks, listed))
    return sorted(names)


def _dependents(disk: Path, disks: list[Path] | None = None) -> list[Path]:
    """The disks whose header names ``disk`` as their base, by any spelling of its path."""
    try:
        st = disk.stat()
    except OSError:
        return []
    found = []
    for other in disks if disks is not None else _disks():
        named = backing_file(other)
        try:
            if named and os.path.samestat(os.stat(named), st):
                found.append(other)
        except OSError:
            continue
    return found


def collect() -> None:
    """Remove what no snapshot and no sandbox needs: kept disks of deleted snapshots and
    forks that nothing reads through to any more, and debris of failed saves."""
    root = snapshots_dir()
    store = StateStore()
    listed = {snap.id for snap in store.all_snapshots()}
    now = time.time()
    while True:
        disks = _disks()
        removed = False
        for entry in root.iterdir():
            try:
                age = now - entry.stat().st_mtime
            except OSError:
                continue
            if entry.name.startswith(".new-"):
                if age > GRACE:
                    _end_helper(entry)
                if age > MAKING_GRACE:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if entry.name in listed or not entry.is_dir():
                continue
            if (entry / STATE).exists() and age < GRACE:
                continue  # a fork still making its sandboxes
            # A row is added before its directory appears: one made since 'listed' was read has one.
            if not _dependents(entry / DISK, disks) and not store.snapshot_exists(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed = True
        if not removed:
            return  # else a removed disk may have been all that kept another


def _started(pid: int) -> list[int] | None:
    """A process's pid and start time (clock ticks after boot): who it is, pid reuse aside."""
    try:
        return [pid, int(procfs.stat(pid)[19])]
    except (OSError, ValueError, IndexError):
        return None


def _end_helper(work: Path) -> None:
    """End the QEMU a snapshot's maker left behind when it was killed while splitting out
    the memory: once that maker is gone, the recorded pid, if its command line still
    serves the recorded QMP socket (in this directory of its own)."""
    try:
        noted = json.loads((work / HELPER).read_text())
        qmp, maker = str(noted["qmp"]).encode(), noted["maker"]
        if maker is not None and _started(int(maker[0])) == maker:
            return  # still at it
        pid = (work / HELPER_PID).read_text().strip()
        if pid.isdigit() and qmp in _cmdline(int(pid)):  # digits only: never a process group
            os.kill(int(pid), signal.SIGKILL)
            log.info("smolvm: ended QEMU %s, left saving a snapshot in %s", pid, work)
        for name in (HELPER, HELPER_PID):
            (work / name).unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # none recorded, or it is gone


def _cmdline(pid: int) -> list[bytes]:
    try:
        return procfs.cmdline(pid)
    except OSError:
        return []  # gone


QCOW2_MAGIC = b"QFI\xfb"


def backing_file(disk: Path) -> str | None:
    """The file a qcow2 disk reads through to, from its header; None if it has none."""
    try:
        with open(disk, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 1023 or offset > os.fstat(f.fileno()).st_size:
                return None  # none, too long a name, or past the file's end (seek takes less than 2^63)
            f.seek(offset)
            name = f.read(size).decode(errors="replace")
    except OSError:
        return None
    # A header a taken-over QEMU wrote may name no path at all (a NUL is none).
    return name if name and "\0" not in name else None


def image_dirs() -> set[Path]:
    """The image versions that listed snapshots were taken from (kept by pruning)."""
    return {Path(snap.image_dir) for snap in StateStore().all_snapshots()}


def describe(info: SnapshotInfo) -> dict[str, Any]:
    return info.model_dump(mode="json")
