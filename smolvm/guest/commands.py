"""Commands: ``exec`` and ``cancel``, the cgroup each command runs in, the sandbox's environment."""

from __future__ import annotations

import json
import os
import pwd
import queue
import select
import signal
import subprocess
import sys
import threading
import time

import limits
import protocol as P
from wire import Failure, Port, Wire, read_available

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~50 ms to import under emulation
    from typing import Any

ENV_FILE = "/etc/smolvm/env.json"
PROFILE_FILE = "/etc/profile.d/zz-smolvm-env.sh"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    **P.PROXY_ENV,
}
# Bash builtins and keywords: a command starting with one needs the shell.
# (true and false are left out: their programs behave the same.)
SHELL_WORDS = frozenset(
    "alias bg bind break builtin caller case cd command compgen complete compopt continue coproc declare dirs "
    "disown do done echo elif else enable esac eval exec exit export fc fg fi for function getopts hash help "
    "history if in jobs kill let local logout mapfile popd printf pushd pwd read readarray readonly return "
    "select set shift shopt source suspend test then time times trap type typeset ulimit umask unalias unset "
    "until wait while [ [[ ]] { } ! .".split()
)


def direct_argv(cmd: str, path: str) -> list[str] | None:
    """[program path, argv...] to exec without a shell when ``cmd`` is one plain simple command.

    Bash would exec such a command as it is; skipping bash saves its start-up
    (about 50 ms under emulation). Anything a shell would interpret, a
    builtin, or a program not on PATH goes through bash as usual.
    """
    words = cmd.split()
    if not words or "\n" in cmd or not all(P.PLAIN_WORD.fullmatch(w) for w in words):
        return None
    prog = words[0]
    if prog in SHELL_WORDS or "=" in prog or "/" in prog:
        return None
    for directory in path.split(":"):
        candidate = os.path.join(directory, prog)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return [candidate, *words]
    return None


def process_table() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process, from /proc."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table.append((int(name), int(fields[1]), int(fields[2]), fields[0].decode()))
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int, table: list[tuple[int, int, int, str]]) -> list[int]:
    """Every descendant of ``pid`` in ``table``."""
    children: dict[int, list[int]] = {}
    for child, parent, _, _ in table:
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> bool:
    """SIGKILL the process group ``pid`` leads and every descendant of ``pid``,
    also those that left its group. False when nothing of it was alive."""
    table = process_table()
    alive = {p for p, _, _, state in table if state != "Z"}
    victims = [p for p in descendants(pid, table) if p in alive]
    victims += [p for p, _, group, _ in table if group == pid and p in alive]
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(victims)


