"""SmolVM: disposable Linux microVMs for running untrusted code."""

from .exceptions import SmolVMError
from .images.builder import Image
from .mounts import Mount
from .sandbox import SmolVM
from .types import CommandResult, ImageInfo, InternetSettings, SnapshotType, VMConfig, VMState

__all__ = [
    "CommandResult",
    "Image",
    "ImageInfo",
    "InternetSettings",
    "Mount",
    "SmolVM",
    "SmolVMError",
    "SnapshotType",
    "VMConfig",
    "VMState",
]
__version__ = "0.1.0"
