"""The host's wire client against a scripted, hostile peer on a socketpair (no VM)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvm import protocol as P
from smolvm.agent_client import AgentConnection, clean
from smolvm.exceptions import GuestError, OperationTimeoutError, SmolVMError, ValidationError


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


# -- a hostile agent in a process of its own ---------------------------------------


@contextmanager
def hostile(script: Callable[[socket.socket, dict[str, Any]], None]) -> Iterator[AgentConnection]:
    """A connection to a forked peer that runs ``script(sock, request)`` for each request."""
    host, guest = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the peer: never returns into pytest
        try:
            host.close()
            decoder = P.Decoder()
            while data := guest.recv(1 << 16):
                decoder.feed(data)
                for frame in decoder.frames():
                    script(guest, frame.msg())
        finally:
            os._exit(0)
    guest.close()
    try:
        yield AgentConnection(host)
    finally:
        host.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def flood(frame: Callable[[int], bytes], batch: int = 1000) -> Callable[[socket.socket, dict[str, Any]], None]:
    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        burst = frame(int(req["id"])) * batch
        while True:
            sock.sendall(burst)

    return script


def bounded(call: Callable[[], object], seconds: float) -> type[BaseException]:
    """Run ``call``, which must fail with a SmolVMError within ``seconds``; the error's type."""
    start = time.monotonic()
    with pytest.raises(SmolVMError) as info:
        call()
    assert time.monotonic() - start < seconds
    return info.type


@pytest.mark.parametrize(
    "frame",
    [
        lambda rid: P.encode(P.DATA, b"", rid, P.STDOUT),  # empty data for the request
        lambda rid: P.encode(P.DATA, b"x", rid + 1, P.STDOUT),  # data for another request
        lambda rid: P.encode_msg({"op": "bogus", "id": rid}),  # ops nobody asked for
        lambda rid: P.encode_msg({"op": "credit", "id": rid, "bytes": 1}),  # credits for no input
    ],
    ids=["empty", "other-request", "unknown-op", "stray-credit"],
)
def test_a_flooding_guest_cannot_hold_a_command_past_its_deadline(frame: Callable[[int], bytes]) -> None:
    with hostile(flood(frame)) as conn:
        bounded(lambda: conn.exec("true", timeout=1), 1 + 1)


def test_a_flooding_guest_cannot_hold_a_call_past_its_deadline() -> None:
    with hostile(flood(lambda rid: P.encode(P.DATA, b"", rid, P.STDOUT))) as conn:
        bounded(lambda: conn.call("env_list", timeout=2), 2 + 1)


def test_a_slow_trickle_of_nothing_times_out_at_the_deadline() -> None:
    """Under the budget but never done: the deadline, not the budget, ends it."""

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        while True:
            sock.sendall(P.encode_msg({"op": "bogus", "id": req["id"]}))
            time.sleep(0.01)

    with hostile(script) as conn:
        assert bounded(lambda: conn.exec("true", timeout=1), 1 + 1) is OperationTimeoutError


def test_frames_already_buffered_do_not_outlast_the_deadline() -> None:
    """Tens of MiB sent at once, then silence: the host must not work through all of it."""

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(P.encode(P.DATA, b"x", int(req["id"]), P.STDOUT) * 2_000_000)
        time.sleep(60)

    with hostile(script) as conn:
        bounded(lambda: conn.exec("true", timeout=1, max_output=100 << 20), 1 + 1)


