"""The wire between the host and the guest agent (see docs/protocol.md).

This module is shared by both sides: the host imports it as
``smolvm.protocol`` and the image build copies it next to the guest agent.
It must therefore use the Python standard library only.

A frame is a fixed 24-byte header followed by ``length`` payload bytes::

    magic   4s   b"\\xf5SMV"
    kind    B    MSG (a JSON object) or DATA (raw bytes of one stream)
    channel B    for DATA: STDIN, STDOUT, STDERR or FILE
    flags   H    reserved, zero
    stream  I    request id the frame belongs to (0 for SYNC)
    length  I    payload length, at most MAX_PAYLOAD
    crc     I    crc32 of the payload
    hcrc    I    crc32 of the 20 bytes before it

Both CRCs let a reader that lost its place (a peer died mid-frame) scan
for the next real header instead of acting on garbage.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any

VERSION = 3
MAGIC = b"\xf5SMV"
HEADER = struct.Struct("!4sBBHIIII")
MAX_PAYLOAD = 1 << 20  # 1 MiB: bounds what either side buffers for one frame
CHUNK = 256 * 1024  # data frames are cut to this size
PAD = b"\0" * (MAX_PAYLOAD + HEADER.size)  # completes any half-read frame

MSG = 1
DATA = 2

STDIN = 0
STDOUT = 1
STDERR = 2
FILE = 3

PORT_NAME = "org.smolvm.agent"  # the ports are PORT_NAME.0 ... PORT_NAME.<PORTS-1>
PORTS = 8  # one host connection each: that many operations (a shell, a wait, a command) at once
STDIN_WINDOW = 1 << 20  # bytes of input the host may send ahead of the agent's credits
RING = 1 << 20  # bytes of each output stream the agent keeps for a background process
PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")  # a shell word that needs no quoting
# The guest's way out is an HTTP proxy the host runs for the sandbox (see smolvm/netproxy.py);
# every program that honours these variables (pip, curl, git, apt, requests) uses it. The agent
# listens at these addresses (on the guest's lo) and hands each connection to the host.
PROXY_ADDRESS = ("10.0.2.100", 3128)
HOST_ALIAS = "host.smolvm.internal"  # the host, for ports a sandbox is allowed to reach on its 127.0.0.1
HOST_ADDRESS = "10.0.2.101"  # what HOST_ALIAS names in the guest (slirp keeps the gateway, .2, to itself)
NET_PORT_NAME = "org.smolvm.net"  # the virtio-serial port of the egress control frames (docs/protocol.md)
NET_RELAY_PORT = 3130  # the guest port the host's proxy connects to, through one forward, per relayed connection
NET_TOKEN = 16  # bytes of the token that opens each of those connections, before its connection id (u32)
# The host's certificate authorities sent to the guest at each start (op "trust").
MAX_TRUSTED_PEM = 1 << 20
PEM_CERTS = re.compile(
    r"(?:-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]{1,65536}-----END CERTIFICATE-----\n)*", re.ASCII
)

PROXY_ENV = {
    name: value
    for key, value in (
        ("http_proxy", "http://%s:%d" % PROXY_ADDRESS),
        ("https_proxy", "http://%s:%d" % PROXY_ADDRESS),
        ("no_proxy", "localhost,127.0.0.1,::1," + HOST_ALIAS),
    )
    for name in (key, key.upper())
}
ENV_KEY = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")  # a variable name env_set accepts
TRANSFER_SERIAL = "smolvm-xfer"  # the virtio-blk serial of the transfer disk
APART_BATCH = 256  # big files a tree download names per message, sent apart from its tar stream
APART_FROM = 4 << 20  # bytes from which a file of a tree moves on its own, not through tar (which copies more)
TRANSFER_BLOCK = 1 << 20  # files up to this size go as DATA frames; the disk moves this much per I/O


# What a header starts with: the magic, a known kind, any channel, zero flags. Searched
# in C, so garbage (magics repeated, say) costs a CRC only where a header could be.
HEAD_START = re.compile(re.escape(MAGIC) + b"[" + bytes([MSG, DATA]) + rb"].\x00\x00", re.DOTALL)
HEAD_START_SIZE = len(MAGIC) + 4


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


def encode(kind: int, payload: bytes, stream: int = 0, channel: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = struct.pack("!4sBBHIII", MAGIC, kind, channel, 0, stream, len(payload), zlib.crc32(payload))
    return head + struct.pack("!I", zlib.crc32(head)) + payload


def encode_msg(msg: dict[str, Any]) -> bytes:
    return encode(MSG, json.dumps(msg, separators=(",", ":")).encode(), stream=int(msg.get("id", 0)))


def encode_data(stream: int, channel: int, data: bytes) -> Iterator[bytes]:
    """Frames for ``data`` on one stream, cut to CHUNK bytes each."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield encode(DATA, bytes(view[start : start + CHUNK]), stream, channel)


def decode_msg(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message is not an object with an 'op'")
    return msg


class Frame:
    __slots__ = ("channel", "kind", "payload", "stream")

    def __init__(self, kind: int, channel: int, stream: int, payload: bytes) -> None:
        self.kind = kind
        self.channel = channel
        self.stream = stream
        self.payload = payload

    def msg(self) -> dict[str, Any]:
        if self.kind != MSG:
            raise ProtocolError("expected a message frame")
        return decode_msg(self.payload)


class Decoder:
    """Turns a byte stream into frames, resynchronising after garbage.

    ``feed`` bytes in, iterate ``frames()`` out. Bytes that do not form a
    valid frame are skipped and counted in ``skipped``; memory held is
    bounded by MAX_PAYLOAD plus one read. A candidate header is checked
    field by field before its CRC, so garbage full of magics costs little.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that have not made a frame yet."""
        return len(self._buf)

    def _drop(self, count: int, skipped: int) -> None:
        del self._buf[:count]
        self.skipped += skipped

    def frames(self) -> Iterator[Frame]:
        buf = self._buf
        pos = 0  # bytes before it are garbage, dropped once the scan stops or a frame is found
        while True:
            found = HEAD_START.search(buf, pos)
            if found is None:
                # keep a tail that may be the start of a header
                keep = max(pos, len(buf) - (HEAD_START_SIZE - 1))
                self._drop(keep, keep)
                return
            pos = found.start()
            if len(buf) - pos < HEADER.size:
                self._drop(pos, pos)
                return
            _, kind, channel, _flags, stream, length, crc, hcrc = HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD or zlib.crc32(buf[pos : pos + HEADER.size - 4]) != hcrc:
                pos += 1
                continue
            end = pos + HEADER.size + length
            if len(buf) < end:
                self._drop(pos, pos)
                return
            payload = bytes(buf[pos + HEADER.size : end])
            if zlib.crc32(payload) != crc:
                # A real header whose payload was cut short and filled by what came
                # next: drop all of it, so nothing inside is read as frames.
                pos = end
                continue
            self._drop(end, pos)
            pos = 0
            yield Frame(kind, channel, stream, payload)
