"""The frame format shared by host and guest: encoding, decoding, resynchronisation."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvm import protocol as P


def decode_all(*chunks: bytes) -> tuple[list[P.Frame], P.Decoder]:
    decoder = P.Decoder()
    frames: list[P.Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frames.extend(decoder.frames())
    return frames, decoder


def test_header_is_24_bytes_and_frame_layout() -> None:
    frame = P.encode(P.DATA, b"abc", stream=7, channel=P.STDERR)
    assert P.HEADER.size == 24
    assert len(frame) == 24 + 3
    magic, kind, channel, flags, stream, length, crc, hcrc = P.HEADER.unpack_from(frame)
    assert (magic, kind, channel, flags, stream, length) == (P.MAGIC, P.DATA, P.STDERR, 0, 7, 3)
    assert crc == zlib.crc32(b"abc")
    assert hcrc == zlib.crc32(frame[:20])
    assert frame[24:] == b"abc"


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 7, b"\xf5SMV" * 100, b"\0" * P.MAX_PAYLOAD])
def test_data_round_trip(payload: bytes) -> None:
    frames, decoder = decode_all(P.encode(P.DATA, payload, stream=42, channel=P.STDOUT))
    assert len(frames) == 1
    f = frames[0]
    assert (f.kind, f.channel, f.stream, f.payload) == (P.DATA, P.STDOUT, 42, payload)
    assert decoder.skipped == 0


def test_msg_round_trip_uses_id_as_stream() -> None:
    msg = {"op": "exec", "id": 9, "cmd": "echo héllo", "env": {"A": "1"}}
    frames, _ = decode_all(P.encode_msg(msg))
    assert len(frames) == 1
    assert frames[0].kind == P.MSG
    assert frames[0].stream == 9
    assert frames[0].msg() == msg


def test_many_frames_fed_byte_by_byte() -> None:
    wire = b"".join(P.encode_msg({"op": "ping", "id": i}) for i in range(1, 6))
    decoder = P.Decoder()
    got: list[int] = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        got.extend(f.msg()["id"] for f in decoder.frames())
    assert got == [1, 2, 3, 4, 5]
    assert decoder.skipped == 0


def test_encode_data_cuts_into_chunks() -> None:
    data = bytes(range(256)) * (P.CHUNK * 2 // 256) + b"tail"
    wire = list(P.encode_data(5, P.FILE, data))
    assert len(wire) == 3
    frames, _ = decode_all(*wire)
    assert [len(f.payload) for f in frames] == [P.CHUNK, P.CHUNK, 4]
    assert all(f.stream == 5 and f.channel == P.FILE for f in frames)
    assert b"".join(f.payload for f in frames) == data


def test_encode_data_of_nothing_is_no_frames() -> None:
    assert list(P.encode_data(1, P.FILE, b"")) == []


def test_encode_rejects_payload_over_max() -> None:
    with pytest.raises(P.ProtocolError):
        P.encode(P.DATA, b"\0" * (P.MAX_PAYLOAD + 1))
    P.encode(P.DATA, b"\0" * P.MAX_PAYLOAD)  # the limit itself is allowed


def test_encode_msg_rejects_huge_message() -> None:
    with pytest.raises(P.ProtocolError):
        P.encode_msg({"op": "x", "id": 1, "blob": "a" * P.MAX_PAYLOAD})


def test_resync_after_garbage() -> None:
    good = P.encode_msg({"op": "ok", "id": 3})
    garbage = b"random junk \xf5SM \xf5S" + bytes(range(256))
    frames, decoder = decode_all(garbage + good)
    assert [f.msg()["id"] for f in frames] == [3]
    assert decoder.skipped >= len(garbage)


def test_resync_after_garbage_fed_separately_keeps_memory_bounded() -> None:
    decoder = P.Decoder()
    decoder.feed(b"\x01" * 100_000)
    assert list(decoder.frames()) == []
    assert len(decoder._buf) < P.HEAD_START_SIZE
    assert decoder.skipped > 99_990
    decoder.feed(P.encode_msg({"op": "ok", "id": 1}))
    assert [f.msg()["op"] for f in decoder.frames()] == ["ok"]


def test_magic_split_across_feeds_is_kept() -> None:
    wire = P.encode_msg({"op": "ok", "id": 1})
    frames, _ = decode_all(b"zzz" + wire[:2], wire[2:])
    assert len(frames) == 1


def test_resync_after_truncated_frame_and_pad() -> None:
    """A peer died mid-frame: the reader waits for the rest; PAD completes it, then a real frame follows."""
    truncated = P.encode(P.DATA, b"y" * 5000, stream=1, channel=P.STDOUT)[:3000]
    good = P.encode_msg({"op": "sync", "id": 0, "nonce": "n1"})
    decoder = P.Decoder()
    decoder.feed(truncated)
    assert list(decoder.frames()) == []  # still waiting for the payload
    decoder.feed(P.PAD + good)
    frames = list(decoder.frames())
    assert len(frames) == 1
    assert frames[0].msg() == {"op": "sync", "id": 0, "nonce": "n1"}


def test_pad_completes_a_frame_announcing_max_payload() -> None:
    truncated = P.encode(P.DATA, b"z" * P.MAX_PAYLOAD, stream=1, channel=P.STDOUT)[: P.HEADER.size + 10]
    good = P.encode_msg({"op": "ok", "id": 2})
    frames, _ = decode_all(truncated, P.PAD, good)
    assert [f.msg()["id"] for f in frames] == [2]


def test_pad_alone_yields_nothing() -> None:
    frames, decoder = decode_all(P.PAD)
    assert frames == []
    assert len(decoder._buf) < P.HEAD_START_SIZE


def test_header_crc_corruption_is_skipped() -> None:
    bad = bytearray(P.encode_msg({"op": "evil", "id": 1}))
    bad[22] ^= 0xFF  # inside hcrc
    good = P.encode_msg({"op": "ok", "id": 2})
    frames, decoder = decode_all(bytes(bad) + good)
    assert [f.msg()["op"] for f in frames] == ["ok"]
    assert decoder.skipped > 0


def test_header_field_corruption_is_skipped() -> None:
    bad = bytearray(P.encode(P.DATA, b"abc", stream=1, channel=P.STDOUT))
    bad[9] ^= 0x01  # stream id changes, hcrc no longer matches
    good = P.encode(P.DATA, b"def", stream=1, channel=P.STDOUT)
    frames, _ = decode_all(bytes(bad) + good)
    assert [f.payload for f in frames] == [b"def"]


def test_payload_crc_corruption_is_skipped() -> None:
    bad = bytearray(P.encode(P.DATA, b"abcdef", stream=1, channel=P.STDOUT))
    bad[-1] ^= 0xFF
    good = P.encode(P.DATA, b"ok", stream=1, channel=P.STDOUT)
    frames, _ = decode_all(bytes(bad) + good)
    assert [f.payload for f in frames] == [b"ok"]


def _forged(kind: int, length: int, payload: bytes = b"") -> bytes:
    head = struct.pack("!4sBBHIII", P.MAGIC, kind, 0, 0, 1, length, zlib.crc32(payload))
    return head + struct.pack("!I", zlib.crc32(head)) + payload


def test_header_announcing_too_much_is_skipped_without_waiting() -> None:
    """A valid-CRC header claiming more than MAX_PAYLOAD must not make the reader buffer it."""
    good = P.encode_msg({"op": "ok", "id": 4})
    frames, _ = decode_all(_forged(P.DATA, P.MAX_PAYLOAD + 1) + good)
    assert [f.msg()["id"] for f in frames] == [4]


def test_unknown_kind_is_skipped() -> None:
    good = P.encode_msg({"op": "ok", "id": 5})
    frames, _ = decode_all(_forged(9, 3, b"abc") + good)
    assert [f.msg()["id"] for f in frames] == [5]


@pytest.mark.parametrize("payload", [b"not json", b"\xff\xfe", b"[1, 2]", b'"op"', b'{"id": 1}', b'{"op": 3}', b""])
def test_decode_msg_rejects_non_messages(payload: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_msg(payload)


def test_decode_msg_accepts_object_with_op() -> None:
    assert P.decode_msg(json.dumps({"op": "ok", "x": [1]}).encode()) == {"op": "ok", "x": [1]}


def test_frame_msg_on_data_frame_raises() -> None:
    frames, _ = decode_all(P.encode(P.DATA, b'{"op":"ok"}', stream=1, channel=P.STDOUT))
    with pytest.raises(P.ProtocolError):
        frames[0].msg()


def test_protocol_module_is_stdlib_only() -> None:
    """The image build copies protocol.py into the guest, which has no third-party packages."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(P.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break in the guest"
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_frames_inside_a_corrupt_frame_are_not_read() -> None:
    """A real header whose payload was cut and filled by later bytes is dropped whole."""
    inner = P.encode_msg({"op": "exec", "id": 9, "cmd": "touch /pwned"})
    outer = P.encode(P.DATA, inner + b"x" * 100, stream=1, channel=P.FILE)
    corrupt = outer[:-10] + b"y" * 10  # same length, payload CRC now wrong
    d = P.Decoder()
    d.feed(corrupt + P.encode_msg({"op": "sync", "id": 0}))
    frames = list(d.frames())
    assert [f.msg()["op"] for f in frames] == ["sync"]


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_msg(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(P.ProtocolError):
        P.decode_msg(b"[]")


# -- properties: whatever arrives, however it is cut --------------------------------

frames_st = st.lists(
    st.tuples(st.sampled_from([P.MSG, P.DATA]), st.integers(0, 3), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    max_size=8,
)
cuts_st = st.lists(st.integers(1, 400), max_size=40)


def feed_in_pieces(wire: bytes, cuts: list[int]) -> tuple[list[tuple[int, int, int, bytes]], P.Decoder, int]:
    decoder = P.Decoder()
    got, pos, held = [], 0, 0
    for size in [*cuts, len(wire)]:
        decoder.feed(wire[pos : pos + size])
        pos += size
        got += [(f.kind, f.channel, f.stream, f.payload) for f in decoder.frames()]
        held = max(held, len(decoder._buf))
    return got, decoder, held


@settings(max_examples=300, deadline=None)
@given(frames_st, st.lists(st.binary(max_size=50).filter(lambda b: P.MAGIC[:1] not in b), max_size=9), cuts_st)
def test_frames_between_garbage_all_come_through_however_cut(
    frames: list[tuple[int, int, int, bytes]], garbage: list[bytes], cuts: list[int]
) -> None:
    parts = [garbage[i] if i < len(garbage) else b"" for i in range(len(frames) + 1)]
    wire = parts[0] + b"".join(P.encode(k, p, s, c) + parts[i + 1] for i, (k, c, s, p) in enumerate(frames))
    got, decoder, _ = feed_in_pieces(wire, cuts)
    assert got == frames
    # All garbage is skipped, but for a tail that could still be the start of a header.
    assert sum(map(len, parts)) - (P.HEAD_START_SIZE - 1) <= decoder.skipped <= sum(map(len, parts))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), cuts_st)
def test_any_bytes_decode_the_same_however_cut_and_memory_stays_bounded(wire: bytes, cuts: list[int]) -> None:
    whole, _, _ = feed_in_pieces(wire, [])
    pieces, _, held = feed_in_pieces(wire, cuts)
    assert pieces == whole
    assert held <= P.HEADER.size + P.MAX_PAYLOAD + max([*cuts, len(wire)])
