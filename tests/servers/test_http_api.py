"""``smolvm serve``: the HTTP API through httpx, against a real server and real sandboxes.

The checks of auth, bad bodies and unknown ids run the same application in-process
(no sandbox needed); everything else goes to a ``smolvm serve`` the test started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SMOLVM_BIN, needs_image
from fastapi.testclient import TestClient

from smolvm.exceptions import GuestError, GuestFileNotFoundError, SandboxStateError, ValidationError
from smolvm.servers.http_api import build_app, json_line, sse, status_for
from smolvm.servers.token import server_token

TOKEN = "k" * 43


@pytest.fixture(scope="module")
def local() -> Iterator[TestClient]:
    with TestClient(build_app(TOKEN)) as client:
        yield client


def test_every_route_but_the_openapi_document_needs_the_token(local: TestClient) -> None:
    spec = local.get("/openapi.json").json()
    routes = [(path, method.upper()) for path, methods in spec["paths"].items() for method in methods]
    assert len(routes) > 25 and all(path.startswith("/v1/") for path, _ in routes)
    for route, method in routes:
        path = re.sub(r"\{[^}]+\}", "1", route)
        for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": TOKEN}):
            answer = local.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
    # Two Authorization headers, one of them right: refused, whichever a proxy would pick.
    two = httpx.Headers([("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}")])
    assert local.get("/v1/sandboxes", headers=two).status_code == 401
    assert local.get("/docs").status_code == 200
    assert "/v1/sandboxes/{sandbox_id}/commands" in spec["paths"]


def test_bad_requests_get_the_field_and_unknown_sandboxes_404(local: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = local.post("/v1/sandboxes", json={"memory_mib": "lots"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "memory_mib"]
    extra = local.post("/v1/sandboxes", json={"memroy_mib": 256}, headers=auth)
    assert extra.status_code == 422 and "memroy_mib" in extra.text
    garbage = local.post("/v1/sandboxes", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert garbage.status_code == 422
    empty = local.post("/v1/sandboxes/vm-x/commands", json={"cmd": ""}, headers=auth)
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "cmd"]
    for path in ("/v1/sandboxes/vm-none", "/v1/sandboxes/..%2F..%2Fetc", "/v1/sandboxes/vm-none/files/stat?path=/x"):
        missing = local.get(path, headers=auth)
        assert missing.status_code == 404, (path, missing.text)
    assert "smolvm sandbox list" in local.get("/v1/sandboxes/vm-none", headers=auth).json()["detail"]
    assert "GET /v1/sandboxes" in local.get("/v1/sandboxes/no%20such", headers=auth).json()["detail"]
    no_path = local.get("/v1/sandboxes/vm-none/files", headers=auth)
    assert no_path.status_code == 422 and no_path.json()["detail"][0]["loc"] == ["query", "path"]


def test_library_errors_map_to_the_status_a_client_expects() -> None:
    assert status_for(GuestFileNotFoundError("x")) == 404  # before its base, GuestError
    assert status_for(GuestError("x")) == 502
    assert status_for(SandboxStateError("x")) == 409  # before its base, ValidationError
    assert status_for(ValidationError("x")) == 422


def test_stream_events_are_one_json_object_each() -> None:
    assert sse({"type": "stdout", "data": "a\nb"}) == b'event: stdout\ndata: {"data": "a\\nb"}\n\n'
    assert json.loads(json_line({"type": "exit", "exit_code": 3})) == {"type": "exit", "exit_code": 3}


# -- a real server ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``smolvm serve`` of this test's, ended by its pid."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(SMOLVM_BIN), "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("smolvm serve did not answer in 60 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    server = Server(free_port())
    client = httpx.Client(
        base_url=server.url + "/v1", headers={"Authorization": f"Bearer {server_token()}"}, timeout=120
    )
    client.server = server  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        client.close()
        client.server.stop()  # type: ignore[attr-defined]  # the one running now: a test restarts it


@pytest.fixture(scope="module")
def sandbox(api: httpx.Client) -> Iterator[str]:
    made = api.post("/sandboxes", json={"sandbox_id": "api-box"})
    assert made.status_code == 201, made.text
    assert made.json()["state"] == "running"
    try:
        yield "api-box"
    finally:
        api.delete("/sandboxes/api-box")


def events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events as dicts with their type."""
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield {"type": kind, **json.loads(line[len("data: ") :])}


