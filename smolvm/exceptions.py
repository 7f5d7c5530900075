"""Errors SmolVM raises. Every message says what happened and what to do next."""

from __future__ import annotations


class SmolVMError(Exception):
    """Base class of every error SmolVM raises on purpose."""


class ValidationError(SmolVMError):
    """An argument is malformed or out of range."""


class SandboxStateError(ValidationError):
    """The sandbox is not in a state that allows this (running, paused, stopped)."""


class ProcessNotFoundError(ValidationError):
    """No background process of the sandbox has that pid."""


class VMNotFoundError(SmolVMError):
    """No sandbox has that id."""


class VMAlreadyExistsError(SmolVMError):
    """A sandbox with that id already exists."""


class HostError(SmolVMError):
    """The host lacks something SmolVM needs (QEMU, KVM, a package)."""


class ImageError(SmolVMError):
    """The guest image is missing, out of date or corrupt."""


class BuildError(ImageError):
    """An image build failed: a step's command, a missing file, a bad Dockerfile line."""


class NetworkError(SmolVMError):
    """Sandbox networking could not be set up."""


class OperationTimeoutError(SmolVMError):
    """An operation did not finish in time."""


class SnapshotNotFoundError(SmolVMError):
    """No snapshot has that id."""


class SnapshotError(SmolVMError):
    """A snapshot cannot be taken, or its files are missing or altered."""


class GuestError(SmolVMError):
    """The guest agent failed a request or broke the protocol."""


class GuestFileNotFoundError(GuestError, FileNotFoundError):
    """A path asked for in the sandbox does not exist there."""


class OutputLimitError(SmolVMError):
    """A command produced more output than the host keeps."""