def test_output_cut_into_one_byte_frames_costs_no_memory_per_frame() -> None:
    count = 400_000

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        sock.sendall(P.encode(P.DATA, b"x", rid, P.STDOUT) * count)
        sock.sendall(P.encode_msg({"op": "exit", "id": rid, "exit_code": 0, "timed_out": False}))

    with hostile(script) as conn:
        tracemalloc.start()
        try:
            code, out, _ = conn.exec("true", timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (code, out) == (0, b"x" * count)
    # The output itself, a copy of it, and a read buffer or two: not an object per frame
    # (which came to over 50 MB for this many frames).
    assert peak < 3 * count + 4 * P.MAX_PAYLOAD + (1 << 20)


@pytest.mark.parametrize(
    "reply, field",
    [
        ({"op": "ok", "vars": {"A": "\ud800"}}, "value of variable A"),
        ({"op": "ok", "vars": {"A B": "x"}}, "variable name"),
        ({"op": "ok", "vars": {"A": 5}}, "value of variable A"),
        ({"op": "ok", "vars": []}, "variable list"),
    ],
)
def test_guest_values_that_would_crash_the_host_are_guest_errors(reply: dict[str, Any], field: str) -> None:
    from smolvm.sandbox import SmolVM

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(P.encode_msg({**reply, "id": req["id"]}))

    with hostile(script) as conn:
        vm = SmolVM.__new__(SmolVM)
        vm._agent = lambda timeout=30.0: nullcontext(conn)  # type: ignore[method-assign]
        with pytest.raises(GuestError, match=field):
            vm.list_env_vars()


def test_a_start_time_of_400_digits_is_a_guest_error() -> None:
    from smolvm.process import ProcessInfo

    with pytest.raises(GuestError, match="start time"):
        ProcessInfo.from_guest({"pid": 5, "cmd": "x", "started": 10**400, "exit_code": None})
    with pytest.raises(GuestError, match="start time"):
        ProcessInfo.from_guest({"pid": 5, "cmd": "x", "started": float("nan"), "exit_code": None})


# -- whatever the guest sends, only SmolVMError comes out --------------------------


def frame_strategy() -> st.SearchStrategy[bytes]:
    payloads = st.one_of(
        st.binary(max_size=64),
        st.dictionaries(
            st.sampled_from(["op", "id", "exit_code", "timed_out", "bytes", "code"]),
            st.none() | st.integers() | st.text(max_size=8) | st.booleans(),
        ).map(lambda d: json.dumps(d).encode()),
        st.just(b'{"op": "exit", "exit_code": 0, "id": 1}'),
    )
    return st.builds(
        lambda kind, channel, stream, payload: P.encode(kind, payload, stream, channel),
        st.sampled_from([P.MSG, P.DATA]),
        st.integers(0, 4),
        st.sampled_from([0, 1, 2]),
        payloads,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(frame_strategy(), st.binary(max_size=40)), max_size=30))
def test_only_smolvm_errors_escape_the_client(chunks: list[bytes]) -> None:
    host, guest = socket.socketpair()
    try:
        conn = AgentConnection(host)
        conn.next_id = 1  # so the strategy's ids hit the request
        guest.sendall(b"".join(chunks))
        guest.shutdown(socket.SHUT_WR)
        try:
            conn.exec("true", timeout=0.2, max_output=100)
        except SmolVMError:
            pass
    finally:
        host.close()
        guest.close()


# -- downloads keep the host's permissions -------------------------------------------


def serve_file(data: bytes, mode: int) -> Callable[[socket.socket, dict[str, Any]], None]:
    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        sock.sendall(P.encode_msg({"op": "file", "id": rid, "size": len(data), "mode": mode}))
        sock.sendall(P.encode(P.DATA, data, rid, P.FILE) + P.encode_msg({"op": "ok", "id": rid}))

    return script


def test_a_download_onto_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with hostile(serve_file(b"new", 0o777)) as conn:
        conn.read_file("/x", target, timeout=5)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o7777 == 0o600


def test_a_new_download_follows_the_umask_not_the_guest(tmp_path: Path) -> None:
    target = tmp_path / "fresh"
    old = os.umask(0o027)
    try:
        with hostile(serve_file(b"data", 0o4777)) as conn:
            conn.read_file("/x", target, timeout=5)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o7777 == 0o640


def test_a_flooding_peer_in_this_very_process_cannot_hold_a_call() -> None:
    """The peer shares our interpreter (and its GIL): the deadline still holds."""
    host, guest = socket.socketpair()
    stop = threading.Event()

    def peer() -> None:
        decoder = P.Decoder()
        decoder.feed(guest.recv(1 << 16))
        rid = next(iter(decoder.frames())).stream
        burst = P.encode_msg({"op": "bogus", "id": rid}) * 200
        try:
            while not stop.is_set():
                guest.sendall(burst)
        except OSError:
            pass

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        bounded(lambda: AgentConnection(host).exec("true", timeout=2), 2 + 1)
    finally:
        stop.set()
        host.close()
        thread.join(5)
        guest.close()


