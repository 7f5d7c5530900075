"""Public data types: CommandResult, VMConfig validation, VMState."""

from __future__ import annotations

import os

import pydantic
import pytest

from smolvm import CommandResult, VMConfig, VMState
from smolvm.types import ID_PATTERN


def test_command_result_fields_and_properties() -> None:
    r = CommandResult(exit_code=3, stdout="hello\n", stderr="")
    assert r == CommandResult(exit_code=3, stdout="hello\n", stderr="")
    assert not r.ok
    assert r.output == "hello"
    ok = CommandResult(exit_code=0, stdout="  a b \n\n")
    assert ok.ok
    assert ok.output == "a b"
    assert ok.stderr == ""


def test_command_result_is_frozen() -> None:
    r = CommandResult(exit_code=0)
    with pytest.raises(pydantic.ValidationError):
        r.exit_code = 1  # type: ignore[misc]


def test_vm_state_values() -> None:
    assert {s.value for s in VMState} == {"created", "running", "paused", "stopped", "error"}
    assert VMState("running") is VMState.RUNNING
    assert VMState.STOPPED == "stopped"


def test_vm_config_defaults() -> None:
    c = VMConfig()
    assert (c.vm_id, c.image, c.memory, c.vcpus, c.disk_size) == (None, "default", 512, 1, None)


@pytest.mark.parametrize("vm_id", ["a", "vm-1", "0abc", "a" * 48, "abc-def-123"])
def test_valid_ids(vm_id: str) -> None:
    assert VMConfig(vm_id=vm_id).vm_id == vm_id


@pytest.mark.parametrize(
    "vm_id", ["", "../../x", "a;b", "ABC", "Vm1", "-lead", "a" * 49, "a b", "a/b", "a_b", "a.b", "é", "\na"]
)
def test_invalid_ids(vm_id: str) -> None:
    assert not ID_PATTERN.match(vm_id)
    with pytest.raises(pydantic.ValidationError):
        VMConfig(vm_id=vm_id)


@pytest.mark.parametrize("value", ["a\n", "vm-1\n"])
def test_id_with_trailing_newline_rejected(value: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        VMConfig(vm_id=value)


def test_image_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        VMConfig(image="default\n")


@pytest.mark.parametrize(
    "field,value",
    [("memory", 127), ("memory", 1), ("memory", 65537), ("vcpus", 0), ("vcpus", 65), ("disk_size", 1023)],
)
def test_out_of_range_sizes(field: str, value: int) -> None:
    with pytest.raises(pydantic.ValidationError):
        VMConfig(**{field: value})  # type: ignore[arg-type]


def test_in_range_sizes() -> None:
    c = VMConfig(memory=128, vcpus=1, disk_size=1024)
    assert (c.memory, c.disk_size) == (128, 1024)
    assert VMConfig(memory=65536).memory == 65536


def test_vcpus_above_host_cpus_rejected() -> None:
    n = os.cpu_count() or 1
    assert VMConfig(vcpus=n).vcpus == n
    with pytest.raises(pydantic.ValidationError, match="vCPUs"):
        VMConfig(vcpus=n + 1)


def test_unknown_field_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        VMConfig(memroy=512)  # type: ignore[call-arg]


def test_bad_image_name_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        VMConfig(image="../etc")


def test_assignment_is_validated() -> None:
    c = VMConfig()
    with pytest.raises(pydantic.ValidationError):
        c.memory = 1


def test_json_round_trip() -> None:
    c = VMConfig(vm_id="x1", memory=256, vcpus=1, disk_size=8192)
    assert VMConfig.model_validate_json(c.model_dump_json()) == c