@needs_image
def test_commands_run_whole_or_streamed(api: httpx.Client, sandbox: str) -> None:
    ran = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "echo hi; echo no >&2; exit 3"})
    assert ran.json() == {"exit_code": 3, "stdout": "hi\n", "stderr": "no\n"}
    fed = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "tr a-z A-Z", "stdin": "shout"})
    assert fed.json()["stdout"] == "SHOUT"

    # Server-sent events arrive while the command runs, not all at its end.
    body = {"cmd": "for i in 1 2 3; do echo $i; sleep 0.5; done; echo e >&2"}
    seen: list[tuple[float, dict[str, Any]]] = []
    start = time.monotonic()
    with api.stream(
        "POST", f"/sandboxes/{sandbox}/commands", json=body, headers={"Accept": "text/event-stream"}
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        for event in events(answer.iter_lines()):
            seen.append((time.monotonic() - start, event))
    kinds = [e for _, e in seen]
    assert kinds[-1] == {"type": "exit", "exit_code": 0}
    assert "".join(e["data"] for e in kinds if e["type"] == "stdout") == "1\n2\n3\n"
    assert {"type": "stderr", "data": "e\n"} in kinds
    assert seen[0][0] < seen[-1][0] - 0.8, "the first line came only at the end"

    # JSON lines; a flood is cut at max_output, and the stream ends saying so.
    flood = {"cmd": "yes | head -c 5000000", "max_output": 1_000_000}
    with api.stream(
        "POST", f"/sandboxes/{sandbox}/commands", json=flood, headers={"Accept": "application/x-ndjson"}
    ) as answer:
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    got = sum(len(e["data"]) for e in lines if e["type"] == "stdout")
    assert got <= 1_000_000
    assert lines[-1]["type"] == "error" and "more than 1000000 bytes" in lines[-1]["message"]
    too_much = api.post(f"/sandboxes/{sandbox}/commands", json=flood)
    assert too_much.status_code == 422 and "redirect its output" in too_much.json()["detail"]

    slow = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "sleep 5", "timeout": 1})
    assert slow.status_code == 504 and "timed out" in slow.json()["detail"]


@needs_image
def test_a_client_that_leaves_a_stream_has_its_command_killed_or_kept(api: httpx.Client, sandbox: str) -> None:
    for choice, marker in (("kill", "/tmp/killed-marker"), ("keep", "/tmp/kept-marker")):
        body = {"cmd": f"echo started; sleep 3; touch {marker}", "timeout": 60, "on_disconnect": choice}
        with api.stream(
            "POST", f"/sandboxes/{sandbox}/commands", json=body, headers={"Accept": "text/event-stream"}
        ) as answer:
            first = next(events(answer.iter_lines()))
            assert first == {"type": "stdout", "data": "started\n"}
        # The response is closed here, mid-command.
    time.sleep(6)
    left = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "ls /tmp/killed-marker /tmp/kept-marker"})
    assert "/tmp/kept-marker" in left.json()["stdout"]
    assert "killed-marker" not in left.json()["stdout"], "a command whose client left ran on"
    assert api.get(f"/sandboxes/{sandbox}").status_code == 200  # the server lives on


