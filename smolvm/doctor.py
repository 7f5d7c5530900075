"""``smolvm doctor``: checks that this host can run sandboxes, with a fix for each failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

from . import templates
from .backends.accel import choose_accel, kvm_openable
from .backends.qemu import QEMU_BINARY
from .exceptions import SmolVMError
from .host import missing_packages
from .images.store import ImageStore, default_recipe
from .paths import data_dir
from .types import VMConfig


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def run_checks() -> list[Check]:
    checks: list[Check] = []
    try:
        missing = missing_packages()
        checks.append(
            Check("system packages", "fail", f"missing: {', '.join(missing)}", "run 'sudo smolvm setup'")
            if missing
            else Check("system packages", "ok", "all installed")
        )
    except SmolVMError as exc:
        checks.append(Check("system packages", "warn", str(exc)))

    qemu = shutil.which(QEMU_BINARY)
    if qemu:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()
        checks.append(Check("qemu", "ok", version[0] if version else qemu))
    else:
        checks.append(Check("qemu", "fail", f"{QEMU_BINARY} not found", "run 'sudo smolvm setup'"))

    image = None
    try:
        image = ImageStore().load("default", full_check=True)
        if image.recipe == default_recipe():
            checks.append(
                Check("image", "ok", f"default image verified (kernel {image.manifest.get('kernel_version')})")
            )
        else:
            checks.append(
                Check("image", "warn", "default image is older than this SmolVM's recipe", "run 'smolvm setup'")
            )
    except SmolVMError as exc:
        checks.append(Check("image", "fail", str(exc), "run 'sudo smolvm setup'"))

    opens, why = kvm_openable()
    if image is not None and qemu:
        choice = choose_accel(image.kernel, image.initrd, refresh=not os.environ.get("SMOLVM_ACCEL"))
        shape = VMConfig()
        if templates.find(image, shape.memory, shape.vcpus, choice.accel):
            checks.append(Check("fast start", "ok", "a saved template: default sandboxes resume it"))
        else:
            checks.append(
                Check("fast start", "warn", "no saved template for this image: sandboxes boot cold",
                      "run 'smolvm setup'")
            )  # fmt: skip
        if choice.accel == "kvm":
            checks.append(Check("acceleration", "ok", f"KVM: {choice.reason}"))
        elif choice.kvm_works is None:
            checks.append(Check("acceleration", "ok" if opens else "warn", choice.reason))
        else:
            checks.append(
                Check(
                    "acceleration",
                    "warn",
                    f"{choice.reason}. Sandboxes work, about 5-10x slower than with KVM",
                    "on a host with working KVM nothing is needed; SMOLVM_ACCEL=tcg skips this probe",
                )
            )
    else:
        checks.append(Check("acceleration", "warn", f"{why}; not probed without QEMU and an image"))

    directory = data_dir()
    writable = os.access(directory, os.W_OK)
    checks.append(
        Check("data directory", "ok" if writable else "fail", str(directory),
              "" if writable else "set SMOLVM_DATA_DIR to a writable directory")
    )  # fmt: skip
    checks.append(
        Check(
            "networking",
            "ok",
            "user-mode (QEMU slirp, restrict=on): rootless, no TAP or firewall rules; the guest reaches "
            "nothing by itself, and HTTP(S) only through smolvm's per-connection policy proxy "
            "(default: public addresses; never this host, private ranges or 169.254.169.254)",
        )
    )
    return checks


def as_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