def test_a_feeder_stuck_in_a_send_leaves_its_connection_unusable_not_hung() -> None:
    """The guest says the command is done and stops reading while the host still sends input."""

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        sock.sendall(P.encode_msg({"op": "exit", "id": req["id"], "exit_code": 0, "timed_out": False}))
        time.sleep(60)  # reads nothing more

    with hostile(script) as conn:
        code, _, _ = conn.exec("cat", timeout=20, stdin=io.BytesIO(b"x" * (8 << 20)))
        assert code == 0 and conn.broken  # so a kept connection is dropped, not reused
        bounded(lambda: conn.call("env_list", timeout=1), 1 + 1)


def test_bytes_that_look_like_headers_cannot_hold_a_call() -> None:
    start = P.MAGIC + bytes([P.MSG, 0, 0, 0])
    with hostile(flood(lambda rid: start * 1000)) as conn:
        bounded(lambda: conn.call("env_list", timeout=1), 1 + 1)


def test_a_download_never_replaces_what_is_not_a_regular_file(tmp_path: Path) -> None:
    from smolvm.agent_client import partial_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValidationError, match="not a regular file"), partial_file(fifo, 1, "/x"):
        pass
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_forked_child_lets_go_of_the_parents_kept_port(tmp_path: Path) -> None:
    from smolvm import locks
    from smolvm.connections import Connections, Kept

    connections = Connections(tmp_path, "x")
    host, guest = socket.socketpair()
    lock_path = tmp_path / "agent-0.lock"
    connections.kept = Kept(AgentConnection(host), locks.lock(lock_path, 1), 1)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the fork hooks have run by now
        os.write(ready_w, b"1")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        connections.release()  # the parent lets go; the child, still alive, must not hold it
        fd = locks.try_lock(lock_path)
        assert fd is not None, "the child's copy kept the port locked"
        locks.unlock(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        guest.close()
        os.close(ready_r)
        os.close(ready_w)


def test_an_upload_answered_at_once_is_not_waited_for_again(tmp_path: Path) -> None:
    """The answer to an upload's last chunk can be on the wire by the time the host looks
    for early errors: it is the answer, not something to skip and then wait for (a full
    run once hung on it for the upload's whole timeout)."""
    small = tmp_path / "small.txt"
    small.write_text("x")

    def quick(sock: socket.socket, req: dict[str, Any]) -> None:
        if req.get("op") == "write_file":
            sock.sendall(P.encode_msg({"op": "ok", "id": req["id"]}))

    with hostile(quick) as conn:
        send = conn._send

        def send_then_stall(frame: bytes, deadline: float) -> None:
            send(frame, deadline)
            time.sleep(0.3)  # the host descheduled for a moment: the answer is in first

        conn._send = send_then_stall  # type: ignore[method-assign]
        start = time.monotonic()
        conn.write_file(small, "/tmp/small.txt", timeout=5)
        assert time.monotonic() - start < 2


def test_an_upload_answered_before_its_data_is_a_guest_error(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (P.CHUNK * 3))

    def early(sock: socket.socket, req: dict[str, Any]) -> None:
        if req.get("op") == "write_file":
            sock.sendall(P.encode_msg({"op": "ok", "id": req["id"]}))

    with hostile(early) as conn, pytest.raises(GuestError, match="before it had all"):
        conn.write_file(big, "/tmp/big.bin", timeout=5)


# -- trees and listings from a guest that lies or never ends ---------------------------


class FakeVM:
    """What ``Files`` needs of a sandbox: an agent connection (here, to a hostile peer),
    and a transfer disk if one is given."""

    def __init__(self, conn: AgentConnection, disk: Path | None = None) -> None:
        self.conn = conn
        self.disk = disk

    @contextmanager
    def _agent(self, timeout: float = 30) -> Iterator[AgentConnection]:
        yield self.conn

    @contextmanager
    def _transfer(self) -> Iterator[Path | None]:
        yield self.disk


def endless_tar(sock: socket.socket, req: dict[str, Any]) -> None:
    """A tar stream of one file that announces 1 GiB and then sends its bytes forever, slowly."""
    import tarfile

    rid = int(req["id"])
    member = tarfile.TarInfo("big")
    member.size = 1 << 30
    sock.sendall(P.encode(P.DATA, member.tobuf(format=tarfile.PAX_FORMAT), rid, P.FILE))
    while True:
        sock.sendall(P.encode(P.DATA, b"x" * 4096, rid, P.FILE))
        time.sleep(0.01)


def test_a_tree_download_that_never_ends_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    from smolvm.filesystem import Files

    with hostile(endless_tar) as conn:
        files = Files(FakeVM(conn))  # type: ignore[arg-type]
        kind = bounded(lambda: files.download_dir("/tree", tmp_path / "out", timeout=1.5), 1.5 + 3)
    assert kind is OperationTimeoutError
    assert list(tmp_path.iterdir()) == []  # no half-built tree, under its name or beside it


@pytest.mark.parametrize(
    "lie", ["/etc/passwd", "/w/../etc/shadow", "/wx/a", "/w", "relative", "/w/a\0b", "/w/" + "a" * 5000]
)
def test_a_listing_that_lies_about_paths_is_refused(lie: str) -> None:
    from smolvm.filesystem import Files

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        entry = {"name": "a", "path": lie, "type": "file", "size": 1, "mode": 0o644, "mtime": 1.5e9}
        sock.sendall(P.encode_msg({"op": "entries", "id": rid, "entries": [entry]}))
        sock.sendall(P.encode_msg({"op": "ok", "id": rid, "count": 1}))

    with hostile(script) as conn:
        with pytest.raises(GuestError):
            Files(FakeVM(conn)).list("/w")  # type: ignore[arg-type]


def tree_with_apart(
    disk: Path, apart: list[Any], read_size: int = 3
) -> Callable[[socket.socket, dict[str, Any]], None]:
    """A guest whose tree download puts a tar of one file ("a") on the transfer disk, then
    names ``apart`` as big files sent on their own, each of which reads as ``read_size``
    bytes through the disk: its "ok" comes only once the host has taken that window."""
    import tarfile

    reads: set[int] = set()
    taken: set[int] = set()

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        if req["op"] == "taken" and rid in reads:
            taken.add(rid)
            sock.sendall(P.encode_msg({"op": "ok", "id": rid}))
        elif req["op"] == "count":  # how many big files' windows the host gave back
            sock.sendall(P.encode_msg({"op": "ok", "id": rid, "taken": len(taken)}))
        elif req["op"] == "tar_out":
            out = io.BytesIO()
            with tarfile.open(fileobj=out, mode="w") as tar:
                info = tarfile.TarInfo("./a")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"a"))
            with open(disk, "r+b") as f:
                f.write(out.getvalue())
            sock.sendall(P.encode_msg({"op": "disk_data", "id": rid, "size": len(out.getvalue())}))
        elif req["op"] == "taken":
            sock.sendall(P.encode_msg({"op": "apart", "id": rid, "files": apart}))
            sock.sendall(P.encode_msg({"op": "ok", "id": rid, "exit_code": 0, "errors": ""}))
        elif req["op"] == "read_file":
            assert req.get("nofollow") is True  # tar never follows a link: nor does this
            sock.sendall(P.encode_msg({"op": "file", "id": rid, "size": read_size, "mode": 0o644}))
            with open(disk, "r+b") as f:
                f.write(b"x" * read_size)
            reads.add(rid)
            sock.sendall(P.encode_msg({"op": "disk_data", "id": rid, "size": read_size}))

    return script


