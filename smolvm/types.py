"""Public data types: sandbox configuration, command results, states."""

from __future__ import annotations

import enum
import os
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

ID_PATTERN = re.compile(r"\A[a-z0-9][a-z0-9-]{0,47}\Z")
ID_RULE = "1 to 48 characters: lower-case letters, digits and '-', starting with a letter or digit"


class VMState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class SnapshotType(str, enum.Enum):
    FULL = "full"
    DIFF = "diff"


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


def _max_vcpus() -> int:
    return os.cpu_count() or 1


class VMConfig(BaseModel):
    """How a sandbox is made. Sizes are in MiB."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vm_id: str | None = Field(default=None, description="the sandbox's id; generated when empty")
    image: str = "default"
    memory: int = Field(default=512, ge=128, le=65536, description="guest memory in MiB")
    vcpus: int = Field(default=1, ge=1, le=64)
    disk_size: int | None = Field(default=None, ge=1024, le=1024 * 1024, description="guest disk in MiB")

    @field_validator("vm_id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise ValueError(f"sandbox id {value!r} is not valid: use {ID_RULE}")
        return value

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