@needs_image
def test_background_processes(api: httpx.Client, sandbox: str) -> None:
    started = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "echo up; sleep 300", "background": True})
    assert started.status_code == 201
    pid = started.json()["pid"]
    assert pid in [p["pid"] for p in api.get(f"/sandboxes/{sandbox}/processes").json()]
    deadline = time.monotonic() + 10
    while (seen := api.get(f"/sandboxes/{sandbox}/processes/{pid}").json())["stdout"] != "up\n":
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert seen["exit_code"] is None
    assert api.delete(f"/sandboxes/{sandbox}/processes/{pid}").json() == {"killed": True}
    assert api.get(f"/sandboxes/{sandbox}/processes/{pid}").json()["exit_code"] is not None
    missing = api.get(f"/sandboxes/{sandbox}/processes/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]


@needs_image
def test_files_stream_both_ways(api: httpx.Client, sandbox: str, tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    put = api.put(f"/sandboxes/{sandbox}/files", params={"path": "/work/in/blob.bin"}, content=blob)
    assert put.status_code == 200, put.text
    assert put.json()["size"] == len(blob) and put.json()["type"] == "file"

    def pieces() -> Iterator[bytes]:  # no Content-Length: chunked
        for i in range(0, len(blob), 100_000):
            yield blob[i : i + 100_000]

    chunked = api.put(
        f"/sandboxes/{sandbox}/files", params={"path": "/work/in/chunked.bin", "mode": 0o600}, content=pieces()
    )
    assert chunked.status_code == 200 and chunked.json()["mode"] == 0o600

    with api.stream("GET", f"/sandboxes/{sandbox}/files", params={"path": "/work/in/chunked.bin"}) as answer:
        assert answer.status_code == 200
        got = b"".join(answer.iter_bytes())
    assert got == blob
    # A client that stops reading part-way leaves the sandbox usable.
    with api.stream("GET", f"/sandboxes/{sandbox}/files", params={"path": "/work/in/blob.bin"}) as answer:
        next(answer.iter_bytes())

    names = {e["path"] for e in api.get(f"/sandboxes/{sandbox}/files/entries", params={"path": "/work/in"}).json()}
    assert names == {"/work/in/blob.bin", "/work/in/chunked.bin"}
    assert api.post(f"/sandboxes/{sandbox}/files/dir", params={"path": "/work/in/sub/deeper"}).json() == {
        "created": True
    }
    deep = api.get(f"/sandboxes/{sandbox}/files/entries", params={"path": "/work/in", "depth": 3}).json()
    assert "/work/in/sub/deeper" in {e["path"] for e in deep}
    assert api.delete(f"/sandboxes/{sandbox}/files", params={"path": "/work/in"}).status_code == 204
    gone = api.get(f"/sandboxes/{sandbox}/files/stat", params={"path": "/work/in"})
    assert gone.status_code == 404 and "/work/in" in gone.json()["detail"]

    for path in ("../../etc/passwd", "relative", "/work/\x00x"):
        refused = api.get(f"/sandboxes/{sandbox}/files", params={"path": path})
        assert refused.status_code in (404, 422), (path, refused.text)
    folder = api.get(f"/sandboxes/{sandbox}/files", params={"path": "/etc"})
    assert folder.status_code == 422 and "directory" in folder.json()["detail"]


@needs_image
def test_env_and_ports(api: httpx.Client, sandbox: str) -> None:
    assert api.put(f"/sandboxes/{sandbox}/env", json={"vars": {"GREETING": "hello"}}).json()["GREETING"] == "hello"
    echoed = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "echo $GREETING"}).json()
    assert echoed["stdout"] == "hello\n"
    assert api.delete(f"/sandboxes/{sandbox}/env/GREETING").json() == {"removed": True}
    assert "GREETING" not in api.get(f"/sandboxes/{sandbox}/env").json()
    bad = api.put(f"/sandboxes/{sandbox}/env", json={"vars": {"A=B": "x"}})
    assert bad.status_code == 422

    api.post(
        f"/sandboxes/{sandbox}/commands",
        json={
            "cmd": "mkdir -p /srv && echo served > /srv/index.html && cd /srv && python3 -m http.server 8000",
            "background": True,
        },
    )
    opened = api.post(f"/sandboxes/{sandbox}/ports", json={"guest_port": 8000})
    assert opened.status_code == 201, opened.text
    url = opened.json()["url"]
    deadline = time.monotonic() + 30
    while True:
        try:
            page = httpx.get(url, timeout=5)
            if page.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the exposed port never answered"
        time.sleep(0.5)
    assert page.text == "served\n"
    assert opened.json() in api.get(f"/sandboxes/{sandbox}/ports").json()
    assert api.delete(f"/sandboxes/{sandbox}/ports/{opened.json()['host_port']}").status_code == 204
    assert api.get(f"/sandboxes/{sandbox}/ports").json() == []


@needs_image
def test_lifecycle_races_and_a_restart_of_the_server(api: httpx.Client, sandbox: str) -> None:
    assert api.post(f"/sandboxes/{sandbox}/pause").json()["state"] == "paused"
    refused = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "true"})
    assert refused.status_code == 409 and "resume" in refused.json()["detail"]
    streamed = api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "true"}, headers={"Accept": "text/event-stream"})
    assert streamed.status_code == 409
    assert api.post(f"/sandboxes/{sandbox}/pause").status_code == 409
    assert api.post(f"/sandboxes/{sandbox}/resume").json()["state"] == "running"

    spare = api.post("/sandboxes", json={"start": False})
    assert spare.status_code == 201 and spare.json()["state"] == "created"
    spare_id = spare.json()["id"]
    statuses: list[int] = []

    def delete() -> None:
        statuses.append(api.delete(f"/sandboxes/{spare_id}").status_code)

    racers = [threading.Thread(target=delete) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert 204 in statuses and set(statuses) <= {204, 404}, statuses
    assert api.get(f"/sandboxes/{spare_id}").status_code == 404
    assert sandbox in [r["id"] for r in api.get("/sandboxes").json()]

    # The sandbox belongs to the data directory: a new server finds it running.
    server: Any = api.server  # type: ignore[attr-defined]
    server.stop()
    again = Server(server.port)
    api.server = again  # type: ignore[attr-defined]
    assert api.get(f"/sandboxes/{sandbox}").json()["state"] == "running"
    assert api.post(f"/sandboxes/{sandbox}/commands", json={"cmd": "echo still"}).json()["stdout"] == "still\n"


def test_the_cli_says_why_it_cannot_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(SMOLVM_BIN), "serve", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1 and "pick another --port" in done.stderr and "Traceback" not in done.stderr
    token = subprocess.run([str(SMOLVM_BIN), "serve", "--print-token"], capture_output=True, text=True, timeout=60)
    assert token.returncode == 0 and token.stdout.strip() == server_token()
