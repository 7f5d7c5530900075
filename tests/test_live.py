"""Live work in a real sandbox: stdin, background processes, the terminal, several connections at once."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest
from conftest import PYTHON, SMOLVM_BIN, run_python

from smolvm import SmolVM
from smolvm import protocol as P
from smolvm.exceptions import OperationTimeoutError, ValidationError
from smolvm.process import Process

pytestmark = pytest.mark.vm


class CountingReader(io.RawIOBase):
    """``size`` bytes of a repeating pattern, made as they are read: never held whole."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.largest_read = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.largest_read = max(self.largest_read, n)
        chunk = (b"0123456789abcdef" * (n // 16 + 1))[:n]
        self.left -= n
        self.digest.update(chunk)
        return chunk


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


# -- stdin ---------------------------------------------------------------------


def test_stdin_text_and_bytes(vm: SmolVM) -> None:
    assert vm.run("python3 -", stdin="print(6*7)\n").stdout == "42\n"
    data = bytes(range(256)) * 100
    result = vm.run("sha256sum", stdin=data)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_is_empty_without_input(vm: SmolVM) -> None:
    """No stdin given: the command reads end of file at once, it does not wait."""
    assert vm.run("cat; echo done", timeout=10).stdout == "done\n"


def test_stdin_larger_than_the_window_is_streamed(vm: SmolVM) -> None:
    """64 MiB from a reader that makes it on the fly: read in bounded chunks, arrives exact."""
    reader = CountingReader(64 << 20)
    result = vm.run("sha256sum", stdin=reader, timeout=300)  # type: ignore[arg-type]
    assert result.stdout.split()[0] == reader.digest.hexdigest()
    assert reader.largest_read <= 1 << 20  # never asked for the whole input


def test_stdin_the_command_never_reads(vm: SmolVM) -> None:
    """A command that exits without reading its input returns; the rest is dropped."""
    started = time.monotonic()
    result = vm.run("echo quick", stdin=CountingReader(32 << 20), timeout=60)  # type: ignore[arg-type]
    assert result.stdout == "quick\n"
    assert time.monotonic() - started < 30
    assert vm.run("echo after").stdout == "after\n"


def test_stdin_bad_type(vm: SmolVM) -> None:
    with pytest.raises(ValidationError, match="stdin"):
        vm.run("cat", stdin=12345)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="binary file"):
        vm.run("cat", stdin=io.StringIO("text mode"))  # type: ignore[arg-type]


class FailingReader(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        raise OSError("the disk went away")


def test_stdin_source_that_fails(vm: SmolVM) -> None:
    """The command gets the end of input (it does not hang) and the caller the source's error."""
    started = time.monotonic()
    with pytest.raises(ValidationError, match="reading the command's stdin failed: the disk went away"):
        vm.run("cat", stdin=FailingReader(), timeout=60)  # type: ignore[arg-type]
    assert time.monotonic() - started < 30


def agent_fds(vm: SmolVM) -> int:
    return int(vm.run("ls /proc/$(pgrep -o -f 'import agent')/fd | wc -l").output)


def test_stdin_to_commands_that_exit_early_leaks_nothing(vm: SmolVM) -> None:
    """Input left unwritten when a command exits: the agent closes its end every time."""
    before = agent_fds(vm)
    for _ in range(30):
        vm.run("head -c 1 >/dev/null", stdin=b"x" * 300_000)
    assert agent_fds(vm) <= before + 2  # the listing's own connection may hold one or two


# -- background processes ------------------------------------------------------


def test_spawn_poll_wait_output(vm: SmolVM) -> None:
    proc = vm.spawn("echo start; sleep 1.5; echo err >&2; exit 3", cwd="/tmp", env={"WHO": "me"})
    assert proc.pid > 1
    assert proc.poll() is None
    result = proc.wait(timeout=30)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "start\n", "err\n")
    assert proc.poll() == 3
    assert proc.output() == ("start\n", "err\n")
    listed = {p.pid: p for p in vm.processes()}
    assert listed[proc.pid].exit_code == 3 and not listed[proc.pid].running
    assert "sleep 1.5" in listed[proc.pid].cmd


def test_spawn_sees_cwd_and_env(vm: SmolVM) -> None:
    proc = vm.spawn("pwd; echo $WHO", cwd="/tmp", env={"WHO": "me"})
    assert proc.wait(timeout=30).stdout == "/tmp\nme\n"


def test_wait_times_out_and_the_process_runs_on(vm: SmolVM) -> None:
    proc = vm.spawn("sleep 30")
    with pytest.raises(OperationTimeoutError, match="still runs"):
        proc.wait(timeout=1)
    assert proc.poll() is None
    assert proc.kill() is True
    assert wait_until(lambda: proc.poll() is not None)
    assert proc.poll() == 128 + signal.SIGKILL


def test_kill_ends_the_whole_tree_and_twice_is_defined(vm: SmolVM) -> None:
    proc = vm.spawn("sleep 301 & setsid sleep 302 & sleep 303; wait")
    assert wait_until(lambda: vm.run("pgrep -c -f '^sleep 30[123]$'").output == "3")
    assert proc.kill() is True
    assert wait_until(lambda: vm.run("pgrep -f '^sleep 30[123]$' || true").output == "")
    assert wait_until(lambda: proc.poll() is not None)
    assert proc.kill() is False  # nothing left of it: a defined answer, not an error


def test_run_timeout_kills_descendants_that_left_the_group(vm: SmolVM) -> None:
    with pytest.raises(OperationTimeoutError):
        vm.run("setsid sleep 311 & sleep 312", timeout=2)
    assert wait_until(lambda: vm.run("pgrep -f '^sleep 31[12]$' || true").output == "")


def test_output_flood_is_bounded_with_a_marker(vm: SmolVM) -> None:
    """A background process writing far more than the ring: the newest MiB is kept, the rest counted."""
    proc = vm.spawn("head -c 20000000 /dev/zero | tr '\\0' a; echo; echo tail-end")
    result = proc.wait(timeout=120)
    assert result.exit_code == 0
    first, _, rest = result.stdout.partition("\n")
    assert first.startswith("[smolvm: ") and "bytes of earlier output dropped" in first
    dropped = int(first.split()[1])
    assert dropped + len(rest) == 20000000 + len("\ntail-end\n")
    assert len(rest) == 1 << 20
    assert rest.endswith("a\ntail-end\n")


def test_binary_output_kept_as_bytes_and_replaced_in_text(vm: SmolVM) -> None:
    proc = vm.spawn("printf 'ok\\377\\376end'")
    proc.wait(timeout=30)
    out, _ = proc.output(binary=True)
    assert out == b"ok\xff\xfeend"
    text, _ = proc.output()
    assert text == "ok\ufffd\ufffdend"


def test_a_pid_that_is_not_ours(vm: SmolVM) -> None:
    with pytest.raises(ValidationError, match="not a background process"):
        vm.get_process(1)
    with pytest.raises(ValidationError, match="positive integer"):
        vm.get_process(-4)
    with pytest.raises(ValidationError, match="not a background process"):
        Process(vm, 999_999).kill()


def test_spawn_rejects_bad_input(vm: SmolVM) -> None:
    with pytest.raises(ValidationError):
        vm.spawn("  ")
    with pytest.raises(ValidationError):
        vm.spawn("true", env={"1BAD": "x"})
    with pytest.raises(ValidationError):
        vm.spawn("true", cwd="relative/dir")


def test_background_process_outlives_its_host_process(vm: SmolVM) -> None:
    """Started by a Python process that then exits; this one reattaches and reads it."""
    started = run_python(
        "from smolvm import SmolVM\n"
        f"p = SmolVM.from_id({vm.vm_id!r}).spawn('sleep 8; echo finished-later')\n"
        "print(p.pid)\n"
    )
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.strip())
    proc = vm.get_process(pid)
    assert proc.cmd == "sleep 8; echo finished-later"
    assert proc.poll() is None  # it outlived its creator
    assert proc.wait(timeout=30).stdout == "finished-later\n"