@pytest.mark.parametrize(
    "apart",
    [
        [["../escape", 0o644, 1]],
        [["/etc/evil", 0o644, 1]],
        [["d/../../escape", 0o644, 1]],
        [["a", 0o644, 1]],  # the name of a file the stream already sent
        [["b", 0o644, 1], ["b", 0o644, 1]],
        [["b", "rw", 1]],
        [["b", 0o644, float("nan")]],
        [["b", 0o644]],
        [["b\0c", 0o644, 1]],
        [["\ud800", 0o644, 1]],
        [["b", 0o644, 10**400]],
        [["b" * 5000, 0o644, 1]],
        "b",
        [["b", 0o644, 1]] * (P.APART_BATCH + 1),
    ],
    ids=[
        "climbs",
        "absolute",
        "climbs-inside",
        "twice-with-stream",
        "twice",
        "mode",
        "mtime",
        "short",
        "nul",
        "surrogate",
        "huge-mtime",
        "long-name",
        "not-a-list",
        "too-many",
    ],
)
def test_big_files_a_tree_names_apart_are_checked_like_its_stream(tmp_path: Path, apart: Any) -> None:
    from smolvm.filesystem import Files

    disk = tmp_path / "xfer"
    disk.write_bytes(b"\0" * (1 << 20))
    with hostile(tree_with_apart(disk, apart)) as conn:
        with pytest.raises(GuestError):
            Files(FakeVM(conn, disk)).download_dir("/tree", tmp_path / "out", timeout=5)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["xfer"]  # nothing written, under its name or beside it
    assert not (tmp_path.parent / "escape").exists()


