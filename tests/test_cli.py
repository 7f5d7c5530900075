"""The ``smolvm`` command line, run as a real subprocess of .venv/bin/smolvm.

Boots: one named sandbox (created with --no-start, then ``sandbox start``)
shared by the module, and one ``smolvm run``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import SMOLVM_BIN, qemu_pid_gone

from smolvm import SmolVM
from smolvm.state import StateStore


def smolvm(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SMOLVM_BIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> None:
    """Failed with ``code``, an 'error:' message on stderr, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    flat = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in flat, (needle, proc.stderr)


def listed() -> dict[str, dict[str, object]]:
    proc = smolvm("sandbox", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return {d["id"]: d for d in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def named() -> Iterator[tuple[str, dict[str, object]]]:
    """A running sandbox made by the CLI: (name, what 'create --json' printed)."""
    name = f"cli-{os.getpid()}"
    created = smolvm("sandbox", "create", "--name", name, "--memory", "256", "--no-start", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    started = smolvm("sandbox", "start", name)
    try:
        assert started.returncode == 0, started.stderr
        yield name, info
    finally:
        smolvm("sandbox", "delete", name)


@pytest.fixture
def idle() -> Iterator[str]:
    """A created, never-booted sandbox (no VM cost)."""
    name = f"idle-{os.getpid()}"
    proc = smolvm("sandbox", "create", "--name", name, "--no-start")
    assert proc.returncode == 0, proc.stderr
    assert name in proc.stdout and "created" in proc.stdout
    yield name
    smolvm("sandbox", "delete", name)


# == no VM ====================================================================


def test_version_and_help() -> None:
    v = smolvm("--version")
    assert v.returncode == 0 and "0.1.0" in v.stdout
    h = smolvm("--help")
    assert h.returncode == 0
    for word in ("run", "sandbox", "doctor", "image", "setup"):
        assert word in h.stdout


def test_info_invalid_id() -> None:
    assert_clean_error(smolvm("sandbox", "info", "../../x"), "not a valid sandbox id")


def test_info_unknown() -> None:
    assert_clean_error(smolvm("sandbox", "info", "nosuch"), "no sandbox named 'nosuch'")


def test_create_memory_out_of_range() -> None:
    before = listed()
    assert_clean_error(smolvm("sandbox", "create", "--memory", "1"), "memory")
    assert listed().keys() == before.keys()


def test_cpu_limit_out_of_range() -> None:
    before = listed()
    assert_clean_error(smolvm("sandbox", "create", "--cpu-limit", "0", "--no-start"), "cpu_limit", "0.05")
    assert_clean_error(smolvm("run", "--cpu-limit", "100", "--", "true"), "cpu_limit", "64")
    assert listed().keys() == before.keys()


def test_create_invalid_name() -> None:
    assert_clean_error(smolvm("sandbox", "create", "--name", "Bad_Name", "--no-start"), "not valid")


def test_run_memory_out_of_range() -> None:
    assert_clean_error(smolvm("run", "--memory", "1", "--", "true"), "memory")


def test_delete_needs_names_or_all() -> None:
    assert_clean_error(smolvm("sandbox", "delete"), "--all")
    assert_clean_error(smolvm("sandbox", "delete", "x", "--all"), "--all")


def test_usage_errors_are_not_tracebacks() -> None:
    for args in (("sandbox", "bogus"), ("run",), ("sandbox", "create", "--memory", "lots")):
        proc = smolvm(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "Error" in proc.stderr


def test_error_is_one_line() -> None:
    proc = smolvm("sandbox", "info", "../../x")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_idle_sandbox_commands(idle: str, tmp_path: Path) -> None:
    info = smolvm("sandbox", "info", idle, "--json")
    assert info.returncode == 0
    data = json.loads(info.stdout)
    assert data["id"] == idle and data["state"] == "created" and data["pid"] is None
    assert listed()[idle]["state"] == "created"
    # not running: a clean error, not a hang or traceback
    assert_clean_error(smolvm("sandbox", "exec", idle, "--", "true"), "not running")
    assert_clean_error(smolvm("sandbox", "env", "list", idle), "not running")
    # local file checks come first
    assert_clean_error(smolvm("sandbox", "file", "upload", idle, "/nonexistent", "/tmp/a"), "/nonexistent")
    # a second sandbox of the same name is refused, the first stays
    assert_clean_error(smolvm("sandbox", "create", "--name", idle, "--no-start"), "already exists")
    assert listed()[idle]["state"] == "created"
    stop = smolvm("sandbox", "stop", idle)  # nothing to stop
    assert stop.returncode == 0


def test_bad_accel_setting(idle: str) -> None:
    proc = smolvm("sandbox", "start", idle, env={"SMOLVM_ACCEL": "xen"})
    assert_clean_error(proc, "SMOLVM_ACCEL")
    assert listed()[idle]["state"] == "created"


def test_delete_checks_every_name_first(idle: str) -> None:
    assert_clean_error(smolvm("sandbox", "delete", idle, "nosuch"), "nosuch")
    assert idle in listed()  # nothing was deleted
    assert_clean_error(smolvm("sandbox", "delete", idle, "../x"), "not a valid sandbox id")
    assert idle in listed()


def test_env_set_bad_input(idle: str) -> None:
    assert_clean_error(smolvm("sandbox", "env", "set", idle, "NOEQUALS"), "KEY=VALUE")
    assert_clean_error(smolvm("sandbox", "env", "set", idle, "1BAD=x"), "1BAD")


def test_doctor_json() -> None:
    proc = smolvm("doctor", "--json", timeout=600)
    assert "Traceback" not in proc.stderr
    checks = json.loads(proc.stdout)
    assert isinstance(checks, list) and checks
    by_name = {c["name"]: c for c in checks}
    assert "acceleration" in by_name
    assert by_name["acceleration"]["status"] in ("ok", "warn", "fail")
    assert by_name["acceleration"]["detail"]
    for c in checks:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail")
    assert proc.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0)
    assert by_name["data directory"]["detail"] == os.environ["SMOLVM_DATA_DIR"]


def test_image_list_json() -> None:
    proc = smolvm("image", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    images = json.loads(proc.stdout)
    assert isinstance(images, list)
    for img in images:
        assert {"name", "recipe", "kernel", "path", "disk_size_mib", "bytes_on_disk"} <= set(img)
        assert Path(img["path"], "kernel").is_file()
        assert img["bytes_on_disk"] > 0
    assert "default" in [i["name"] for i in images]


def test_image_rm_errors() -> None:
    # never 'default': the session's images dir is a link to the real one
    assert_clean_error(smolvm("image", "rm", "nosuch"), "no image named 'nosuch'")
    assert_clean_error(smolvm("image", "rm", "../x"), "not valid")


# == real VMs =================================================================


@pytest.mark.vm
def test_run_prints_output_and_propagates_exit_code() -> None:
    before = set(listed())
    proc = smolvm("run", "--", "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "hi\n"
    assert "oops" in proc.stderr
    assert set(listed()) == before  # the one-shot sandbox is gone


@pytest.mark.vm
def test_create_json_and_start(named: tuple[str, dict[str, object]]) -> None:
    name, created = named
    assert created["id"] == name
    assert created["state"] == "created"
    assert created["memory"] == 256
    entry = listed()[name]
    assert entry["state"] == "running"
    assert isinstance(entry["pid"], int) and not qemu_pid_gone(entry["pid"], name)
    info = json.loads(smolvm("sandbox", "info", name, "--json").stdout)
    assert info["state"] == "running" and info["accel"] == "tcg"


@pytest.mark.vm
def test_exec(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    proc = smolvm("sandbox", "exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 5")
    assert (proc.returncode, proc.stdout, proc.stderr) == (5, "out\n", "err\n")
    # argv words are quoted, not re-split
    proc = smolvm("sandbox", "exec", name, "--", "printf", "%s|", "a b", "c")
    assert (proc.returncode, proc.stdout) == (0, "a b|c|")
    # one word is a shell command line
    proc = smolvm("sandbox", "exec", name, "--", "echo $((6*7)) | tr 4 X")
    assert (proc.returncode, proc.stdout) == (0, "X2\n")


@pytest.mark.vm
def test_exec_streams_output_as_it_comes(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    proc = subprocess.Popen(
        [str(SMOLVM_BIN), "sandbox", "exec", name, "--", "echo early; sleep 4; echo late"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == "early\n"
    assert proc.poll() is None  # still running when the first line arrived
    rest, err = proc.communicate(timeout=60)
    assert rest == "late\n" and proc.returncode == 0, err


@pytest.mark.vm
def test_one_cli_call_after_another_gets_a_prompt_answer(named: tuple[str, dict[str, object]]) -> None:
    """Each call is a process that connects, runs, and leaves; the next may take the same
    port at once. The guest once rested a port whose last host had just left while the
    next host's news was already spent, so that host's sync waited a second: under
    '--timeout 1' that failed 1 call in 40 here ('did not answer in time')."""
    name, _ = named
    for _ in range(30):
        proc = smolvm("sandbox", "exec", "--timeout", "1", name, "--", "true")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.vm
def test_exec_timeout(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    proc = smolvm("sandbox", "exec", "--timeout", "1", name, "--", "sleep", "100")
    assert_clean_error(proc, "timed out")
    assert smolvm("sandbox", "exec", name, "--", "true").returncode == 0


@pytest.mark.vm
def test_file_upload_download(named: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    name, _ = named
    data = os.urandom(1_500_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    up = smolvm("sandbox", "file", "upload", name, str(src), "/srv/in/src.bin")
    assert up.returncode == 0, up.stderr
    sums = smolvm("sandbox", "exec", name, "--", "sha256sum", "/srv/in/src.bin")
    assert sums.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    dst = tmp_path / "dst.bin"
    down = smolvm("sandbox", "file", "download", name, "/srv/in/src.bin", str(dst))
    assert down.returncode == 0, down.stderr
    assert dst.read_bytes() == data


@pytest.mark.vm
def test_file_upload_download_of_a_directory(named: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    name, _ = named
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a.txt").write_text("a")
    os.symlink("/etc/passwd", tmp_path / "tree" / "out")
    up = smolvm("sandbox", "file", "upload", name, str(tmp_path / "tree"), "/srv/dir")
    assert up.returncode == 0 and "uploaded 1 files" in up.stdout, up.stderr
    down = smolvm("sandbox", "file", "download", name, "/srv/dir", str(tmp_path / "back"))
    assert down.returncode == 0, down.stderr
    assert "skipped out: a symlink to '/etc/passwd', outside the tree" in " ".join(down.stderr.split())
    assert (tmp_path / "back" / "sub" / "a.txt").read_text() == "a"
    again = smolvm("sandbox", "file", "download", name, "/srv/dir", str(tmp_path / "back"))
    assert_clean_error(again, "is not empty")


@pytest.mark.vm
def test_file_ls_cat_rm_mkdir(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    made = smolvm("sandbox", "file", "mkdir", name, "/srv/tree/sub")
    assert made.returncode == 0 and "made" in made.stdout, made.stderr
    again = smolvm("sandbox", "file", "mkdir", name, "/srv/tree/sub")
    assert again.returncode == 0 and "already there" in again.stdout
    # a name that would move the cursor, and content with an escape: raw when piped
    smolvm("sandbox", "exec", name, "--", "sh", "-c", "printf 'x\033[2J' > '/srv/tree/a\033]0;t\007'")
    smolvm("sandbox", "exec", name, "--", "ln", "-s", "/etc", "/srv/tree/link")
    listing = smolvm("sandbox", "file", "ls", name, "/srv/tree")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "/srv/tree/a\\x1b]0;t\\x07" in listing.stdout
    assert "/srv/tree/link -> /etc" in listing.stdout
    entries = json.loads(smolvm("sandbox", "file", "ls", name, "/srv/tree", "--json").stdout)
    assert {e["name"]: e["type"] for e in entries} == {"a\x1b]0;t\x07": "file", "link": "symlink", "sub": "dir"}
    cat = subprocess.run([str(SMOLVM_BIN), "sandbox", "file", "cat", name, "/srv/tree/a\x1b]0;t\x07"],
                         capture_output=True, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    assert cat.returncode == 0 and cat.stdout == b"x\x1b[2J", cat.stderr
    removed = smolvm("sandbox", "file", "rm", name, "/srv/tree")
    assert removed.returncode == 0, removed.stderr
    assert_clean_error(smolvm("sandbox", "file", "ls", name, "/srv/tree"), "/srv/tree", "does not exist")
    assert_clean_error(smolvm("sandbox", "file", "cat", name, "/srv"), "is a directory")
    assert_clean_error(smolvm("sandbox", "file", "rm", name, "/"), "will not remove /")


@pytest.mark.vm
def test_file_errors(named: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    name, _ = named
    assert_clean_error(smolvm("sandbox", "file", "upload", name, "/nonexistent", "/tmp/a"), "/nonexistent")
    target = tmp_path / "out"
    assert_clean_error(smolvm("sandbox", "file", "download", name, "/no/such/file", str(target)), "/no/such/file")
    assert not target.exists()
    src = tmp_path / "x"
    src.write_text("x")
    assert_clean_error(smolvm("sandbox", "file", "upload", name, str(src), "relative/path"), "absolute")


@pytest.mark.vm
def test_env_set_list_unset(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    s = smolvm("sandbox", "env", "set", name, "CLI_A=1", "CLI_B=two=2 words")
    assert s.returncode == 0, s.stderr
    env = json.loads(smolvm("sandbox", "env", "list", name, "--json").stdout)
    assert env["CLI_A"] == "1" and env["CLI_B"] == "two=2 words"
    plain = smolvm("sandbox", "env", "list", name)
    assert "CLI_A=1\n" in plain.stdout
    assert smolvm("sandbox", "exec", name, "--", 'printf %s "$CLI_B"').stdout == "two=2 words"
    u = smolvm("sandbox", "env", "unset", name, "CLI_A", "CLI_NEVER")
    assert u.returncode == 0 and "CLI_A" in u.stdout and "CLI_NEVER" not in u.stdout
    env = json.loads(smolvm("sandbox", "env", "list", name, "--json").stdout)
    assert "CLI_A" not in env and env["CLI_B"] == "two=2 words"


@pytest.mark.vm
def test_logs(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    proc = smolvm("sandbox", "logs", name)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr


HOSTILE = (
    "\x1b]0;pwned\x07"  # retitle the window
    "\x1b[2J\x1bc"  # clear the screen, reset the terminal
    "\x1bP+q544e\x1b\\"  # a DCS query: the terminal would type its answer into stdin
    "\x9b31m"  # a C1 control sequence introducer
    "\u202e"  # a bidi override
    "[link=https://evil.example]click[/link]"  # rich markup that would be a live hyperlink
)


def on_a_terminal(*args: str) -> bytes:
    """What the real CLI writes to a pseudo-terminal."""
    child = pexpect.spawn(str(SMOLVM_BIN), list(args), env=dict(os.environ), timeout=120)
    out = child.read()
    child.close()
    return out


def assert_inert(out: bytes) -> None:
    """Nothing but rich's own colours: no escape that does more than set a style."""
    assert re.sub(rb"\x1b\[[0-9;]*m", b"", out).count(b"\x1b") == 0, out
    for bad in (b"\x07", b"\x9b", "\u202e".encode(), b"\x1b]8;"):
        assert bad not in out, (bad, out)


@pytest.mark.vm
def test_guest_text_cannot_drive_the_terminal(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    vm = SmolVM.from_id(name)
    vm.set_env_vars({"EVIL": HOSTILE})
    vm.run(f"printf '%s\\n' {shlex.quote(HOSTILE)} > /dev/console")
    StateStore().update(name, note=HOSTILE)
    try:
        for args in (("env", "list", name), ("logs", name), ("info", name)):
            out = on_a_terminal("sandbox", *args)
            assert b"pwned" in out, (args, out)  # the text is there, made visible
            assert b"[link=" in out.replace(b"\\[", b"["), out  # as text, not swallowed as markup
            assert_inert(out)
        assert json.loads(smolvm("sandbox", "env", "list", name, "--json").stdout)["EVIL"] == HOSTILE  # exact
        assert_inert(on_a_terminal("sandbox", "env", "unset", name, "EVIL"))
    finally:
        StateStore().update(name, note=None)
        vm.unset_env_vars(["EVIL"])


@pytest.mark.vm
def test_an_error_quoting_guest_text_stays_on_one_line(named: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    name, _ = named
    proc = smolvm("sandbox", "file", "download", name, "/no/such\nerror: forged line", str(tmp_path / "x"))
    assert_clean_error(proc, "/no/such")
    assert proc.stderr.count("\n") == 1, proc.stderr  # the quoted line break is shown, not made


@pytest.mark.vm
def test_pause_and_resume(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    assert smolvm("sandbox", "exec", name, "--", "sh", "-c", "sleep 600 & echo $! > /root/bg").returncode == 0
    paused = smolvm("sandbox", "pause", name)
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    assert listed()[name]["state"] == "paused"
    assert_clean_error(smolvm("sandbox", "exec", name, "--", "true"), "resume it first")
    assert_clean_error(smolvm("sandbox", "pause", name), "it is paused, not running")
    resumed = smolvm("sandbox", "resume", name)
    assert resumed.returncode == 0 and "running" in resumed.stdout, resumed.stderr
    alive = smolvm("sandbox", "exec", name, "--", "sh", "-c", 'kill -0 "$(cat /root/bg)" && echo alive')
    assert alive.stdout.strip() == "alive"  # its background process went on where it was
    assert_clean_error(smolvm("sandbox", "resume", name), "it is running, not paused")


@pytest.mark.vm
def test_stop(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    pid = listed()[name]["pid"]
    assert isinstance(pid, int)
    proc = smolvm("sandbox", "stop", name)
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stdout
    entry = listed()[name]
    assert entry["state"] == "stopped" and entry["pid"] is None
    assert qemu_pid_gone(pid, name)
    assert_clean_error(smolvm("sandbox", "exec", name, "--", "true"), "not running")


@pytest.mark.vm
def test_delete_named(named: tuple[str, dict[str, object]]) -> None:
    name, _ = named
    proc = smolvm("sandbox", "delete", name)
    assert proc.returncode == 0, proc.stderr
    assert name in proc.stdout
    assert name not in listed()
    assert_clean_error(smolvm("sandbox", "info", name), "no sandbox named")


def test_delete_all() -> None:
    """Last: removes every sandbox in the session's data directory."""
    names = [f"all-{i}-{os.getpid()}" for i in range(2)]
    for n in names:
        assert smolvm("sandbox", "create", "--name", n, "--no-start").returncode == 0
    assert set(names) <= set(listed())
    proc = smolvm("sandbox", "delete", "--all")
    assert proc.returncode == 0, proc.stderr
    assert listed() == {}
    for n in names:
        assert n in proc.stdout
    again = smolvm("sandbox", "delete", "--all")  # nothing left: fine
    assert again.returncode == 0


@pytest.mark.vm
def test_concurrent_creates_never_share_a_name() -> None:
    """Processes racing for one name: exactly one wins, the rest get a clean error; the record is whole."""
    argv = [str(SMOLVM_BIN), "sandbox", "create", "--name", "race", "--no-start", "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    try:
        winners = [r for r in results if r[0] == 0]
        losers = [r for r in results if r[0] != 0]
        assert len(winners) == 1, results
        assert json.loads(winners[0][1])["id"] == "race"
        for code, _, err in losers:
            assert code == 1 and "already exists" in err and "Traceback" not in err
        assert listed()["race"]["state"] == "created"
    finally:
        smolvm("sandbox", "delete", "race")
    assert "race" not in listed()
