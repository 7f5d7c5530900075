"""The public facade: ``SmolVM``, one disposable microVM.

It keeps no state of its own beyond a handle: the record lives in the state
store, the machine in a detached hypervisor process, so any process can pick
a sandbox up again with ``SmolVM.from_id``.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import paramiko

from . import cas, egress, locks, ports, snapshots, ssh, templates, watchdog
from . import protocol as P
from .agent_client import (
    MAX_DOWNLOAD,
    AgentConnection,
    clean,
    create_transfer_disk,
    guest_text,
)
from .backends.accel import choose_accel
from .backends.base import Backend, LaunchSpec
from .backends.qemu import QemuBackend, create_overlay
from .commands import Commands, check_env
from .connections import Connections
from .exceptions import (
    GuestError,
    HostError,
    OperationTimeoutError,
    SandboxStateError,
    SmolVMError,
    SnapshotError,
    ValidationError,
    VMNotFoundError,
)
from .filesystem import Files
from .filesystem import check_path as check_guest_path
from .images.store import ImageStore, ImageVersion
from .mounts import Mount, check_host_folders, guest_request, resolved
from .paths import data_dir, runtime_dir, sandbox_dir, write_json
from .ports import ExposedPort, Ports
from .process import Process, ProcessInfo
from .state import SandboxRecord, StateStore
from .terminal import Pty
from .trees import TreeReport
from .types import ID_PATTERN, ID_RULE, CommandResult, InternetSettings, SnapshotInfo, SnapshotType, VMConfig, VMState

log = logging.getLogger("smolvm")
CONSOLE_LOG_MAX = 1 << 20
COMM_CHANNELS = ("agent", "ssh")  # how run() and files reach the guest; everything else uses the agent
RESUME_FROM = "resume-from"  # in a sandbox's dir until its first start: the saved machine to resume
LOCK_WAIT = 120.0
TRANSFER_SETTLE = 2.0  # seconds the transfer disk stays taken after a failed transfer (the guest notices in 1)


def check_id(vm_id: object) -> str:
    if not isinstance(vm_id, str) or not ID_PATTERN.fullmatch(vm_id):
        raise ValidationError(f"{vm_id!r} is not a valid sandbox id: ids are {ID_RULE}")
    return vm_id


class SmolVM:
    """A disposable Linux microVM.

    ``SmolVM()`` creates a sandbox (default image, 1 vCPU, 512 MiB); ``start()``
    boots it. As a context manager it starts on enter and, on exit, stops and
    deletes the sandbox if this handle created it.
    """

    def __init__(
        self,
        config: VMConfig | None = None,
        *,
        vm_id: str | None = None,
        memory: int | None = None,
        vcpus: int | None = None,
        cpu_limit: float | None = None,
        disk_size: int | None = None,
        image: str | None = None,
        internet_settings: InternetSettings | Mapping[str, Any] | None = None,
        mounts: Sequence[Mount] | None = None,
        fast_start: bool | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        comm_channel: str = "agent",
        backend: Backend | None = None,
        _record: SandboxRecord | None = None,
        _base: tuple[Path, templates.SavedMachine | None, ImageVersion] | None = None,
    ) -> None:
        if comm_channel not in COMM_CHANNELS:
            raise ValidationError(f"comm_channel must be one of {', '.join(COMM_CHANNELS)}, not {comm_channel!r}")
        self._backend = backend or QemuBackend()
        self._store = StateStore()
        self._comm = comm_channel
        self._ssh_client: tuple[int, paramiko.SSHClient] | None = None
        self.boot_timings: dict[str, float] = {}
        if _record is not None:
            self._connections = Connections(sandbox_dir(_record.id), _record.id)
            self._record = _record
            self._owned = False
            return
        overrides = {
            k: v
            for k, v in {
                "vm_id": vm_id,
                "memory": memory,
                "vcpus": vcpus,
                "cpu_limit": cpu_limit,
                "disk_size": disk_size,
                "image": image,
                "internet_settings": internet_settings,
                "mounts": list(mounts) if mounts is not None else None,
                "fast_start": fast_start,
                "timeout": timeout,
                "idle_timeout": idle_timeout,
            }.items()
            if v is not None
        }
        try:
            base = config.model_dump() if config is not None else {}
            config = VMConfig.model_validate({**base, **overrides})
        except ValueError as exc:
            raise ValidationError(_pydantic_message(exc)) from None
        if config.vm_id is None:
            config = config.model_copy(update={"vm_id": "vm-" + secrets.token_hex(4)})
        self._record = self._create(config, _base)
        self._connections = Connections(sandbox_dir(self._record.id), self._record.id)
        self._owned = True

    # -- creation -------------------------------------------------------
    def _create(
        self, config: VMConfig, origin: tuple[Path, templates.SavedMachine | None, ImageVersion] | None = None
    ) -> SandboxRecord:
        """Record the sandbox and make its disk: an overlay of its shape's template's if
        there is one (and it resumes that machine), else of the image's; or, from
        ``origin`` (a snapshot): of that disk, resuming that machine, of that image."""
        assert config.vm_id is not None
        started = time.perf_counter()
        try:
            config = config.model_copy(update={"mounts": resolved(config.mounts)})
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        assert config.vm_id is not None
        check_host_folders(config.mounts, data_dir())
        base, saved, image = origin if origin is not None else (None, None, ImageStore().load(config.image))
        if config.disk_size is not None and config.disk_size < image.disk_size:
            raise ValidationError(
                f"disk_size={config.disk_size} MiB is smaller than the image's {image.disk_size} MiB: "
                "ask for at least that much"
            )
        # A sandbox of a shape with a saved template starts by resuming it (one of a
        # new shape gets one made on its first start).
        if origin is None and starts_fast(config, image.disk_size):
            accel = choose_accel(image.kernel, image.initrd).accel
            template = templates.find(image, config.memory, config.vcpus, accel, len(config.mounts))
            if template is not None:
                base, saved = template.disk, template.saved()
        record = self._store.add(config, str(image.dir))
        directory = sandbox_dir(config.vm_id)
        try:
            # The id is ours now: anything left under it is debris of a crashed process.
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, mode=0o700)  # disks and transfers hold the user's data
            create_overlay(base or image.rootfs, directory / "disk.qcow2", config.disk_size)
            if saved is not None:
                saved.write(directory / RESUME_FROM)
        except BaseException:
            self._store.remove(config.vm_id)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.boot_timings["host_setup"] = time.perf_counter() - started
        return record

    @classmethod
    def from_id(cls, vm_id: str, *, comm_channel: str = "agent", backend: Backend | None = None) -> SmolVM:
        """A handle on an existing sandbox, from any process. Leaving its
        ``with`` block does not delete it."""
        record = StateStore().get(check_id(vm_id))
        return cls(comm_channel=comm_channel, backend=backend, _record=record)

    @staticmethod
    def list() -> list[SandboxRecord]:
        """Every sandbox this data directory knows of, with its state checked."""
        records = []
        for record in StateStore().all():
            try:
                records.append(SmolVM(_record=record)._refresh())
            except VMNotFoundError:
                continue  # deleted by another process meanwhile
        return records

    # -- identity and state ---------------------------------------------
    @property
    def vm_id(self) -> str:
        return self._record.id

    @property
    def config(self) -> VMConfig:
        return self._record.config

    def _image_config(self) -> dict[str, Any]:
        """A built image's config (its WORKDIR, USER...), read once; {} for others."""
        if not hasattr(self, "_config_of_image"):
            try:
                manifest = json.loads((Path(self._record.image_dir) / "manifest.json").read_text())
                config = manifest.get("config") if isinstance(manifest, dict) else None
            except (OSError, ValueError):
                config = None
            self._config_of_image = config if isinstance(config, dict) else {}
        return self._config_of_image

    def _workdir(self) -> str | None:
        """The directory commands run in when none is given: a built image's WORKDIR, else
        the guest's default (the user's home)."""
        workdir = self._image_config().get("workdir")
        return workdir if isinstance(workdir, str) and workdir.startswith("/") else None

    def _image_user(self) -> str | None:
        """The user commands run as when none is given: a built image's USER, else root."""
        user = self._image_config().get("user")
        return user if isinstance(user, str) and user else None

    @property
    def files(self) -> Files:
        """The sandbox's filesystem: list, read, write, remove... (see smolvm/filesystem.py)."""
        return Files(self)

    @property
    def commands(self) -> Commands:
        """Commands, in the foreground or the background (see smolvm/commands.py)."""
        return Commands(self)

    @property
    def pty(self) -> Pty:
        """Terminals in the sandbox (see smolvm/terminal.py)."""
        return Pty(self)

    @property
    def ports(self) -> Ports:
        """Ports of the sandbox reachable from this host (see smolvm/ports.py)."""
        return Ports(self)

    @property
    def status(self) -> VMState:
        return self._refresh().state

    def info(self) -> dict[str, Any]:
        return {**self._refresh().as_dict(), "expires_at": self.expires_at()}

    def _refresh(self) -> SandboxRecord:
        record = self._store.get(self.vm_id)
        if record.state in (VMState.RUNNING, VMState.PAUSED) and not self._alive(record):
            # Only if nobody changed the record meanwhile (a start in another process).
            self._store.mark_dead(
                self.vm_id,
                record.pid,
                note="the hypervisor exited unexpectedly; 'start' boots it again, 'delete' removes it",
            )
            record = self._store.get(self.vm_id)
        self._record = record
        return record

    def _alive(self, record: SandboxRecord) -> bool:
        return record.pid is not None and self._backend.owns(self._spec(record), record.pid)

    def _spec(self, record: SandboxRecord | None = None, accel: str | None = None, resize: bool = False) -> LaunchSpec:
        record = record or self._record
        image = ImageVersion(record.config.image, Path(record.image_dir), {})
        return LaunchSpec(
            vm_id=record.id,
            kernel=image.kernel,
            initrd=image.initrd,
            memory=record.config.memory,
            vcpus=record.config.vcpus,
            accel=accel or record.accel or "tcg",
            home=sandbox_dir(record.id),
            runtime=runtime_dir(record.id, create=False),
            resize_disk=resize,
            mounts=tuple(record.config.mounts),
            cpu_limit=record.config.cpu_limit,
        )

    @contextmanager
    def _locked(self, path: Path, busy: str, wait: float = LOCK_WAIT) -> Iterator[None]:
        """Hold a file lock: a fresh lock file handle per call, so threads exclude each other too."""
        try:
            fd = locks.lock(path, wait)
        except TimeoutError:
            raise OperationTimeoutError(f"sandbox {self.vm_id!r} is busy {busy}: try again when it finishes") from None
        try:
            yield
        finally:
            locks.unlock(fd)

    @contextmanager
    def _lifecycle(self) -> Iterator[None]:
        """Serialises start/stop/delete of this sandbox across threads and processes.
        The lock file goes with the sandbox: nothing of a deleted one is left."""
        path = sandbox_dir(self.vm_id).with_suffix(".lock")
        with self._locked(path, "starting or stopping elsewhere"):
            try:
                yield
            finally:
                if not sandbox_dir(self.vm_id).exists():
                    path.unlink(missing_ok=True)  # whoever waits for it then finds the sandbox gone

    @contextmanager
    def _transfer(self) -> Iterator[Path | None]:
        """The transfer disk if no other transfer is using it; else None, and the file goes
        on the wire. Taken before the agent connection, so that a connection that failed
        is closed before the disk is let go; and then only once the guest has had time to
        see its host gone, as until then it may still fill or read the window."""
        disk = self._spec().transfer_disk
        fd = locks.try_lock(disk.with_suffix(".lock")) if disk is not None and disk.exists() else None
        if fd is None:
            yield None
            return
        try:
            yield disk
        except BaseException:
            settle = threading.Timer(TRANSFER_SETTLE, locks.unlock, (fd,))
            settle.daemon = True
            settle.start()
            raise
        locks.unlock(fd)

    # -- lifecycle ------------------------------------------------------
    def start(self, boot_timeout: float = 60.0) -> SmolVM:
        """Boot the sandbox and wait until its agent answers."""
        with self._lifecycle():
            record = self._refresh()
            if record.state == VMState.RUNNING:
                return self
            if record.state == VMState.PAUSED:
                raise ValidationError(f"sandbox {self.vm_id!r} is paused: resume() it instead")
            image = ImageVersion(record.config.image, Path(record.image_dir), {})
            if not (image.kernel.exists() and image.initrd.exists()):
                raise HostError(f"the image sandbox {self.vm_id!r} was made from is gone: delete the sandbox")
            check_host_folders(record.config.mounts, data_dir())
            # QEMU, as root, opens what the disk's header names: a QEMU taken over at its last
            # run could have rewritten it to name a host file.
            snapshots.expected_base(sandbox_dir(self.vm_id) / "disk.qcow2", image.dir)
            t0 = time.perf_counter()
            choice = choose_accel(image.kernel, image.initrd)
            self._first_template(record, image, choice.accel)
            resume = self._saved_machine(record, choice.accel)
            # A disk larger than the image's is grown by the guest on its first boot.
            size = record.config.disk_size
            resize = record.state == VMState.CREATED and size is not None and size > _image_size(image.dir)
            spec = replace(
                self._spec(record, choice.accel, resize),
                incoming=resume.state if resume else None,
                ram=resume.ram if resume else None,
            )
            runtime_dir(self.vm_id)  # made here, not by every _spec()
            if spec.transfer_disk is not None:
                create_transfer_disk(spec.transfer_disk)
            pid, resume, proxy = self._launch(spec, record, resume)
            t1 = time.perf_counter()
            self._store.update(self.vm_id, state=VMState.RUNNING, pid=pid, accel=choice.accel, note=None)
            try:
                with AgentConnection.open(
                    spec.agent_sockets[0], boot_timeout, booting=True, alive=self._boot_watch(spec, pid)
                ) as conn:
                    info = conn.guest_info if resume is None else {}  # a resumed one's marks are the saved boot's
                    templates.identify(conn, self.vm_id, f"{self.vm_id}/{record.created_at}")
                    trusted = record.config.internet_settings.trust_host_cas
                    conn.call("trust", timeout=30, certs=cas.host_certificates() if trusted else "")
                    if spec.mounts:
                        conn.call("mount", timeout=30, mounts=guest_request(spec.mounts))
                if proxy is not None:
                    proxy.wait_ready()
            except BaseException as exc:
                self._save_console(spec)
                self._backend.stop(spec, pid, timeout=2)
                egress.stop(spec)
                self._store.update(self.vm_id, state=VMState.ERROR, pid=None, note=f"boot failed: {exc}")
                if isinstance(exc, SmolVMError):
                    raise type(exc)(f"sandbox {self.vm_id!r} did not boot: {exc}") from None
                raise
            t2 = time.perf_counter()
            (sandbox_dir(self.vm_id) / RESUME_FROM).unlink(missing_ok=True)  # later starts boot its own disk
            self.boot_timings.update(boot_breakdown(t1 - t0, t2 - t1, info))
            self.boot_timings["resumed_template"] = 1.0 if resume else 0.0
            self._begin_lifetime(record.config)
            self._refresh()
        return self

    def _begin_lifetime(self, config: VMConfig) -> None:
        """A sandbox with a timeout lives that long from this start, watched by a process
        of its own that outlives this one."""
        if config.timeout is None and config.idle_timeout is None:
            return
        home = sandbox_dir(self.vm_id)
        deadline = None if config.timeout is None else time.time() + config.timeout
        watchdog.write(home, watchdog.Lifetime(deadline, config.idle_timeout))
        with watchdog.in_use(home):  # idle from now on
            pass
        watchdog.ensure(home, self.vm_id)

    def set_timeout(self, timeout: float | None) -> None:
        """Delete the sandbox ``timeout`` seconds from now (None: never), in place of what
        its ``timeout`` said; its ``idle_timeout`` holds as before."""
        try:
            seconds = watchdog.check_seconds(timeout, "timeout")
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        record = self._refresh()
        home = sandbox_dir(self.vm_id)
        with self._lifecycle():
            deadline = None if seconds is None else time.time() + seconds
            watchdog.write(home, watchdog.Lifetime(deadline, record.config.idle_timeout))
        if deadline is not None or record.config.idle_timeout is not None:
            watchdog.ensure(home, self.vm_id)

    def expires_at(self) -> float | None:
        """When the watchdog deletes the sandbox if nothing changes (seconds since the
        epoch), or None if it has no timeout."""
        home = sandbox_dir(self._refresh().id)
        lifetime = watchdog.read(home)
        if lifetime.idle is None:
            return lifetime.deadline
        return lifetime.due(watchdog.idle_since(home) or time.time())

    def _launch(
        self, spec: LaunchSpec, record: SandboxRecord, resume: templates.SavedMachine | None
    ) -> tuple[int, templates.SavedMachine | None, egress.EgressProxy | None]:
        """Start the machine, and its egress proxy if it has a way out (just before
        QEMU, so the proxy is on the net port when a resumed machine runs); the
        machine's pid, the saved machine it resumed (None if it booted cold), and the proxy."""
        settings = record.config.internet_settings
        policy = self._write_egress_policy(record) if egress.needed(settings) else None
        proxy = None
        try:
            if policy is not None:
                proxy = egress.EgressProxy.start(spec, policy, settings.allow_host_ports)
            try:
                pid = self._backend.launch(spec)
            except HostError as exc:
                if resume is None or not resume.cold_ok:
                    raise
                # A template that will not load: this disk boots cold just as well.
                log.warning("smolvm: resuming the saved template failed (%s); booting %s cold", exc, self.vm_id)
                resume = None
                (sandbox_dir(self.vm_id) / RESUME_FROM).unlink(missing_ok=True)
                spec = replace(spec, incoming=None, ram=None)
                if proxy is not None and policy is not None:  # it may have joined the QEMU that gave up
                    proxy.end()
                    proxy = egress.EgressProxy.start(spec, policy, settings.allow_host_ports)
                pid = self._backend.launch(spec)
            if proxy is not None:
                try:
                    proxy.forwarded(self._forward(spec, P.NET_RELAY_PORT))
                except BaseException:
                    self._backend.stop(spec, pid, timeout=2)
                    raise
        except BaseException:
            if proxy is not None:
                proxy.end()
            raise
        return pid, resume, proxy

    def _write_egress_policy(self, record: SandboxRecord) -> Path:
        """The egress proxy's policy for this boot, from the sandbox's internet settings."""
        settings = record.config.internet_settings
        path = sandbox_dir(self.vm_id) / "egress.json"
        write_json(path, {"allowed_domains": settings.allowed_domains, "extra_hosts": settings.extra_hosts})
        return path

    def _first_template(self, record: SandboxRecord, image: ImageVersion, accel: str) -> None:
        """A first start of a shape that has no template yet makes one (a boot and a save,
        once for every later sandbox of the shape), and this sandbox's still unused disk
        becomes an overlay of its disk. Failing that, it boots cold."""
        config = record.config
        marker = sandbox_dir(self.vm_id) / RESUME_FROM
        if record.state != VMState.CREATED or marker.exists() or not starts_fast(config, _image_size(image.dir)):
            return
        template = templates.for_sandbox(image, config.memory, config.vcpus, accel, len(config.mounts))
        if template is not None:
            create_overlay(template.disk, sandbox_dir(self.vm_id) / "disk.qcow2", config.disk_size)
            template.saved().write(marker)

    def _saved_machine(self, record: SandboxRecord, accel: str) -> templates.SavedMachine | None:
        """The saved machine this sandbox's disk was made with, if it has not booted yet."""
        saved = templates.SavedMachine.read(sandbox_dir(self.vm_id) / RESUME_FROM)
        if record.state != VMState.CREATED or saved is None:
            return None
        if saved.state.is_file() and saved.accel == accel:
            return saved
        if saved.cold_ok:  # a template's disk boots cold just as well
            return None
        why = "its saved machine is gone" if not saved.state.is_file() else f"it was saved under {saved.accel}"
        raise SnapshotError(f"sandbox {self.vm_id!r} cannot resume: {why}; delete it")

    def _boot_watch(self, spec: LaunchSpec, pid: int) -> Callable[[], bool]:
        """Whether QEMU still runs; also keeps the console, which dies with QEMU, about a second behind."""
        saved = [time.monotonic()]

        def alive() -> bool:
            if not self._backend.owns(spec, pid):
                return False
            if time.monotonic() - saved[0] > 1.0:
                self._save_console(spec)
                saved[0] = time.monotonic()
            return True

        return alive

    def _close_ssh(self) -> None:
        if self._ssh_client is not None:
            self._ssh_client[1].close()
            self._ssh_client = None

    def stop(self) -> None:
        """Flush the guest's disk and end its machine; the disk is kept for ``start``."""
        self._close_ssh()
        with self._lifecycle():
            record = self._refresh()
            if record.state not in (VMState.RUNNING, VMState.PAUSED):
                return
            spec = self._spec(record)
            if record.state == VMState.PAUSED:
                self._backend.resume(spec)  # a paused guest cannot flush its disk
            try:
                self._connections.release()
                with self._connections.port(spec.agent_sockets, wait=15) as sock, AgentConnection.open(sock, 5) as conn:
                    conn.call("sync_disks", timeout=10)
            except SmolVMError:
                pass  # a hung or busy guest is stopped all the same
            self._save_console(spec)
            self._backend.stop(spec, record.pid)
            egress.stop(spec)
            self._store.update(self.vm_id, state=VMState.STOPPED, pid=None)
            self._refresh()

    def delete(self) -> None:
        """End the machine if it runs and remove everything the sandbox had."""
        self._close_ssh()
        self._connections.release()
        with self._lifecycle():
            try:
                record = self._refresh()
            except VMNotFoundError:
                return
            spec = self._spec(record)
            if record.pid is not None:
                self._backend.stop(spec, record.pid, timeout=2)
            egress.stop(spec)
            shutil.rmtree(spec.runtime, ignore_errors=True)
            shutil.rmtree(sandbox_dir(self.vm_id), ignore_errors=True)
            self._store.remove(self.vm_id)
        snapshots.collect()  # a deleted snapshot's disk it may have been the last to need

    def pause(self) -> None:
        with self._lifecycle():
            record = self._require(VMState.RUNNING, "pause")
            self._backend.pause(self._spec(record))
            self._store.update(self.vm_id, state=VMState.PAUSED)
            self._refresh()

    def resume(self) -> None:
        with self._lifecycle():
            record = self._require(VMState.PAUSED, "resume")
            self._backend.resume(self._spec(record))
            self._store.update(self.vm_id, state=VMState.RUNNING)
            self._refresh()

    def _require(self, state: VMState, action: str) -> SandboxRecord:
        record = self._refresh()
        if record.state != state:
            raise SandboxStateError(
                f"cannot {action} sandbox {self.vm_id!r}: it is {record.state.value}, not {state.value}"
            )
        return record

    def logs(self) -> str:
        """The guest console's output (the last MiB)."""
        record = self._refresh()
        spec = self._spec(record)
        if record.state in (VMState.RUNNING, VMState.PAUSED):
            self._save_console(spec)
        path = sandbox_dir(self.vm_id) / "console.log"
        return path.read_bytes().decode(errors="replace") if path.exists() else ""

    def _save_console(self, spec: LaunchSpec) -> None:
        try:
            data = self._backend.console(spec)
        except (SmolVMError, OSError):
            return
        path = sandbox_dir(self.vm_id) / "console.log"
        old = path.read_bytes() if path.exists() else b""
        path.write_bytes((old + data)[-CONSOLE_LOG_MAX:])

    # -- the agent ------------------------------------------------------
    @contextmanager
    def _agent(self, timeout: float = 30.0) -> Iterator[AgentConnection]:
        record = self._refresh()  # another process may have paused or stopped it
        if record.state != VMState.RUNNING:
            how = "resume" if record.state == VMState.PAUSED else "start"
            raise SandboxStateError(
                f"sandbox {self.vm_id!r} is {record.state.value}, not running: {how} it first "
                f"('smolvm sandbox {how} {self.vm_id}' or vm.{how}())"
            )
        assert record.pid is not None
        sockets = self._spec(record).agent_sockets
        use = watchdog.in_use(sandbox_dir(self.vm_id)) if record.config.idle_timeout is not None else nullcontext()
        with use, self._connections.connection(sockets, record.pid, timeout, wait=min(LOCK_WAIT, timeout)) as conn:
            yield conn

    def run(self, cmd: str, timeout: float = 30, **options: Any) -> CommandResult:
        """Run ``cmd`` with bash to its end: ``vm.commands.foreground`` (``env``, ``cwd``,
        ``max_output``, ``on_stdout``, ``on_stderr``, ``stdin``)."""
        return self.commands.foreground(cmd, timeout, **options)

    def spawn(
        self, cmd: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None
    ) -> Process:
        """Start ``cmd`` in the background and return at once: ``vm.commands.spawn``."""
        return self.commands.spawn(cmd, env=env, cwd=cwd, user=user)

    def processes(self) -> builtins.list[ProcessInfo]:
        """The background processes of this sandbox: ``vm.commands.list``."""
        return self.commands.list()

    def get_process(self, pid: int) -> Process:
        """A handle on a background process of this sandbox: ``vm.commands.connect``."""
        return self.commands.connect(pid)

    def shell(self, cmd: str | None = None) -> int:
        """An interactive login shell (or ``cmd``) on this terminal: ``vm.pty.shell``."""
        return self.pty.shell(cmd)

    def upload_file(self, local_path: str | os.PathLike[str], guest_path: str, timeout: float = 600) -> None:
        """Copy a host file into the sandbox, creating parent directories."""
        local = Path(local_path)
        guest = check_guest_path(guest_path)
        if not local.is_file():
            raise ValidationError(f"{local} is not a file on this host: check the path")
        if self._comm == "ssh":
            ssh.upload(self._ssh(), local, guest, timeout)
            return
        deadline = time.monotonic() + timeout  # connecting counts against it too
        with self._transfer() as disk, self._agent(timeout) as conn:
            conn.write_file(local, guest, max(0.001, deadline - time.monotonic()), disk)

    def download_file(self, guest_path: str, local_path: str | os.PathLike[str], timeout: float = 600) -> None:
        """Copy a sandbox file to the host. On failure no partial file is left."""
        guest = check_guest_path(guest_path)
        local = Path(local_path)
        if local.is_dir():
            raise ValidationError(f"{local} is a directory: give the file name to write to")
        if local.exists() and not local.is_file():
            raise ValidationError(f"{local} is not a regular file: give a file name to write to")
        if self._comm == "ssh":
            ssh.download(self._ssh(), guest, local, timeout, MAX_DOWNLOAD)
            return
        deadline = time.monotonic() + timeout
        with self._transfer() as disk, self._agent(timeout) as conn:
            conn.read_file(guest, local, max(0.001, deadline - time.monotonic()), disk)

    def upload_dir(self, local_path: str | os.PathLike[str], guest_path: str, timeout: float = 600) -> TreeReport:
        """Copy a host directory tree into the sandbox (see ``Files.upload_dir``)."""
        return self.files.upload_dir(local_path, guest_path, timeout)

    def download_dir(self, guest_path: str, local_path: str | os.PathLike[str], timeout: float = 600) -> TreeReport:
        """Copy a sandbox directory tree to a new or empty host directory (see ``Files.download_dir``)."""
        return self.files.download_dir(guest_path, local_path, timeout)

    # -- snapshots and forks: smolvm/snapshots.py ------------------------
    def snapshot(
        self, snapshot_type: SnapshotType | str = SnapshotType.FULL, *, name: str | None = None
    ) -> SnapshotInfo:
        """Save the sandbox as it is now; it runs on. ``FULL``: memory, processes and disk,
        restored running; ``DISK``: its disk only (restoring it boots). ``name``: a label."""
        return snapshots.take(self, snapshot_type, name).info()

    @classmethod
    def from_snapshot(cls, snapshot_id: str, vm_id: str | None = None) -> SmolVM:
        """A new running sandbox made from a snapshot (its own id, disk and identity);
        deleted on leaving its ``with`` block, as one made there."""
        return snapshots.restore(snapshot_id, vm_id)

    def fork(self, count: int = 1) -> builtins.list[SmolVM]:
        """``count`` new running sandboxes, each a copy of this one as it is now (files,
        memory, processes) with an identity of its own; this one runs on."""
        return snapshots.fork(self, count)

    @staticmethod
    def list_snapshots() -> builtins.list[SnapshotInfo]:
        return snapshots.list_all()

    @staticmethod
    def delete_snapshot(snapshot_id: str) -> builtins.list[str]:
        """Delete a snapshot; returns the sandboxes restored from it that still use its
        disk, which is kept until they are deleted."""
        return snapshots.delete(snapshot_id)

    # -- SSH ------------------------------------------------------------
    def ssh_commands(self) -> dict[str, Any]:
        """Ready command lines (``ssh``, ``scp``, ``rsync``) and their parts, trusting
        only this sandbox's pinned host key. Starts sshd in the guest if needed."""
        keys, port = self._ssh_access()
        return ssh.commands(self.vm_id, keys, port)

    def _ssh_access(self) -> tuple[ssh.Keys, int]:
        """The sandbox's SSH keys and the host port that reaches its sshd, set up on first use
        after each boot: keys into the guest, sshd started, a forward on 127.0.0.1."""
        record = self._require(VMState.RUNNING, "use SSH on")
        with self._locked(sandbox_dir(self.vm_id) / "ssh.lock", "setting up SSH", 60):
            keys = ssh.make_keys(sandbox_dir(self.vm_id) / "ssh", self.vm_id)
            state = ssh.read_state(keys)
            port = state.get("port")
            if state.get("pid") == record.pid and isinstance(port, int):
                return keys, port
            with self._agent() as conn:
                for local, guest in (
                    (keys.host_key, ssh.GUEST_HOST_KEY),
                    (keys.authorized_keys, ssh.GUEST_AUTHORIZED_KEYS),
                    (keys.sshd_config, ssh.GUEST_CONFIG),
                ):
                    conn.write_file(local, guest, 30)
                code, _, err = conn.exec(ssh.START_SSHD, timeout=30)
            if code != 0:
                raise HostError(
                    f"sshd did not start in sandbox {self.vm_id!r}: {clean(err.decode(errors='replace'), 500)}"
                )
            port = self._forward(self._spec(record), ssh.GUEST_PORT)
            write_json(keys.state, {"pid": record.pid, "port": port})
            return keys, port

    def _forward(self, spec: LaunchSpec, guest_port: int, host_port: int | None = None) -> int:
        """Forward a port on the host's 127.0.0.1 (a free one unless given) to ``guest_port``."""
        if host_port is not None:
            if ports.in_use(host_port):
                raise ValidationError(f"port {host_port} on 127.0.0.1 is already in use on this host: pick another")
            self._backend.forward(spec, host_port, guest_port)
            return host_port
        for _ in range(5):
            try:
                port = ports.free_port()
                self._backend.forward(spec, port, guest_port)
                return port
            except HostError:
                continue  # taken between the check and QEMU's bind: another
        raise HostError("could not find a free port on 127.0.0.1 to forward")

    # -- exposed ports: vm.ports ----------------------------------------
    def expose_local(self, guest_port: int, host_port: int | None = None) -> int:
        """Forward 127.0.0.1:``host_port`` (a free one unless given) to ``guest_port``: ``vm.ports.expose``."""
        return self.ports.expose(guest_port, host_port)

    def unexpose_local(self, host_port: int) -> None:
        """Stop forwarding 127.0.0.1:``host_port``: ``vm.ports.close``."""
        self.ports.close(host_port)

    def list_exposed(self) -> builtins.list[ExposedPort]:
        """The exposed ports of the running sandbox: ``vm.ports.list``."""
        return self.ports.list()

    def _ssh(self) -> paramiko.SSHClient:
        """An SSH connection to the guest, kept by this handle while it works."""
        keys, port = self._ssh_access()
        if self._ssh_client is not None:
            cached_port, client = self._ssh_client
            transport = client.get_transport()
            if cached_port == port and transport is not None and transport.is_active():
                return client
            client.close()
        client = ssh.connect(self.vm_id, keys, port)
        self._ssh_client = (port, client)
        return client

    def set_env_vars(self, env_vars: Mapping[str, str]) -> None:
        """Set variables that every later command (and login shell) sees."""
        values = check_env(env_vars)
        with self._agent() as conn:
            conn.call("env_set", vars=values)

    def unset_env_vars(self, keys: Iterable[str]) -> builtins.list[str]:
        """Remove variables; returns the ones that were set."""
        names = [keys] if isinstance(keys, str) else list(keys)
        check_env({k: "" for k in names})
        with self._agent() as conn:
            removed = conn.call("env_unset", keys=names).get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(k, str) and k in names for k in removed):
            raise GuestError("the guest agent answered env_unset with names that were not asked for")
        return [k for k in names if k in removed]

    def list_env_vars(self) -> dict[str, str]:
        """The variables set with set_env_vars, checked: names as set_env_vars takes
        them, values valid text."""
        with self._agent() as conn:
            values = conn.call("env_list").get("vars", {})
        if not isinstance(values, dict):
            raise GuestError("the guest agent sent a malformed variable list")
        checked = {}
        for key, value in values.items():
            if not P.ENV_KEY.match(key):
                raise GuestError(f"the guest agent sent a bad variable name {clean(key, 100)!r}")
            checked[key] = guest_text(value, f"value of variable {key}")
        return checked

    # -- context manager ------------------------------------------------
    def __enter__(self) -> SmolVM:
        try:
            self.start()
        except BaseException:
            if self._owned:
                self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.delete()

    def __repr__(self) -> str:
        return f"SmolVM(vm_id={self.vm_id!r}, state={self._record.state.value!r})"


