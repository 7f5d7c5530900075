"""Unpacking the distribution's bzImage into an ELF kernel QEMU can boot directly.

An ELF kernel with a PVH entry note is loaded by QEMU straight into guest
memory and entered in 32-bit mode: no firmware and no in-guest
decompression, which under TCG is most of the second before Linux starts.
Any kernel that cannot be unpacked is used as the bzImage it is.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import struct
import subprocess

# x86 boot protocol: setup_sects at 0x1f1, payload_offset/length at 0x248
# (relative to the protected-mode code after the setup sectors).
SETUP_SECTS = 0x1F1
PAYLOAD = 0x248
# An ELF note: namesz=4, descsz, type=18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen\0".
PVH_NOTE = re.compile(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00", re.DOTALL)


def payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, per its boot header."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", bzimage, PAYLOAD)
    start = (setup_sects + 1) * 512 + offset
    if not length or start + length > len(bzimage):
        return None
    return bzimage[start : start + length]


def _tool(argv: list[str], data: bytes) -> bytes | None:
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    return proc.stdout if proc.stdout else None


def decompress(data: bytes) -> bytes | None:
    """Decompress a kernel payload by its magic; None when the format or its tool is missing."""
    try:
        if data.startswith(b"\x1f\x8b"):
            return gzip.decompress(data)
        if data.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor().decompress(data)
    except (OSError, EOFError, lzma.LZMAError):
        return None
    if data.startswith(b"\x02\x21\x4c\x18"):  # lz4 legacy frame
        return _tool(["lz4", "-dc"], data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return _tool(["zstd", "-dc"], data)
    return None


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside ``bzimage`` if it has a PVH entry point, else None."""
    inner = payload(bzimage)
    elf = decompress(inner) if inner else None
    if not elf or not elf.startswith(b"\x7fELF") or PVH_NOTE.search(elf) is None:
        return None
    return elf