def test_another_host_process_reattaches_and_reads(vm: SmolVM) -> None:
    proc = vm.spawn("echo from-the-first; sleep 1")
    code = (
        "from smolvm import SmolVM\n"
        f"r = SmolVM.from_id({vm.vm_id!r}).get_process({proc.pid}).wait(timeout=30)\n"
        "print(r.exit_code, r.stdout.strip())\n"
    )
    other = run_python(code)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "0 from-the-first"


def test_background_process_survives_a_dropped_connection(vm: SmolVM) -> None:
    """A host process killed while it waits on a background process: the process runs on."""
    proc = vm.spawn("sleep 3; echo survived")
    waiter = subprocess.Popen(
        [str(PYTHON), "-c", f"from smolvm import SmolVM; SmolVM.from_id({vm.vm_id!r}).get_process({proc.pid}).wait()"],
        env=os.environ.copy(),
    )
    time.sleep(1.5)  # it holds a connection, waiting
    waiter.kill()
    waiter.wait()
    assert proc.wait(timeout=30).stdout == "survived\n"


def test_commands_run_while_other_connections_are_held(vm: SmolVM) -> None:
    """Long waits on several threads do not hold up a plain command."""
    proc = vm.spawn("sleep 6")
    waiters = [threading.Thread(target=lambda: proc.wait(timeout=30)) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert vm.run("echo beside").stdout == "beside\n"
    assert time.monotonic() - started < 4  # not after the waits
    for w in waiters:
        w.join()


# -- the terminal --------------------------------------------------------------


def shell(vm: SmolVM, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        str(SMOLVM_BIN),
        ["sandbox", "shell", vm.vm_id, *args],
        dimensions=(30, 100),
        timeout=30,
        encoding="utf-8",
        env={**os.environ, "TERM": "xterm-256color"},  # the local terminal's type goes to the guest
    )


PROMPT = r"root@[\w-]+:[^\r\n]*# "


def test_keys_typed_before_the_first_prompt_are_kept(vm: SmolVM) -> None:
    """As ssh does: expect scripts and tmux send-keys type before the shell is ready."""
    child = shell(vm)
    child.sendline("echo $((6*7))")  # at once, before any prompt
    child.expect(r"\b42\r?\n")
    child.expect(PROMPT)
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3


def test_shell_colours_resize_ctrl_c_and_exit_code(vm: SmolVM) -> None:
    child = shell(vm)
    child.expect(PROMPT)
    child.sendline("stty size; echo term=$TERM; tput colors")
    child.expect("30 100")
    child.expect("term=xterm-256color")
    child.expect("256")  # colours work
    child.setwinsize(40, 120)  # the CLI gets SIGWINCH and passes the size on
    time.sleep(0.5)
    child.sendline("stty size")
    child.expect("40 120")
    child.sendline("sleep 100; echo not-interrupted")
    time.sleep(1)
    child.sendcontrol("c")  # reaches sleep in the guest, not the CLI
    child.expect(PROMPT)
    assert "not-interrupted" not in (child.before or "")
    child.sendline("exit 7")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7


def test_shell_line_editing_and_vim(vm: SmolVM) -> None:
    child = shell(vm)
    child.expect(PROMPT)
    child.send("echo helo")
    child.send("\x1b[D\x1b[D")  # cursor left twice: readline edits the line
    child.send("l\r")
    child.expect("hello")
    child.sendline("vi /tmp/from-vim.txt")
    time.sleep(2)
    child.send("iwritten in vim\x1b")
    child.send(":wq\r")
    child.expect(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)
    assert vm.run("cat /tmp/from-vim.txt").stdout == "written in vim\n"


def test_shell_runs_a_command_and_survives_resizes_as_it_exits(vm: SmolVM) -> None:
    """A program that exits while its window is being resized: a clean exit, no error."""
    child = shell(vm, "--", "sleep", "1")
    for i in range(30):
        child.setwinsize(20 + i % 10, 80 + i)
        time.sleep(0.05)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert vm.run("echo fine").stdout == "fine\n"


def test_shell_with_piped_input_ends_at_its_end(vm: SmolVM) -> None:
    """Keys from a pipe, not a terminal: at their end the shell gets Ctrl-D and exits."""
    proc = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "shell", vm.vm_id],
        input="echo piped-$((6*7))\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "piped-42" in proc.stdout


