"""``smolvm serve``: sandboxes over HTTP, for any language and any process.

A thin FastAPI adapter over ``SmolVM``: each route is one library call, run in a
worker thread so the server keeps answering. Sandboxes belong to the data
directory, not to the server: a restart loses none, and the CLI sees the same
ones. Every route under ``/v1`` asks for the bearer token in ``server-token``;
only the OpenAPI document and its docs page are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..exceptions import (
    GuestError,
    GuestFileNotFoundError,
    HostError,
    ImageError,
    OperationTimeoutError,
    OutputLimitError,
    ProcessNotFoundError,
    SandboxStateError,
    SmolVMError,
    SnapshotNotFoundError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from ..filesystem import EntryInfo, FileType, Sized
from ..process import ProcessInfo
from ..sandbox import SmolVM, check_id
from ..types import InternetSettings, SnapshotInfo, SnapshotType, VMState
from .token import authorized

log = logging.getLogger(__name__)

MAX_THREADS = 256  # worker threads for library calls: a long command holds one
COMMAND_OUTPUT = 16 << 20  # default cap on a command's output, stdout and stderr together
MAX_COMMAND_OUTPUT = 128 << 20
STREAM_BUFFER = 64  # output chunks queued for a slow client before the command waits for it
MAX_SPOOLED = 1 << 30  # an upload without Content-Length is held (on disk) up to this
MAX_TIMEOUT = 24 * 3600.0

# The most specific class first: a subclass must come before its base.
STATUS: tuple[tuple[type[SmolVMError], int], ...] = (
    (VMNotFoundError, 404),
    (SnapshotNotFoundError, 404),
    (GuestFileNotFoundError, 404),
    (ProcessNotFoundError, 404),
    (VMAlreadyExistsError, 409),
    (SandboxStateError, 409),
    (ValidationError, 422),
    (ImageError, 422),
    (OutputLimitError, 422),
    (OperationTimeoutError, 504),
    (GuestError, 502),
    (HostError, 503),
)


def status_for(exc: SmolVMError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- what goes over the wire --------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SandboxCreate(Body):
    sandbox_id: str | None = Field(None, description="an id of your own; one is made if omitted")
    image: str = Field("default", description="a SmolVM image name (`smolvm image list`)")
    memory_mib: int | None = Field(None, description="guest memory; default 512")
    vcpus: int | None = Field(None, description="default 1")
    disk_size_mib: int | None = Field(None, description="the sandbox's disk; default the image's size")
    allowed_domains: list[str] | None = Field(
        None, description="omit for public HTTP/HTTPS by any name; names such as pypi.org allow only those; [] none"
    )
    fast_start: bool | None = Field(None, description="false boots instead of resuming a saved template")
    timeout: float | None = Field(None, description="seconds after its start at which the sandbox is deleted")
    idle_timeout: float | None = Field(None, description="seconds without a call after which it is deleted")
    start: bool = Field(True, description="false creates the sandbox stopped")


class CommandRequest(Body):
    cmd: str = Field(min_length=1, description="run with bash in the sandbox")
    timeout: float = Field(30.0, gt=0, le=MAX_TIMEOUT, description="seconds before it is killed")
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    stdin: str | None = Field(None, description="text given to the command on stdin")
    background: bool = Field(False, description="start it and return its pid at once")
    max_output: int = Field(COMMAND_OUTPUT, gt=0, le=MAX_COMMAND_OUTPUT, description="bytes of output kept")
    on_disconnect: Literal["kill", "keep"] = Field(
        "kill", description="streamed: what happens to the command if the client goes away"
    )


class TimeoutUpdate(Body):
    timeout: float | None = Field(description="seconds from now; null for never")


class EnvUpdate(Body):
    vars: dict[str, str]


class PortRequest(Body):
    guest_port: int
    host_port: int | None = None


class SnapshotRequest(Body):
    type: SnapshotType = SnapshotType.FULL
    name: str | None = None


class RestoreRequest(Body):
    sandbox_id: str | None = None


class ForkRequest(Body):
    count: int = Field(1, ge=1, le=64)


def entry_row(info: EntryInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "path": info.path,
        "type": info.type.value,
        "size": info.size,
        "mode": info.mode,
        "mtime": info.mtime,
        "symlink_target": info.symlink_target,
    }


def process_row(info: ProcessInfo) -> dict[str, Any]:
    return {"pid": info.pid, "cmd": info.cmd, "started_at": info.started_at, "exit_code": info.exit_code}


def snapshot_row(info: SnapshotInfo) -> dict[str, Any]:
    return info.model_dump(mode="json")


Encoder = Callable[[dict[str, Any]], bytes]


def sse(event: dict[str, Any]) -> bytes:
    kind = event.pop("type")
    return f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()


def json_line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


STREAMS: dict[str, Encoder] = {
    "text/event-stream": sse,
    "application/x-ndjson": json_line,
    "application/jsonl": json_line,
}


def vm_of(sandbox_id: str) -> SmolVM:
    """The sandbox of a route's id: 404 for one that does not exist (or cannot)."""
    try:
        check_id(sandbox_id)
    except ValidationError:
        raise HTTPException(404, f"no sandbox {sandbox_id!r}: GET /v1/sandboxes lists them") from None
    return SmolVM.from_id(sandbox_id)