def boot_breakdown(launch: float, wait: float, info: Mapping[str, Any]) -> dict[str, float]:
    """Where a boot's time went, in seconds, from the host's clock and the guest's uptime marks."""

    def num(value: object) -> float:
        return float(value) if isinstance(value, (int, float)) and 0 <= value < 3600 else 0.0

    boot = info.get("boot")
    marks: Mapping[str, Any] = boot if isinstance(boot, dict) else {}
    uptime, started = num(info.get("uptime")), num(info.get("started_at"))
    initramfs, rootfs, init = (num(marks.get(k)) for k in ("initramfs", "rootfs", "init"))
    return {
        "hypervisor_start": launch,  # choosing KVM/TCG and starting QEMU
        "firmware": max(0.0, wait - uptime),  # before the guest's clock starts: firmware, kernel unpacking
        "kernel": initramfs,
        "initramfs": max(0.0, rootfs - initramfs),
        "init": max(0.0, init - rootfs),
        "agent_start": max(0.0, started - init),
        "agent_ready": max(0.0, uptime - started),
        "boot_total": launch + wait,
    }


def starts_fast(config: VMConfig, image_size: int) -> bool:
    """Whether a sandbox starts from a saved machine of its shape: asked to, and with the
    image's disk size (a template's disk is the image's)."""
    return config.fast_start and config.disk_size in (None, image_size)


def _image_size(image_dir: Path) -> int:
    try:
        return int(json.loads((image_dir / "manifest.json").read_text())["disk_size_mib"])
    except (OSError, ValueError, KeyError):
        return 0


def _pydantic_message(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            field = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{field}: {msg}" if field else msg)
        return "; ".join(parts)
    return str(exc)