RESTORE_CHECK = """
import sys, termios
from smolvm import SmolVM
before = termios.tcgetattr(0)
try:
    code = SmolVM.from_id(sys.argv[1]).shell(sys.argv[2])
except Exception as exc:
    code = type(exc).__name__
print("restored", termios.tcgetattr(0) == before, "code", code)
"""


def test_python_shell_restores_the_terminal(vm: SmolVM, tmp_path: Path) -> None:
    script = tmp_path / "restore.py"
    script.write_text(RESTORE_CHECK)
    child = pexpect.spawn(str(PYTHON), [str(script), vm.vm_id, "exit 4"], timeout=60, encoding="utf-8")
    child.expect(r"restored (\w+) code (\w+)")
    assert child.match.groups() == ("True", "4")


def test_terminal_restored_when_the_sandbox_dies_under_the_shell(tmp_path: Path) -> None:
    box = SmolVM()
    try:
        box.start()
        script = tmp_path / "restore.py"
        script.write_text(RESTORE_CHECK)
        child = pexpect.spawn(str(PYTHON), [str(script), box.vm_id, "sleep 60"], timeout=60, encoding="utf-8")
        time.sleep(3)
        pid = box.info()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)  # the hypervisor goes while the shell runs
        child.expect(r"restored (\w+) code (\w+)")
        restored, code = child.match.groups()
        assert restored == "True"
        assert code in ("GuestError", "OperationTimeoutError", "HostError")
    finally:
        box.delete()


