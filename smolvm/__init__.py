"""SmolVM: disposable Linux microVMs for running untrusted code."""

from .exceptions import SmolVMError
from .sandbox import SmolVM
from .types import CommandResult, InternetSettings, SnapshotType, VMConfig, VMState

__all__ = ["CommandResult", "InternetSettings", "SmolVM", "SmolVMError", "SnapshotType", "VMConfig", "VMState"]
__version__ = "0.1.0"