def run_command(vm: SmolVM, req: CommandRequest, **options: Any) -> Any:
    return vm.run(
        req.cmd,
        req.timeout,
        env=req.env,
        cwd=req.cwd,
        user=req.user,
        stdin=req.stdin,
        max_output=req.max_output,
        **options,
    )


async def stream_command(
    vm: SmolVM, req: CommandRequest, encode: Callable[[dict[str, Any]], bytes]
) -> AsyncIterator[bytes]:
    """A command's output as events while it runs, then its exit (or an error). The
    command runs in a thread of its own and waits for a slow client (a bounded queue);
    a client that leaves has it killed, or left to finish unread (``on_disconnect``)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_BUFFER)
    gone, cancel = threading.Event(), threading.Event()

    def put(event: dict[str, Any] | None) -> None:
        if gone.is_set():
            return
        try:
            asyncio.run_coroutine_threadsafe(queue.put(event), loop).result()
        except RuntimeError:  # the server's loop has ended
            gone.set()

    def work() -> None:
        try:
            result = run_command(
                vm,
                req,
                on_stdout=lambda text: put({"type": "stdout", "data": text}),
                on_stderr=lambda text: put({"type": "stderr", "data": text}),
                cancel=cancel,
            )
            put({"type": "exit", "exit_code": result.exit_code})
        except SmolVMError as exc:
            put({"type": "error", "status": status_for(exc), "message": str(exc)})
        except Exception as exc:  # a bug of ours: the stream still ends, and says so
            log.exception("command stream failed")
            put({"type": "error", "status": 500, "message": f"internal error: {type(exc).__name__}"})
        finally:
            put(None)

    threading.Thread(target=work, name=f"stream-{vm.vm_id}", daemon=True).start()
    try:
        while (event := await queue.get()) is not None:
            yield encode(event)
    finally:
        gone.set()
        if req.on_disconnect == "kill":
            cancel.set()
        while not queue.empty():  # a put waiting on a full queue goes through, and sees `gone`
            queue.get_nowait()


class BodyReader:
    """A request body as a blocking binary reader, for a library call in a worker thread."""

    def __init__(self, chunks: AsyncIterator[bytes], limit: int | None = None) -> None:
        self.chunks, self.limit = chunks, limit

        async def following() -> bytes:
            return await chunks.__anext__()

        self.following = following
        self.held = b""
        self.total = 0
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        while not self.ended and (n < 0 or len(self.held) < n):
            try:
                chunk = anyio.from_thread.run(self.following)
            except StopAsyncIteration:
                self.ended = True
                break
            self.total += len(chunk)
            if self.limit is not None and self.total > self.limit:
                raise HTTPException(
                    413, f"an upload without Content-Length may be at most {self.limit:,} bytes: send its length"
                )
            self.held += chunk
        if n < 0:
            n = len(self.held)
        data, self.held = self.held[:n], self.held[n:]
        return data


# -- the application ---------------------------------------------------------
BEARER = HTTPBearer(auto_error=False, description="the token `smolvm serve --print-token` prints")
GuestPath = Annotated[str, Query(min_length=1, description="an absolute path in the sandbox")]
Depth = Annotated[int, Query(ge=1, le=64)]


def build_app(token: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = MAX_THREADS
        yield

    app = FastAPI(
        title="SmolVM",
        version=__version__,
        description="Disposable Linux microVMs for AI agents. Every /v1 route needs "
        "`Authorization: Bearer <token>` (`smolvm serve --print-token`).",
        lifespan=lifespan,
    )

    @app.exception_handler(SmolVMError)
    async def library_error(_: Request, exc: SmolVMError) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=status_for(exc))

    def check_token(request: Request, _: Annotated[Any, Depends(BEARER)]) -> None:
        headers = request.headers.getlist("authorization")
        if len(headers) != 1 or not authorized(headers[0], token):
            raise HTTPException(
                401,
                "send Authorization: Bearer <token> (smolvm serve --print-token)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_token)])

    # -- sandboxes --
    @api.post("/sandboxes", status_code=201, tags=["sandboxes"])
    def create_sandbox(body: SandboxCreate) -> dict[str, Any]:
        """Create a sandbox and (unless start is false) start it."""
        vm = SmolVM(
            vm_id=body.sandbox_id,
            image=body.image,
            memory=body.memory_mib,
            vcpus=body.vcpus,
            disk_size=body.disk_size_mib,
            internet_settings=InternetSettings(allowed_domains=body.allowed_domains),
            fast_start=body.fast_start,
            timeout=body.timeout,
            idle_timeout=body.idle_timeout,
        )
        if body.start:
            try:
                vm.start()
            except BaseException:
                vm.delete()
                raise
        return vm.info()

    @api.get("/sandboxes", tags=["sandboxes"])
    def list_sandboxes() -> list[dict[str, Any]]:
        return [record.as_dict() for record in SmolVM.list()]

    @api.get("/sandboxes/{sandbox_id}", tags=["sandboxes"])
    def get_sandbox(sandbox_id: str) -> dict[str, Any]:
        return vm_of(sandbox_id).info()

    @api.delete("/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
    def delete_sandbox(sandbox_id: str) -> Response:
        vm_of(sandbox_id).delete()
        return Response(status_code=204)

    @api.post("/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
    def set_timeout(sandbox_id: str, body: TimeoutUpdate) -> dict[str, Any]:
        """Delete the sandbox this many seconds from now (null: never)."""
        vm = vm_of(sandbox_id)
        vm.set_timeout(body.timeout)
        return vm.info()

    def lifecycle(action: str, doc: str) -> None:
        def change(sandbox_id: str) -> dict[str, Any]:
            vm = vm_of(sandbox_id)
            getattr(vm, action)()
            return vm.info()

        change.__doc__ = doc
        api.add_api_route(
            f"/sandboxes/{{sandbox_id}}/{action}",
            change,
            methods=["POST"],
            name=f"{action}_sandbox",
            tags=["sandboxes"],
        )

    lifecycle("start", "Boot a stopped sandbox (or resume its saved machine).")
    lifecycle("stop", "Flush the disk and end the machine; the disk is kept.")
    lifecycle("pause", "Freeze a running sandbox.")
    lifecycle("resume", "Go on with a paused sandbox.")

    # -- commands --
    @api.post("/sandboxes/{sandbox_id}/commands", tags=["commands"])
    async def run(sandbox_id: str, body: CommandRequest, request: Request) -> Any:
        """Run a command to its end and return exit_code, stdout and stderr; or, with
        `Accept: text/event-stream` (server-sent events) or `application/x-ndjson`
        (JSON lines), stream `stdout` and `stderr` events as it runs, then `exit`
        (or `error`). `background: true` starts it and returns its pid at once."""
        vm = await anyio.to_thread.run_sync(vm_of, sandbox_id)
        if body.background:
            process = await anyio.to_thread.run_sync(
                lambda: vm.spawn(body.cmd, env=body.env, cwd=body.cwd, user=body.user)
            )
            return JSONResponse({"pid": process.pid, "cmd": body.cmd}, status_code=201)
        accept = request.headers.get("accept", "").split(",")[0].split(";")[0].strip()
        encode = STREAMS.get(accept)
        if encode is not None:
            state = await anyio.to_thread.run_sync(lambda: vm.status)
            if state is not VMState.RUNNING:  # said with a status code, before the stream begins
                raise SandboxStateError(f"sandbox {sandbox_id!r} is {state.value}, not running: start or resume it")
            return StreamingResponse(stream_command(vm, body, encode), media_type=accept)
        result = await anyio.to_thread.run_sync(run_command, vm, body)
        return result.model_dump()

    @api.get("/sandboxes/{sandbox_id}/processes", tags=["commands"])
    def list_processes(sandbox_id: str) -> list[dict[str, Any]]:
        """The background processes, running or exited."""
        return [process_row(p) for p in vm_of(sandbox_id).commands.list()]

    @api.get("/sandboxes/{sandbox_id}/processes/{pid}", tags=["commands"])
    def get_process(sandbox_id: str, pid: int) -> dict[str, Any]:
        """A background process, with its kept output (the last MiB of each stream)."""
        process = vm_of(sandbox_id).commands.connect(pid)
        stdout, stderr = process.output()
        return {**process_row(process.info()), "stdout": stdout, "stderr": stderr}

    @api.delete("/sandboxes/{sandbox_id}/processes/{pid}", tags=["commands"])
    def kill_process(sandbox_id: str, pid: int) -> dict[str, Any]:
        """SIGKILL a background process with its descendants."""
        return {"killed": vm_of(sandbox_id).commands.kill(pid)}

    # -- files --
    @api.get("/sandboxes/{sandbox_id}/files", tags=["files"], response_class=StreamingResponse)
    async def read_file(sandbox_id: str, path: GuestPath) -> StreamingResponse:
        """A file's bytes, streamed."""
        vm = await anyio.to_thread.run_sync(vm_of, sandbox_id)
        info = await anyio.to_thread.run_sync(vm.files.get_info, path)
        if info.type is FileType.DIR:
            raise HTTPException(422, f"{path} is a directory: GET .../files/entries lists it")
        chunks = await anyio.to_thread.run_sync(lambda: vm.files.read(path, format="stream"))
        headers = {"X-Smolvm-Size": str(info.size)}
        return StreamingResponse(drain(chunks), media_type="application/octet-stream", headers=headers)

    @api.put("/sandboxes/{sandbox_id}/files", tags=["files"])
    async def write_file(sandbox_id: str, path: GuestPath, request: Request, mode: int = 0o644) -> dict[str, Any]:
        """Write the request body to a file (parents made; atomic: the old file or the new
        one, never half). Streamed; without Content-Length it is held on the host first."""
        vm = await anyio.to_thread.run_sync(vm_of, sandbox_id)
        length = request.headers.get("content-length")
        reader = BodyReader(request.stream(), None if length else MAX_SPOOLED)
        data: Any = Sized(reader, int(length)) if length and length.isdigit() else reader  # type: ignore[arg-type]
        info = await anyio.to_thread.run_sync(lambda: vm.files.write(path, data, mode=mode))
        return entry_row(info)

    @api.delete("/sandboxes/{sandbox_id}/files", status_code=204, tags=["files"])
    def remove_file(sandbox_id: str, path: GuestPath) -> Response:
        """Remove a file, or a directory with everything in it."""
        vm_of(sandbox_id).files.remove(path)
        return Response(status_code=204)

    @api.get("/sandboxes/{sandbox_id}/files/entries", tags=["files"])
    def list_files(sandbox_id: str, path: GuestPath, depth: Depth = 1) -> list[dict[str, Any]]:
        """A directory's entries (depth 2 or more goes into subdirectories)."""
        return [entry_row(e) for e in vm_of(sandbox_id).files.list(path, depth)]

    @api.get("/sandboxes/{sandbox_id}/files/stat", tags=["files"])
    def stat_file(sandbox_id: str, path: GuestPath) -> dict[str, Any]:
        """One entry: 404 if nothing is there."""
        return entry_row(vm_of(sandbox_id).files.get_info(path))

    @api.post("/sandboxes/{sandbox_id}/files/dir", tags=["files"])
    def make_dir(sandbox_id: str, path: GuestPath) -> dict[str, Any]:
        """Make a directory and its parents; created is false if it was there."""
        return {"created": vm_of(sandbox_id).files.make_dir(path)}

    # -- environment and ports --
    @api.get("/sandboxes/{sandbox_id}/env", tags=["environment"])
    def list_env(sandbox_id: str) -> dict[str, str]:
        """The variables every command sees."""
        return vm_of(sandbox_id).list_env_vars()

    @api.put("/sandboxes/{sandbox_id}/env", tags=["environment"])
    def set_env(sandbox_id: str, body: EnvUpdate) -> dict[str, str]:
        """Set variables for every later command; returns them all."""
        vm = vm_of(sandbox_id)
        vm.set_env_vars(body.vars)
        return vm.list_env_vars()

    @api.delete("/sandboxes/{sandbox_id}/env/{name}", tags=["environment"])
    def unset_env(sandbox_id: str, name: str) -> dict[str, bool]:
        return {"removed": bool(vm_of(sandbox_id).unset_env_vars([name]))}

    @api.get("/sandboxes/{sandbox_id}/ports", tags=["ports"])
    def list_ports(sandbox_id: str) -> list[dict[str, Any]]:
        return [port_row(p.host_port, p.guest_port) for p in vm_of(sandbox_id).list_exposed()]

    @api.post("/sandboxes/{sandbox_id}/ports", status_code=201, tags=["ports"])
    def expose_port(sandbox_id: str, body: PortRequest) -> dict[str, Any]:
        """Forward a port of the host's 127.0.0.1 to a port the sandbox listens on."""
        host_port = vm_of(sandbox_id).expose_local(body.guest_port, body.host_port)
        return port_row(host_port, body.guest_port)

    @api.delete("/sandboxes/{sandbox_id}/ports/{host_port}", status_code=204, tags=["ports"])
    def close_port(sandbox_id: str, host_port: int) -> Response:
        vm_of(sandbox_id).unexpose_local(host_port)
        return Response(status_code=204)

    # -- snapshots --
    @api.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, tags=["snapshots"])
    def take_snapshot(sandbox_id: str, body: SnapshotRequest) -> dict[str, Any]:
        """Save the sandbox as it is now (full: memory too; disk: the disk only); it runs on."""
        return snapshot_row(vm_of(sandbox_id).snapshot(body.type, name=body.name))

    @api.post("/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
    def fork(sandbox_id: str, body: ForkRequest) -> list[dict[str, Any]]:
        """`count` new running sandboxes, each a copy of this one now."""
        return [kid.info() for kid in vm_of(sandbox_id).fork(body.count)]

    @api.get("/snapshots", tags=["snapshots"])
    def list_snapshots() -> list[dict[str, Any]]:
        return [snapshot_row(s) for s in SmolVM.list_snapshots()]

    @api.post("/snapshots/{snapshot_id}/restore", status_code=201, tags=["snapshots"])
    def restore_snapshot(snapshot_id: str, body: RestoreRequest) -> dict[str, Any]:
        """A new running sandbox made from a snapshot (which stays)."""
        return SmolVM.from_snapshot(snapshot_id, vm_id=body.sandbox_id).info()

    @api.delete("/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"])
    def delete_snapshot(snapshot_id: str) -> Response:
        SmolVM.delete_snapshot(snapshot_id)
        return Response(status_code=204)

    app.include_router(api)
    return app


def port_row(host_port: int, guest_port: int) -> dict[str, Any]:
    return {"host_port": host_port, "guest_port": guest_port, "url": f"http://127.0.0.1:{host_port}"}


async def drain(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A library stream of chunks for a response, read in a worker thread and closed
    however the response ends (a client that leaves frees the sandbox's connection)."""
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)


def serve(host: str, port: int, token: str) -> None:
    import uvicorn

    uvicorn.run(build_app(token), host=host, port=port, log_level="warning")
