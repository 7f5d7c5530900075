"""Public data types: sandbox configuration, command results, states."""

from __future__ import annotations

import enum
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from .mounts import Mount, check_mounts

ID_PATTERN = re.compile(r"\A[a-z0-9][a-z0-9-]{0,47}\Z")
ID_RULE = "1 to 48 characters: lower-case letters, digits and '-', starting with a letter or digit"


class VMState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class SnapshotType(str, enum.Enum):
    """What a snapshot keeps: FULL the running machine (memory, devices) and its disk;
    DISK the disk alone (restoring it boots). DIFF, the reference's name for a
    memory snapshot of changed pages only, is not supported."""

    FULL = "full"
    DIFF = "diff"
    DISK = "disk"


class SnapshotInfo(BaseModel):
    """A saved sandbox: ``SmolVM.from_snapshot(snapshot_id)`` makes a new one from it."""

    model_config = ConfigDict(frozen=True)

    snapshot_id: str
    vm_id: str  # the sandbox it was taken from (which may be gone)
    type: SnapshotType
    size: int  # bytes on the host's disk
    created_at: float
    name: str | None = None


class ImageInfo(BaseModel):
    """A built image: ``SmolVM(image=name)`` makes sandboxes of it."""

    model_config = ConfigDict(frozen=True)

    name: str
    base: str | None  # the image it was built on (None: made by 'smolvm setup')
    created_at: float
    size: int  # bytes on the host's disk of its layers
    steps: list[str]  # its recipe, a line a step
    cached_steps: int = 0  # of the build that made it: steps found in the cache
    built_steps: int = 0  # and steps that ran
    config: dict[str, Any] = {}  # env, workdir, user, cmd, entrypoint, labels, expose


class CommandResult(BaseModel):
    """What a command left behind: its exit code and its whole output."""

    model_config = ConfigDict(frozen=True)

    exit_code: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """stdout without surrounding whitespace."""
        return self.stdout.strip()


class InternetSettings(BaseModel):
    """What a sandbox may reach on the network. The default: public addresses over
    HTTP and HTTPS, by any name; never the host, private ranges or the metadata address.

    ``allowed_domains``: only these names (``example.org``) and subdomains
    (``*.example.org``), checked on every connection; ``[]``: no egress at all.
    ``allow_host_ports``: ports on the host's 127.0.0.1 the guest may reach, as
    ``host.smolvm.internal:PORT``. ``extra_hosts``: names resolved to these
    addresses before DNS (an exact allowed name may point at a private address).
    ``trust_host_cas``: the guest trusts the certificate authorities the host adds to
    its distribution's (a TLS-inspecting proxy's), as well as its own (smolvm/cas.py).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_domains: list[str] | None = None
    trust_host_cas: bool = True
    allow_host_ports: list[StrictInt] = Field(default_factory=list, max_length=64)
    extra_hosts: dict[str, str] = Field(default_factory=dict, max_length=256)

    @field_validator("allowed_domains")
    @classmethod
    def _check_domains(cls, value: list[str] | None) -> list[str] | None:
        from .netproxy import check_domain

        if value is None:
            return None
        if len(value) > 1024:
            raise ValueError("at most 1024 allowed domains")
        return sorted(set(check_domain(entry) for entry in value))

    @field_validator("allow_host_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if isinstance(port, bool) or not 1 <= port <= 65535:
                raise ValueError(f"host port {port!r} is not a port number from 1 to 65535")
        return sorted(set(value))

    @field_validator("extra_hosts")
    @classmethod
    def _check_hosts(cls, value: dict[str, str]) -> dict[str, str]:
        import ipaddress

        from .netproxy import check_domain

        checked = {}
        for name, address in value.items():
            if name.startswith("*"):
                raise ValueError(f"extra_hosts name {name!r} must be a plain name, not a wildcard")
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"extra_hosts[{name!r}] must be an IP address, not {address!r}") from None
            checked[check_domain(name)] = str(ip)
        return checked


def _max_vcpus() -> int:
    return os.cpu_count() or 1


MAX_LIFETIME = 30 * 24 * 3600.0  # seconds: smolvm.watchdog's bound too


class VMConfig(BaseModel):
    """How a sandbox is made. Sizes are in MiB."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vm_id: str | None = Field(default=None, description="the sandbox's id; generated when empty")
    image: str = "default"
    memory: int = Field(default=512, ge=128, le=65536, description="guest memory in MiB")
    vcpus: int = Field(default=1, ge=1, le=64)
    cpu_limit: float | None = Field(
        default=None, ge=0.05, le=64, description="cores the sandbox may use in all (its vCPUs' count when empty)"
    )
    disk_size: int | None = Field(default=None, ge=1024, le=1024 * 1024, description="guest disk in MiB")
    internet_settings: InternetSettings = Field(default_factory=InternetSettings)
    mounts: list[Mount] = Field(default_factory=list, description="host folders seen in the guest")
    fast_start: bool = Field(default=True, description="start from a saved booted machine of this shape")
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=MAX_LIFETIME,
        strict=True,
        description="seconds after each start at which the sandbox is deleted",
    )
    idle_timeout: float | None = Field(
        default=None, gt=0, le=MAX_LIFETIME, strict=True, description="seconds without a call after which it is deleted"
    )

    @field_validator("vm_id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise ValueError(f"sandbox id {value!r} is not valid: use {ID_RULE}")
        return value

    @field_validator("mounts")
    @classmethod
    def _check_mounts(cls, value: list[Mount]) -> list[Mount]:
        return check_mounts(value)

    @field_validator("vcpus")
    @classmethod
    def _check_vcpus(cls, value: int) -> int:
        if value > _max_vcpus():
            raise ValueError(f"{value} vCPUs asked for, this host has {_max_vcpus()}")
        return value

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"image name {value!r} is not valid: use {ID_RULE}")
        return value
