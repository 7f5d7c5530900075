"""``smolvm mcp`` driven by the official MCP client over stdio, against real sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import SMOLVM_BIN, needs_image
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402

from smolvm import SmolVM
from smolvm.servers.mcp_server import Reach, clip
from smolvm.servers.token import authorized


def result(call: Any) -> Any:
    assert not call.is_error, call.content[0].text
    if call.structured_content is not None:
        data = call.structured_content
        return data.get("result", data)
    return call.content[0].text


def test_long_output_keeps_its_start_and_more_of_its_end() -> None:
    text = "a" * 1000 + "b" * 9000
    cut = clip(text, 100, "stdout")
    assert cut.startswith("a" * 25) and cut.endswith("b" * 75)
    assert "9,900 characters of stdout cut here" in cut
    assert clip("short", 100, "stdout") == "short"


def test_host_paths_stay_inside_the_allowed_folders(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "out").symlink_to("/etc")
    reach = Reach(roots=[shared.resolve()])
    assert reach.host_path("a.txt") == shared.resolve() / "a.txt"
    for escape in ("../x", "/etc/passwd", "out/passwd", str(tmp_path)):
        with pytest.raises(ToolError, match="outside the host folders"):
            reach.host_path(escape)
    with pytest.raises(ToolError, match="--allow-path"):
        Reach().host_path("a.txt")


def test_only_what_this_server_made_is_reachable() -> None:
    reach = Reach()
    with pytest.raises(ToolError, match="was made by this server"):
        reach.sandbox("vm-someone")
    reach.made("vm-mine", keep=False)
    assert reach.sandbox("vm-mine") == "vm-mine"
    assert Reach(everything=True).sandbox("vm-someone") == "vm-someone"


def test_the_bearer_token_is_compared_whole() -> None:
    token = "t" * 43
    assert authorized(f"Bearer {token}", token)
    assert not authorized(f"Bearer {token[:-1]}", token)
    assert not authorized(token, token)
    assert not authorized(None, token)


@needs_image
def test_an_agent_session_runs_commands_and_moves_files_and_its_sandboxes_go_with_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "project").mkdir(parents=True)
    (shared / "project" / "main.py").write_text("print(6 * 7)\n")
    params = StdioServerParameters(
        command=str(SMOLVM_BIN), args=["mcp", "--allow-path", str(shared), "--max-output", "1000"], env=dict(os.environ)
    )

    async def session() -> tuple[str, str]:
        async with Client(params) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"create_sandbox", "run_command", "read_file", "write_file", "list_files"} <= names

            made = result(await client.call_tool("create_sandbox", {}))
            kept = result(await client.call_tool("create_sandbox", {"keep": True}))
            vm_id = made["sandbox_id"]
            ran = result(
                await client.call_tool("run_command", {"sandbox_id": vm_id, "command": "echo hi; echo no >&2; exit 3"})
            )
            assert ran == {"exit_code": 3, "stdout": "hi\n", "stderr": "no\n"}

            long = result(await client.call_tool("run_command", {"sandbox_id": vm_id, "command": "seq 1 100000"}))
            assert long["stdout"].startswith("1\n2\n") and long["stdout"].endswith("99999\n100000\n")
            assert "characters of stdout cut here" in long["stdout"] and len(long["stdout"]) < 1200

            result(
                await client.call_tool(
                    "write_file", {"sandbox_id": vm_id, "path": "/work/a.txt", "content": "x" * 2500}
                )
            )
            first = result(await client.call_tool("read_file", {"sandbox_id": vm_id, "path": "/work/a.txt"}))
            assert first.startswith("x" * 1000) and "read on with offset=1000" in first
            rest = result(
                await client.call_tool("read_file", {"sandbox_id": vm_id, "path": "/work/a.txt", "offset": 2000})
            )
            assert rest == "x" * 500

            result(
                await client.call_tool(
                    "upload_to_sandbox", {"sandbox_id": vm_id, "host_path": "project", "sandbox_path": "/work/project"}
                )
            )
            listing = result(await client.call_tool("list_files", {"sandbox_id": vm_id, "path": "/work/project"}))
            assert [e["path"] for e in listing["entries"]] == ["/work/project/main.py"]
            ran = result(
                await client.call_tool(
                    "run_command", {"sandbox_id": vm_id, "command": "python3 main.py > out.txt", "cwd": "/work/project"}
                )
            )
            assert ran["exit_code"] == 0
            result(
                await client.call_tool(
                    "download_from_sandbox",
                    {"sandbox_id": vm_id, "sandbox_path": "/work/project/out.txt", "host_path": "."},
                )
            )
            assert (shared / "out.txt").read_text() == "42\n"

            # Bad input comes back as tool errors, and the server goes on answering.
            for name, args, message in [
                (
                    "download_from_sandbox",
                    {"sandbox_id": vm_id, "sandbox_path": "/etc/hostname", "host_path": "/etc/x"},
                    "outside the host folders",
                ),
                ("read_file", {"sandbox_id": vm_id, "path": "/nope"}, "/nope"),
                ("read_file", {"sandbox_id": vm_id, "path": "/work"}, "is a directory"),
                ("run_command", {"sandbox_id": "vm-other", "command": "true"}, "made by this server"),
                ("run_command", {"sandbox_id": vm_id, "command": "true", "timeout_seconds": 0}, "timeout_seconds"),
                ("create_sandbox", {"image": "no-such-image"}, "no-such-image"),
            ]:
                call = await client.call_tool(name, args)
                assert call.is_error and message in call.content[0].text, (name, call.content[0].text)
            ids = {row["sandbox_id"] for row in result(await client.call_tool("list_sandboxes", {}))}
            assert ids == {vm_id, kept["sandbox_id"]}
            return vm_id, kept["sandbox_id"]

    vm_id, kept_id = asyncio.run(session())
    left = {record.id for record in SmolVM.list()}
    assert vm_id not in left, "the session's sandbox outlived it"
    assert kept_id in left, "a kept sandbox was deleted"
    SmolVM.from_id(kept_id).delete()


def test_a_cli_refuses_a_non_loopback_http_address() -> None:
    import subprocess

    done = subprocess.run(
        [str(SMOLVM_BIN), "mcp", "--http", "0.0.0.0:8765"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "loopback only" in done.stderr and "Traceback" not in done.stderr
    token = subprocess.run([str(SMOLVM_BIN), "mcp", "--print-token"], capture_output=True, text=True, timeout=60)
    assert token.returncode == 0 and len(token.stdout.strip()) >= 32
    assert json.dumps(token.stdout)  # printable
