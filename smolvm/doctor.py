"""``smolvm doctor``: checks that this host can run sandboxes, with a fix for each failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

from . import cgroups, jail, templates
from .backends.accel import choose_accel, kvm_openable
from .backends.qemu import ADDRESS_OVERHEAD_MIB, QEMU_BINARY, mapped_memory_supported
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
        if mapped_memory_supported(qemu):
            checks.append(Check("snapshot memory", "ok", "copies restored from one snapshot share its memory"))
        else:
            checks.append(
                Check(
                    "snapshot memory",
                    "warn",
                    "QEMU before 8.2: each restored copy loads its own memory (none is shared)",
                    "on Debian 12, 'sudo smolvm setup' installs QEMU from bookworm-backports",
                )
            )
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
            checks.append(Check("fast start", "ok", "a saved template: default sandboxes resume it; "
                                "another shape saves its own on its first start"))  # fmt: skip
        else:
            checks.append(
                Check("fast start", "warn", "no saved template for this image yet: the first sandbox's start "
                      "makes one (a cold boot and a save)", "run 'smolvm setup' to make it now")
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
            "nothing by itself, and HTTP(S) only through smolvm's policy proxy "
            "(default: public addresses; never this host, private ranges or 169.254.169.254)",
        )
    )
    checks.append(hypervisor_check())
    checks.append(bounds_check())
    return checks


def hypervisor_check() -> Check:
    if jail.wanted() and (reason := jail.blocker()) is not None:
        return Check(
            "hypervisor jail",
            "warn",
            f"running as root, but QEMU runs NOT jailed: {reason}",
            f"run SmolVM as a normal user, or as a root that holds {', '.join(jail.CAPS_NEEDED.values())} "
            f"and maps ids {jail.UID_BASE}-{jail.UID_BASE + jail.UID_COUNT - 1}",
        )
    if jail.wanted():
        return Check(
            "hypervisor jail",
            "ok",
            f"running as root: each sandbox's QEMU drops to a uid of its own ({jail.UID_BASE}-"
            f"{jail.UID_BASE + jail.UID_COUNT - 1}) with no capabilities, chrooted into an empty "
            "directory, its seccomp filters denying spawn and any change of ids but that drop",
        )
    return Check(
        "hypervisor jail",
        "ok",
        "not root: QEMU runs as you (nothing to drop), its seccomp filter denying spawn and privilege changes",
    )


def bounds_check() -> Check:
    memory = f"memory: each QEMU may map at most its sandbox's memory + {ADDRESS_OVERHEAD_MIB} MiB (RLIMIT_AS, hard)"
    guest = "inside the guest, commands share its vCPUs under a cgroup (see the README)"
    cells = cgroups.tree(make=False)
    if isinstance(cells, str):
        return Check(
            "resource bounds",
            "warn",
            f"{memory}; CPU: not capped ({cells}); {guest}",
            "a guest can keep its vCPUs busy: give sandboxes no more vCPUs than you can spare",
        )
    return Check(
        "resource bounds",
        "ok",
        f"{memory}; CPU: each QEMU in a cgroup of its own ({cells.root}/PID, cgroup v1), capped at "
        f"its vCPUs' count of cores or its cpu_limit; {guest}",
    )


def as_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
