"""``smolvm mcp``: sandboxes as tools an AI agent calls over the Model Context Protocol.

A thin adapter over ``SmolVM`` built with the official ``mcp`` SDK. What an agent
gets back is bounded (long output is cut in the middle, with a note saying how
to see the rest), every failure comes back as a tool error with the library's
message, and the agent reaches only what this server made (``--all-sandboxes``
widens that to the whole data directory) and only the host folders the user
named with ``--allow-path``. Sandboxes live as long as the server process (over stdio,
the client's session; over HTTP, for now, until the server stops) unless the agent
asked to keep them.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from ..exceptions import OutputLimitError, SmolVMError
from ..filesystem import EntryInfo, FileType
from ..sandbox import SmolVM, check_id
from ..types import InternetSettings, SnapshotInfo, SnapshotType
from .token import authorized, server_token

try:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("the MCP server needs the mcp package: pip install 'smolvm[mcp]'") from exc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

MAX_OUTPUT_CHARS = 20_000  # of each stream, and of a file read, handed to the model
COMMAND_OUTPUT = 16 << 20  # a command printing more than this is stopped
MAX_ENTRIES = 500  # of one listing
MAX_TIMEOUT = 3600.0

INSTRUCTIONS = """\
SmolVM gives you disposable Linux virtual machines (sandboxes) to run code in, isolated
from the user's computer. Start with create_sandbox, which returns a sandbox_id; then
run_command runs shell commands in it (bash, as root, in /root), and read_file,
write_file and list_files work on its files. Sandboxes are deleted when this session
ends unless you created them with keep=true. A sandbox reaches public HTTP and HTTPS
sites by default; allowed_domains narrows that. Long output is cut in the middle: send
it to a file and read that in parts with read_file's offset."""


def clip(text: str, limit: int, what: str) -> str:
    """``text``, or its start and end with a note where the middle was cut: the end of
    a command's output is where errors are, so it gets the larger part."""
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    cut = len(text) - head - tail
    note = f"\n[... {cut:,} characters of {what} cut here; write it to a file and read_file it in parts ...]\n"
    return text[:head] + note + text[-tail:]


def tool_errors(fn: F) -> F:
    """A tool whose library errors reach the agent as tool errors with their message."""

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except (SmolVMError, OSError, ValueError) as exc:
            raise ToolError(str(exc) or type(exc).__name__) from exc

    return call  # type: ignore[return-value]


def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one library call in a worker thread (the server's loop keeps answering)."""
    return anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), abandon_on_cancel=True)


@dataclass
class Reach:
    """What this server made (and whether to keep it), and which host folders it may touch."""

    roots: Sequence[Path] = ()
    everything: bool = False  # --all-sandboxes: every sandbox and snapshot of the data directory
    sandboxes: dict[str, bool] = field(default_factory=dict)  # id -> kept past the server's end
    snapshots: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def made(self, vm_id: str, keep: bool) -> None:
        with self.lock:
            self.sandboxes[vm_id] = keep

    def sandbox(self, vm_id: object) -> str:
        vm_id = check_id(vm_id)
        with self.lock:
            if self.everything or vm_id in self.sandboxes:
                return vm_id
        raise ToolError(f"no sandbox {vm_id!r} was made by this server: list_sandboxes shows the ones you can use")

    def snapshot(self, snapshot_id: object) -> str:
        if not isinstance(snapshot_id, str) or not 0 < len(snapshot_id) <= 128:
            raise ToolError(f"{snapshot_id!r} is not a snapshot id: list_snapshots shows them")
        with self.lock:
            if self.everything or snapshot_id in self.snapshots:
                return snapshot_id
        raise ToolError(f"no snapshot {snapshot_id!r} was made by this server: list_snapshots shows them")

    def forget(self, vm_id: str) -> None:
        with self.lock:
            self.sandboxes.pop(vm_id, None)

    def end(self) -> None:
        """Delete the sandboxes this server made, except those kept."""
        with self.lock:
            doomed = [vm_id for vm_id, kept in self.sandboxes.items() if not kept]
        for vm_id in doomed:
            try:
                SmolVM.from_id(vm_id).delete()
            except SmolVMError as exc:
                log.warning("could not delete sandbox %s: %s", vm_id, exc)
            self.forget(vm_id)

    def host_path(self, path: str) -> Path:
        """A host path inside one of the allowed folders, with symbolic links resolved
        (relative paths are taken from the first folder)."""
        if not self.roots:
            raise ToolError(
                "no host folder is shared with this server: the user can start it with `smolvm mcp --allow-path DIR`"
            )
        if not path or "\0" in path:
            raise ToolError("give a host path")
        real = (self.roots[0] / Path(path).expanduser()).resolve()
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            raise ToolError(f"{path} is outside the host folders this server may use ({allowed})")
        return real


