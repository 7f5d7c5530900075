"""Choosing between KVM and TCG by really booting a guest, not by trusting /dev/kvm.

Some hosts expose a /dev/kvm that opens but cannot run an ordinary kernel
(a paravirtual KVM, for one). So the probe boots the image's kernel and
initramfs under KVM and waits for the initramfs to say it ran. The answer is
cached until the host reboots. SMOLVM_ACCEL=kvm|tcg skips the probe.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ValidationError
from ..paths import data_dir, write_json
from .qemu import FIRMWARE, qemu_binary

log = logging.getLogger("smolvm")
PROBE_TIMEOUT = 8.0
PROBE_MARKER = b"SMOLVM-PROBE-OK"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str
    kvm_works: bool | None  # None: not probed (forced, or no image to probe with)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def kvm_openable() -> tuple[bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no hardware virtualization, or the kvm module is not loaded)"
    except PermissionError:
        return False, "/dev/kvm is not accessible to this user (add the user to the 'kvm' group)"
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return True, "/dev/kvm opens"


def probe_kvm(kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot kernel+initramfs under KVM; True if the initramfs reports in within ``timeout``."""
    ok, why = kvm_openable()
    if not ok:
        return False, why
    argv = [
        qemu_binary(), "-M", "microvm,accel=kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-bios", FIRMWARE,
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 smolvm.probe=1",
        "-serial", "stdio",
    ]  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        if PROBE_MARKER in out:
            return True, f"KVM booted a test guest in {time.monotonic() - start:.1f}s"
        return False, f"KVM did not boot a test guest within {timeout:.0f}s (it hangs on this host)"
    if PROBE_MARKER in proc.stdout:
        return True, f"KVM booted a test guest in {time.monotonic() - start:.1f}s"
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    return False, "KVM failed to run a test guest: " + (err[-1] if err else f"QEMU exit {proc.returncode}")


def choose_accel(kernel: Path | None, initrd: Path | None, *, refresh: bool = False) -> AccelChoice:
    forced = os.environ.get("SMOLVM_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValidationError(f"SMOLVM_ACCEL={forced!r} is not valid: use 'kvm' or 'tcg', or unset it")
        return AccelChoice(forced, f"forced by SMOLVM_ACCEL={forced}", None)
    cache = data_dir() / "accel.json"
    boot_id = _boot_id()
    if not refresh:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("boot_id") == boot_id:
                return _choice(bool(cached["kvm_works"]), str(cached["reason"]))
        except (OSError, ValueError, KeyError):
            pass
    if kernel is None or initrd is None:
        _, why = kvm_openable()
        return AccelChoice("tcg", f"{why}; no image to probe KVM with yet, using TCG", None)
    works, reason = probe_kvm(kernel, initrd)
    if not works and kvm_openable()[0]:
        # /dev/kvm is there but cannot run a guest: say so once per host boot.
        log.warning("smolvm: %s; sandboxes run under TCG (software emulation), slower. "
                    "'smolvm doctor' explains; SMOLVM_ACCEL=tcg skips this check.", reason)  # fmt: skip
    write_json(cache, {"boot_id": boot_id, "kvm_works": works, "reason": reason})
    return _choice(works, reason)


def _choice(works: bool, reason: str) -> AccelChoice:
    if works:
        return AccelChoice("kvm", reason, True)
    return AccelChoice("tcg", f"{reason}; using TCG (software emulation, slower)", False)
