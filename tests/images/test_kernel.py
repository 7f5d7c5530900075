"""Unpacking a bzImage for PVH boot: pure logic on synthetic kernels."""

from __future__ import annotations

import gzip
import lzma
import struct

from smolvm.images.kernel import decompress, payload, pvh_kernel

PVH = struct.pack("<III4s", 4, 4, 18, b"Xen\0") + b"\0\0\x10\0"


def fake_bzimage(inner: bytes, setup_sects: int = 2) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(inner))
    return bytes(head) + b"\0" * 16 + inner + b"trailer"


def test_payload_is_found_by_the_boot_header() -> None:
    assert payload(fake_bzimage(b"PAYLOAD")) == b"PAYLOAD"


def test_not_a_bzimage() -> None:
    assert payload(b"\0" * 4096) is None
    assert payload(b"short") is None
    bad = bytearray(fake_bzimage(b"x" * 10))
    struct.pack_into("<II", bad, 0x248, 16, 10**9)  # length past the end
    assert payload(bytes(bad)) is None


def test_decompress_by_magic() -> None:
    assert decompress(gzip.compress(b"kernel")) == b"kernel"
    assert decompress(lzma.compress(b"kernel")) == b"kernel"
    assert decompress(b"unknown format") is None
    assert decompress(b"\x1f\x8b broken gzip") is None


def test_pvh_kernel_needs_elf_and_the_pvh_note() -> None:
    elf = b"\x7fELF" + b"\0" * 100 + PVH + b"\0" * 100
    assert pvh_kernel(fake_bzimage(gzip.compress(elf))) == elf
    no_note = b"\x7fELF" + b"\0" * 200
    assert pvh_kernel(fake_bzimage(gzip.compress(no_note))) is None
    not_elf = b"MZ" + PVH
    assert pvh_kernel(fake_bzimage(gzip.compress(not_elf))) is None