def entry(info: EntryInfo) -> dict[str, Any]:
    row: dict[str, Any] = {"path": info.path, "type": info.type.value, "size": info.size, "mode": oct(info.mode)}
    if info.symlink_target is not None:
        row["symlink_target"] = info.symlink_target
    return row


def snapshot_row(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "snapshot_id": info.snapshot_id,
        "sandbox_id": info.vm_id,
        "type": info.type.value,
        "name": info.name,
        "size_bytes": info.size,
    }


def build_server(reach: Reach, max_chars: int = MAX_OUTPUT_CHARS) -> MCPServer:
    """The MCP server: its tools, each a thin call into the library."""
    server: MCPServer = MCPServer("smolvm", instructions=INSTRUCTIONS, log_level="WARNING")

    def started(vms: Iterable[SmolVM], keep: bool) -> list[str]:
        ids = []
        for vm in vms:
            reach.made(vm.vm_id, keep)
            ids.append(vm.vm_id)
        return ids

    @server.tool()
    @tool_errors
    async def create_sandbox(
        image: str = "default",
        memory_mib: int | None = None,
        vcpus: int | None = None,
        allowed_domains: list[str] | None = None,
        keep: bool = False,
    ) -> dict[str, Any]:
        """Create and start a new Linux sandbox (a small virtual machine); returns its sandbox_id.

        image: a SmolVM image name (`smolvm image list` on the host; "default" is Debian with
        Python 3). memory_mib: guest memory (default 512). vcpus: default 1.
        allowed_domains: omit for public HTTP/HTTPS access by any name; a list such as
        ["pypi.org", "*.pythonhosted.org"] allows only those names; [] allows no network.
        keep: true keeps the sandbox after this session ends (otherwise it is deleted then)."""
        internet = InternetSettings(allowed_domains=allowed_domains)

        def make() -> SmolVM:
            vm = SmolVM(image=image, memory=memory_mib, vcpus=vcpus, internet_settings=internet)
            try:
                return vm.start()
            except BaseException:
                vm.delete()
                raise

        vm = await blocking(make)
        started([vm], keep)
        return {"sandbox_id": vm.vm_id, "image": image, "memory_mib": vm.config.memory, "kept": keep}

    @server.tool()
    @tool_errors
    async def list_sandboxes() -> list[dict[str, Any]]:
        """The sandboxes you can use, with their state (running, paused, stopped)."""
        records = await blocking(SmolVM.list)
        with reach.lock:
            mine = dict(reach.sandboxes)
        return [
            {"sandbox_id": r.id, "state": r.state.value, "image": r.config.image, "kept": mine.get(r.id, False)}
            for r in records
            if reach.everything or r.id in mine
        ]

    @server.tool()
    @tool_errors
    async def delete_sandbox(sandbox_id: str) -> str:
        """Stop a sandbox and delete it with everything in it."""
        vm_id = reach.sandbox(sandbox_id)
        await blocking(lambda: SmolVM.from_id(vm_id).delete())
        reach.forget(vm_id)
        return f"deleted {vm_id}"

    @server.tool()
    @tool_errors
    async def run_command(
        sandbox_id: str,
        command: str,
        timeout_seconds: float = 120,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        background: bool = False,
    ) -> dict[str, Any]:
        """Run a bash command in a sandbox and return its exit code, stdout and stderr.

        The command is killed after timeout_seconds (at most 3600). Output longer than
        the limit is cut in the middle: redirect it to a file and read_file that.
        background: start it and return its pid at once (for servers; its output is not kept,
        so redirect it to a file). cwd and env set the directory and extra variables."""
        vm_id = reach.sandbox(sandbox_id)
        if not 0 < timeout_seconds <= MAX_TIMEOUT:
            raise ToolError(f"timeout_seconds must be above 0 and at most {MAX_TIMEOUT:.0f}")
        vm = SmolVM.from_id(vm_id)
        if background:
            process = await blocking(vm.spawn, command, env=env, cwd=cwd)
            return {"pid": process.pid, "note": "started in the background"}
        try:
            result = await blocking(vm.run, command, timeout_seconds, env=env, cwd=cwd, max_output=COMMAND_OUTPUT)
        except OutputLimitError as exc:
            raise ToolError(f"{exc}; redirect the output to a file and read it with read_file") from exc
        return {
            "exit_code": result.exit_code,
            "stdout": clip(result.stdout, max_chars, "stdout"),
            "stderr": clip(result.stderr, max_chars, "stderr"),
        }

    @server.tool()
    @tool_errors
    async def read_file(sandbox_id: str, path: str, offset: int = 0) -> str:
        """The text of a file in a sandbox: up to the output limit from byte `offset` on.
        A longer file ends with a note giving the offset to read on from."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        if offset < 0:
            raise ToolError("offset must be 0 or more")
        info = await blocking(vm.files.get_info, path)
        if info.type is FileType.DIR:
            raise ToolError(f"{path} is a directory: list_files shows what is in it")

        def part() -> bytes:
            taken, skip = bytearray(), offset
            chunks = vm.files.read(path, format="stream")
            try:
                for chunk in chunks:
                    if skip >= len(chunk):
                        skip -= len(chunk)
                        continue
                    taken += chunk[skip:]
                    skip = 0
                    if len(taken) > max_chars * 4:  # enough bytes for max_chars characters
                        break
            finally:
                getattr(chunks, "close", lambda: None)()
            return bytes(taken)

        data = await blocking(part)
        if b"\0" in data[:8192]:
            raise ToolError(
                f"{path} is a binary file of {info.size:,} bytes: download_from_sandbox copies it to the host"
            )
        text = data.decode("utf-8", errors="replace")
        if len(text) <= max_chars and offset + len(data) >= info.size:
            return text
        text = text[:max_chars]
        end = offset + len(text.encode("utf-8", errors="replace"))
        return text + f"\n[... the file has {info.size:,} bytes; read on with offset={end} ...]"

    @server.tool()
    @tool_errors
    async def write_file(sandbox_id: str, path: str, content: str) -> str:
        """Write text to a file in a sandbox (replacing it whole; parent directories are made)."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        info = await blocking(vm.files.write, path, content)
        return f"wrote {info.size:,} bytes to {info.path}"

    @server.tool()
    @tool_errors
    async def list_files(sandbox_id: str, path: str, depth: int = 1) -> dict[str, Any]:
        """The entries of a directory in a sandbox (depth 2 or more goes into subdirectories),
        each with its path, type (file, dir, symlink, other), size and mode."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        entries = await blocking(vm.files.list, path, depth)
        listing: dict[str, Any] = {"path": path, "entries": [entry(e) for e in entries[:MAX_ENTRIES]]}
        if len(entries) > MAX_ENTRIES:
            listing["note"] = f"{len(entries) - MAX_ENTRIES:,} more entries left out: list a subdirectory"
        return listing

    @server.tool()
    @tool_errors
    async def upload_to_sandbox(sandbox_id: str, host_path: str, sandbox_path: str) -> str:
        """Copy a file or a directory tree from the user's computer into a sandbox. The host
        path must lie in a folder the user shared with this server (--allow-path)."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        local = reach.host_path(host_path)
        if local.is_dir():
            report = await blocking(vm.upload_dir, local, sandbox_path)
            return f"copied {report.files:,} files ({report.bytes:,} bytes) to {sandbox_path}"
        await blocking(vm.upload_file, local, sandbox_path)
        return f"copied {local} to {sandbox_path}"

    @server.tool()
    @tool_errors
    async def download_from_sandbox(sandbox_id: str, sandbox_path: str, host_path: str) -> str:
        """Copy a file or a directory tree from a sandbox to the user's computer, into a folder
        the user shared with this server (--allow-path). A directory goes to a new or empty
        host directory; a file into an existing host directory keeps its name."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        local = reach.host_path(host_path)
        info = await blocking(vm.files.get_info, sandbox_path)
        if info.type is FileType.DIR:
            report = await blocking(vm.download_dir, sandbox_path, local)
            return f"copied {report.files:,} files ({report.bytes:,} bytes) to {local}"
        if local.is_dir():
            local = reach.host_path(str(local / info.name))
        await blocking(vm.download_file, sandbox_path, local)
        return f"copied {sandbox_path} to {local}"

    @server.tool()
    @tool_errors
    async def expose_port(sandbox_id: str, guest_port: int) -> str:
        """Make a port a server in the sandbox listens on reachable from the user's computer;
        returns the http://127.0.0.1:PORT address it has there."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        host_port = await blocking(vm.expose_local, guest_port)
        return f"http://127.0.0.1:{host_port}"

    @server.tool()
    @tool_errors
    async def snapshot_sandbox(sandbox_id: str, name: str | None = None, memory: bool = True) -> dict[str, Any]:
        """Save a running sandbox as it is now; it runs on. memory=true keeps running processes
        too (restored running); false keeps the disk only (restoring it boots)."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        kind = SnapshotType.FULL if memory else SnapshotType.DISK
        info = await blocking(vm.snapshot, kind, name=name)
        with reach.lock:
            reach.snapshots.add(info.snapshot_id)
        return snapshot_row(info)

    @server.tool()
    @tool_errors
    async def restore_snapshot(snapshot_id: str, keep: bool = False) -> dict[str, Any]:
        """A new running sandbox made from a snapshot, with its own id; the snapshot stays and
        can be restored again."""
        sid = reach.snapshot(snapshot_id)
        vm = await blocking(SmolVM.from_snapshot, sid)
        started([vm], keep)
        return {"sandbox_id": vm.vm_id, "from_snapshot": sid, "kept": keep}

    @server.tool()
    @tool_errors
    async def fork_sandbox(sandbox_id: str, count: int = 1, keep: bool = False) -> dict[str, Any]:
        """`count` new running sandboxes, each a copy of this one as it is now (files, memory,
        running processes); the original runs on. For trying several things in parallel."""
        vm = SmolVM.from_id(reach.sandbox(sandbox_id))
        kids = await blocking(vm.fork, count)
        return {"sandbox_ids": started(kids, keep), "kept": keep}

    @server.tool()
    @tool_errors
    async def list_snapshots() -> list[dict[str, Any]]:
        """The snapshots you can restore."""
        every = await blocking(SmolVM.list_snapshots)
        with reach.lock:
            mine = set(reach.snapshots)
        return [snapshot_row(s) for s in every if reach.everything or s.snapshot_id in mine]

    @server.tool()
    @tool_errors
    async def delete_snapshot(snapshot_id: str) -> str:
        """Delete a snapshot (sandboxes restored from it keep working)."""
        sid = reach.snapshot(snapshot_id)
        await blocking(SmolVM.delete_snapshot, sid)
        with reach.lock:
            reach.snapshots.discard(sid)
        return f"deleted snapshot {sid}"

    return server


class BearerAuth:
    """ASGI middleware: every request carries the server token, or gets 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.token):
                body = b'{"error": "send Authorization: Bearer <token> (smolvm mcp --print-token)"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def serve(reach: Reach, http: tuple[str, int] | None = None, max_chars: int = MAX_OUTPUT_CHARS) -> None:
    """Run the server until its client leaves (stdio) or it is stopped, then delete every
    sandbox it made that was not kept."""
    server = build_server(reach, max_chars)
    # A client that ends the server with SIGTERM still gets its sandboxes deleted.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if http is None:
            server.run("stdio")
        else:
            import uvicorn

            host, port = http
            app = BearerAuth(server.streamable_http_app(host=host), server_token())
            uvicorn.run(app, host=host, port=port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        reach.end()
