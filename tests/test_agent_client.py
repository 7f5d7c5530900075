"""The host's wire client against a scripted, hostile peer on a socketpair (no VM)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smolvm import protocol as P
from smolvm.agent_client import AgentConnection, clean
from smolvm.exceptions import GuestError, OperationTimeoutError


@pytest.fixture
def pair() -> Iterator[tuple[AgentConnection, socket.socket]]:
    host, guest = socket.socketpair()
    yield AgentConnection(host), guest
    host.close()
    guest.close()


def answer(guest: socket.socket, respond: Callable[[dict[str, object]], bytes]) -> threading.Thread:
    """Read one request from the host and send back whatever ``respond`` makes of it."""

    def run() -> None:
        d = P.Decoder()
        while True:
            d.feed(guest.recv(65536))
            for frame in d.frames():
                guest.sendall(respond(frame.msg()))
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_malformed_message_is_a_guest_error(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    answer(guest, lambda req: P.encode(P.MSG, b"[]", stream=int(req["id"])))  # type: ignore[call-overload]
    with pytest.raises(GuestError, match="malformed"):
        conn.call("env_list", timeout=5)


def test_a_bad_exit_code_is_refused(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, guest = pair
    answer(guest, lambda req: P.encode_msg({"op": "exit", "id": req["id"], "exit_code": 10**9}))
    with pytest.raises(GuestError, match="bad exit code"):
        conn.exec("true", timeout=5)


def test_a_download_larger_than_announced_leaves_nothing(
    pair: tuple[AgentConnection, socket.socket], tmp_path: Path
) -> None:
    conn, guest = pair

    def respond(req: dict[str, object]) -> bytes:
        rid = int(req["id"])  # type: ignore[call-overload]
        head = P.encode_msg({"op": "file", "id": rid, "size": 4, "mode": 0o644})
        return head + P.encode(P.DATA, b"too many bytes", rid, P.FILE)

    answer(guest, respond)
    target = tmp_path / "out.bin"
    target.write_bytes(b"precious")
    with pytest.raises(GuestError, match="more than"):
        conn.read_file("/x", target, timeout=5)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_silent_guest_times_out(pair: tuple[AgentConnection, socket.socket]) -> None:
    conn, _ = pair
    with pytest.raises(OperationTimeoutError):
        conn.call("env_list", timeout=0.3)


def test_guest_text_is_made_printable() -> None:
    assert clean("ok\x1b[2Jbad\x07\nline") == "ok?[2Jbad?\nline"
    assert len(clean("x" * 5000)) == 2000