# -- the CLI's stdin -------------------------------------------------------------


def test_cli_exec_interactive_passes_stdin(vm: SmolVM) -> None:
    proc = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "exec", "-i", vm.vm_id, "--", "tr", "a-z", "A-Z"],
        input="hello from the host\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "HELLO FROM THE HOST\n")
    # Without -i the command's stdin is empty, whatever the CLI's is.
    proc = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "exec", vm.vm_id, "--", "cat"],
        input="ignored\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "")


def test_cli_shell_of_a_stopped_or_unknown_sandbox() -> None:
    proc = subprocess.run(
        [str(SMOLVM_BIN), "sandbox", "shell", "no-such-box"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


# -- limits: what one command may take of the sandbox ------------------------------

BOMB = ":(){ :|:& };:"


def answers_within(vm: SmolVM, seconds: float) -> float:
    started = time.monotonic()
    assert vm.run("echo up", timeout=seconds).stdout == "up\n"
    return time.monotonic() - started


def test_a_fork_bomb_is_contained_and_its_timeout_ends_it_at_once(vm: SmolVM) -> None:
    started = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        vm.run(f"{BOMB}; sleep 600", timeout=8)
    assert time.monotonic() - started < 8 + 1  # the host's deadline held
    assert answers_within(vm, 10) < 5  # and the sandbox answers at once
    # cgroup.kill took the whole command: nothing of the bomb is left.
    count = "cat /sys/fs/cgroup/smolvm/cmd-*/pids.current | awk '{n += $1} END {print n}'"
    # This command, and what other tests left running; a thousand killed processes take a moment to go.
    assert wait_until(lambda: int(vm.run(count).stdout) < 100, 10)


def test_a_fork_bomb_left_in_the_background_cannot_take_the_sandbox(vm: SmolVM) -> None:
    vm.run(BOMB, timeout=30)  # its shell returns at once; the bomb runs on in its cgroup
    try:
        time.sleep(8)  # until it has hit its pids limit
        for _ in range(3):
            assert answers_within(vm, 20) < 5
        peak = vm.run("cat /sys/fs/cgroup/smolvm/cmd-*/pids.peak | sort -n | tail -1").stdout
        assert int(peak) <= 1024, peak
    finally:
        end_others = 'me=$(cut -d/ -f3 /proc/self/cgroup); for g in /sys/fs/cgroup/smolvm/cmd-*; do [ "${g##*/}" = "$me" ] || echo 1 > "$g/cgroup.kill"; done'
        vm.run(end_others, timeout=30)


def test_a_memory_hog_is_killed_and_the_agent_is_not(vm: SmolVM) -> None:
    agent = vm.run("pgrep -f -o agent.main").stdout.strip()
    result = vm.run("python3 -c 'x = []\nwhile True: x.append(bytearray(1 << 20))'", timeout=60)
    assert result.exit_code == 137, result  # SIGKILL from the OOM killer, inside its cgroup
    assert vm.run("pgrep -f -o agent.main").stdout.strip() == agent
    assert answers_within(vm, 10) < 5


# -- a handle's kept connection -------------------------------------------------


def free_ports(vm: SmolVM) -> int:
    from smolvm import locks
    from smolvm.paths import sandbox_dir

    free = 0
    for i in range(P.PORTS):
        fd = locks.try_lock(sandbox_dir(vm.vm_id) / f"agent-{i}.lock")
        if fd is not None:
            free += 1
            locks.unlock(fd)
    return free


def test_calls_reuse_one_connection_and_let_its_port_go_when_idle(vm: SmolVM) -> None:
    from smolvm.connections import KEEP_IDLE

    vm.run("true")
    first = vm._connections.kept
    assert first is not None
    vm.run("true")
    assert vm._connections.kept is first  # connected and synced once
    assert free_ports(vm) == P.PORTS - 1
    time.sleep(KEEP_IDLE + 1)
    assert vm._connections.kept is None
    assert free_ports(vm) == P.PORTS  # another process may have every port now


def test_a_connection_that_failed_is_not_kept(vm: SmolVM) -> None:
    vm.run("true")
    first = vm._connections.kept
    with pytest.raises(OperationTimeoutError):
        vm.run("sleep 10", timeout=1)
    assert vm._connections.kept is None
    assert vm.run("echo fresh").stdout == "fresh\n"
    assert vm._connections.kept is not first