class Commands(Wire):
    def __init__(self) -> None:
        super().__init__()
        self.env = self._load_env()
        self.trust_env: dict[str, str] = {}  # where the host's CAs are (see Agent.op_trust)
        self.limits = limits.Limits()
        self.limits_lock = threading.Lock()
        # Ended commands' cgroups go, and the next one's is made, on a thread of
        # their own: the port that ran the command reads its next request at once.
        self.upkeep: queue.SimpleQueue[limits.Cgroup | None] = queue.SimpleQueue()
        threading.Thread(target=self._upkeep, name="cgroup-upkeep", daemon=True).start()

    def _command_env(self, msg: dict[str, Any]) -> tuple[dict[str, str], str, dict[str, Any]]:
        """The environment, working directory and identity a request asks for, on top of
        the sandbox's. The identity is Popen's ``user``/``group``/``extra_groups`` for a
        ``user`` other than root (by name or uid), whose home is then HOME and the
        default working directory; ``{}`` for root."""
        env = dict(BASE_ENV)
        env.update(self.trust_env)
        env.update(self.env)
        extra = msg.get("env") or {}
        if not isinstance(extra, dict):
            raise Failure("invalid", "env must be an object")
        identity = self._identity(msg.get("user"), env)
        env.update({str(k): str(v) for k, v in extra.items()})
        cwd = msg.get("cwd") or env["HOME"]
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            raise Failure("not_found", "working directory %s does not exist in the sandbox" % cwd)
        return env, cwd, identity

    @staticmethod
    def _identity(user: Any, env: dict[str, str]) -> dict[str, Any]:
        if user is None:
            return {}
        if not isinstance(user, str) or not user or len(user) > 64:
            raise Failure("invalid", "user must be a user name or uid")
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise Failure("invalid", "user %s does not exist in the sandbox" % user) from None
        if entry.pw_uid == 0:
            return {}
        env.update(HOME=entry.pw_dir if os.path.isdir(entry.pw_dir) else "/", USER=entry.pw_name, LOGNAME=entry.pw_name)
        env["SHELL"] = entry.pw_shell or "/bin/sh"
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}

    @staticmethod
    def _cmd(msg: dict[str, Any]) -> str:
        cmd = msg.get("cmd")
        if not isinstance(cmd, str) or "\0" in cmd:
            raise Failure("invalid", "cmd must be a string")
        return cmd

    def _cgroup(self) -> limits.Cgroup | None:
        with self.limits_lock:
            return self.limits.new()

    def _cgroup_done(self, cgroup: limits.Cgroup | None) -> None:
        self.upkeep.put(cgroup)

    def _upkeep(self) -> None:
        while True:
            cgroup = self.upkeep.get()
            try:
                with self.limits_lock:
                    self.limits.done(cgroup)
                    self.limits.refill()
            except Exception as exc:  # the next command makes its own cgroup then
                print("smolvm-agent: cgroup upkeep failed: %s" % exc, file=sys.stderr, flush=True)

    @staticmethod
    def _end(proc: subprocess.Popen[bytes], cgroup: limits.Cgroup | None) -> bool:
        """Kill a command with everything it started; False if nothing of it was left.
        The cgroup at once, and the process tree too: what the command started before
        it was moved into its cgroup is only found that way."""
        killed = cgroup.kill() if cgroup is not None else False
        return kill_tree(proc.pid) or killed

    def op_exec(self, rid: int, msg: dict[str, Any]) -> None:
        port: Port = self.local.port
        cmd = self._cmd(msg)
        env, cwd, identity = self._command_env(msg)
        timeout = float(msg.get("timeout") or 0) or None
        shell = msg.get("shell") or "/bin/bash"
        direct = direct_argv(cmd, env["PATH"]) if "shell" not in msg else None
        feed = port.inputs.get(rid)
        cancel = self._cancel_event(rid)
        cgroup = self._cgroup()
        try:
            if feed is None:
                proc = self._spawn(direct, [shell, "-c", cmd], cwd, env, subprocess.DEVNULL, cgroup, identity)
            else:
                stdin_r, stdin_w = os.pipe()
                try:
                    proc = self._spawn(direct, [shell, "-c", cmd], cwd, env, stdin_r, cgroup, identity)
                except BaseException:
                    os.close(stdin_w)
                    raise
                finally:
                    os.close(stdin_r)
                feed.start(stdin_w, owned=True)
            assert proc.stdout is not None and proc.stderr is not None
            try:
                outputs = {proc.stdout.fileno(): P.STDOUT, proc.stderr.fileno(): P.STDERR}
                timed_out = self._pump(rid, proc, outputs, cancel, timeout, cgroup)
            finally:
                if feed is not None:
                    feed.stop()
                proc.stdout.close()
                proc.stderr.close()
                proc.wait()
            port.cancels.pop(rid, None)
            self.reply({"op": "exit", "id": rid, "exit_code": proc.returncode, "timed_out": timed_out})
        finally:
            port.cancels.pop(rid, None)
            self._cgroup_done(cgroup)  # after the answer: the host need not wait for the cgroup's upkeep

    @staticmethod
    def _spawn(
        direct: list[str] | None,
        shell_argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin: int,
        cgroup: limits.Cgroup | None,
        identity: dict[str, Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a command in a session and a cgroup of its own: exec'd directly when it is a
        plain one, else through the shell. What the direct exec cannot run (no shebang, a
        missing interpreter) gets the shell's say."""
        options: dict[str, Any] = dict(
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
            **(identity or {}),
        )  # fmt: skip
        proc = None
        if direct is not None:
            try:
                proc = subprocess.Popen(direct[1:], executable=direct[0], **options)
            except OSError:
                pass
        if proc is None:
            try:
                proc = subprocess.Popen(shell_argv, **options)
            except FileNotFoundError:
                raise Failure("not_found", "shell %s not found in the sandbox" % shell_argv[0]) from None
        if cgroup is not None:
            cgroup.add(proc.pid)
        return proc

    def _pump(
        self,
        rid: int,
        proc: subprocess.Popen[bytes],
        channels: dict[int, int],
        cancel: threading.Event,
        timeout: float | None = None,
        cgroup: limits.Cgroup | None = None,
    ) -> bool:
        """Stream what the process writes to ``channels`` (fd -> channel) until it exits;
        kill its tree on timeout or cancel. True if it timed out."""
        channels = dict(channels)
        for fd in channels:
            os.set_blocking(fd, False)
        deadline = time.monotonic() + timeout if timeout else None
        timed_out = False
        exited_at: float | None = None
        while channels:
            wait = 0.05
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            ready, _, _ = select.select(list(channels), [], [], wait)
            for fd in ready:
                chunk = read_available(fd)
                if chunk is None:
                    del channels[fd]
                elif chunk:
                    self.send(P.encode(P.DATA, chunk, rid, channels[fd]))
            if cancel.is_set() or (deadline is not None and time.monotonic() >= deadline):
                timed_out = not cancel.is_set()
                self._end(proc, cgroup)
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            # The shell exited but a background child still holds the pipes (or
            # the terminal): deliver what is already there, then stop waiting for EOF.
            if exited_at is not None and not ready and time.monotonic() - exited_at > 0.05:
                break
        return timed_out

    def op_cancel(self, rid: int, msg: dict[str, Any]) -> None:
        event = self.local.port.cancels.get(int(msg.get("target", -1)))
        if event is not None:
            event.set()

    # -- environment ----------------------------------------------------
    @staticmethod
    def _load_env() -> dict[str, str]:
        try:
            with open(ENV_FILE) as f:
                data = json.load(f)
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_env(self) -> None:
        os.makedirs(os.path.dirname(ENV_FILE), exist_ok=True)
        tmp = ENV_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.env, f)
        os.replace(tmp, ENV_FILE)
        # Login shells (ssh, an interactive shell) see the same variables.
        import shlex

        lines = ["export %s=%s\n" % (k, shlex.quote(v)) for k, v in sorted(self.env.items())]
        with open(PROFILE_FILE + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(PROFILE_FILE + ".tmp", PROFILE_FILE)

    def op_env_set(self, rid: int, msg: dict[str, Any]) -> None:
        values = msg.get("vars")
        if not isinstance(values, dict):
            raise Failure("invalid", "vars must be an object")
        for key, value in values.items():
            if not P.ENV_KEY.fullmatch(key) or not isinstance(value, str) or "\0" in value:
                raise Failure("invalid", "bad environment variable %r" % key)
        self.env.update(values)
        self._save_env()
        self.reply({"op": "ok", "id": rid})

    def op_env_unset(self, rid: int, msg: dict[str, Any]) -> None:
        keys = msg.get("keys")
        if not isinstance(keys, list):
            raise Failure("invalid", "keys must be a list")
        removed = [k for k in keys if self.env.pop(str(k), None) is not None]
        self._save_env()
        self.reply({"op": "ok", "id": rid, "removed": removed})

    def op_env_list(self, rid: int, msg: dict[str, Any]) -> None:
        self.reply({"op": "ok", "id": rid, "vars": self.env})