def test_a_big_file_sent_apart_lands_inside_the_tree(tmp_path: Path) -> None:
    from smolvm.filesystem import Files

    disk = tmp_path / "xfer"
    disk.write_bytes(b"\0" * (1 << 20))
    with hostile(tree_with_apart(disk, [["d/big", 0o640, 1_500_000_000]], read_size=5)) as conn:
        report = Files(FakeVM(conn, disk)).download_dir("/tree", tmp_path / "out", timeout=5)  # type: ignore[arg-type]
        assert conn.call("count")["taken"] == 1  # its window given back, its answer read: nothing left hanging
    assert (report.files, report.bytes) == (2, 6)
    assert (tmp_path / "out" / "d" / "big").read_bytes() == b"xxxxx"
    assert (tmp_path / "out" / "d" / "big").stat().st_mtime == 1_500_000_000


def test_a_watch_that_lost_events_says_so_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    from smolvm.filesystem import Files

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        event = {"type": "created", "path": "/w/a", "is_dir": False}
        sock.sendall(P.encode_msg({"op": "watching", "id": rid}))
        sock.sendall(P.encode_msg({"op": "events", "id": rid, "events": [event]}))
        sock.sendall(P.encode_msg({"op": "ok", "id": rid, "overflowed": True}))

    with hostile(script) as conn, caplog.at_level("WARNING", logger="smolvm"):
        events = list(Files(FakeVM(conn)).watch_dir("/w", timeout=2))  # type: ignore[arg-type]
    assert [e.path for e in events] == ["/w/a"]
    assert "missed events" in caplog.text


apart_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)
apart_entries = st.lists(
    st.tuples(
        st.one_of(st.text(max_size=20), st.sampled_from(["a", "d/b", "../x", "/etc/p", "a/../../b", "\ud800"])),
        st.one_of(st.integers(), st.floats(), st.sampled_from([0o644, 0o7777, 0o10000, -1, True])),
        st.one_of(st.integers(), st.floats(), st.just(10**400)),
    ).map(list),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(apart_values, apart_entries))
def test_any_list_of_files_apart_is_names_inside_the_tree_or_a_guest_error(raw: object) -> None:
    from smolvm.agent_client import apart_files
    from smolvm.trees import member_parts

    try:
        files = apart_files(raw, 1 << 20, "download of /t")
    except GuestError:
        return
    for name, mode, mtime in files:
        assert member_parts(name) and 0 <= mode <= 0o7777 and isinstance(mtime, float)
        name.encode()  # text the host can name a file with


def test_a_watch_read_by_a_slow_loop_ends_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time the caller spends between events is its own: it does not use up the watch's deadline."""
    import smolvm.agent_client as ac
    from smolvm.filesystem import Files

    monkeypatch.setattr(ac, "GRACE", -4.5)  # the host waits timeout + 0.5 s for the guest's end

    def script(sock: socket.socket, req: dict[str, Any]) -> None:
        rid = int(req["id"])
        sock.sendall(P.encode_msg({"op": "watching", "id": rid}))
        for name in "abc":
            event = {"type": "created", "path": f"/w/{name}", "is_dir": False}
            sock.sendall(P.encode_msg({"op": "events", "id": rid, "events": [event]}))
        sock.sendall(P.encode_msg({"op": "ok", "id": rid, "overflowed": False}))

    seen = []
    with hostile(script) as conn:
        for event in Files(FakeVM(conn)).watch_dir("/w", timeout=0.1):  # type: ignore[arg-type]
            seen.append(event.path)
            time.sleep(0.4)  # three of these outlast the deadline
    assert seen == ["/w/a", "/w/b", "/w/c"]
