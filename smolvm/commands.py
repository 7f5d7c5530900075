"""``vm.commands``: commands in the sandbox, in the foreground or the background.

Named as the E2B SDK names them: ``run`` (``background=True`` for a process
that runs on), ``list``, ``connect`` and ``kill``. ``SmolVM.run``, ``spawn``,
``processes`` and ``get_process`` are thin calls of these.
"""

from __future__ import annotations

import builtins
import codecs
import io
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from . import protocol as P
from . import ssh
from .agent_client import GRACE, MAX_OUTPUT
from .exceptions import GuestError, ValidationError
from .filesystem import check_path as check_guest_path
from .process import Process, ProcessInfo
from .types import CommandResult

if TYPE_CHECKING:
    from .sandbox import SmolVM


def check_env(values: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or not P.ENV_KEY.fullmatch(key):
            raise ValidationError(f"{key!r} is not a valid environment variable name (letters, digits, '_')")
        if not isinstance(value, str) or "\0" in value:
            raise ValidationError(f"the value of {key} must be a string without NUL bytes")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValidationError(f"the value of {key} is not valid text (a lone surrogate?)") from None
        out[key] = value
    return out


USER_NAME = re.compile(r"\A(?:[a-z_][a-z0-9_.-]{0,31}\$?|[0-9]{1,10})\Z")


def _check_user(user: str | None, channel: str) -> str | None:
    """The guest user a command is to run as (None and "root" alike: root)."""
    if user is None or user in ("root", "0"):
        return None
    if not isinstance(user, str) or not USER_NAME.match(user):
        raise ValidationError(f"user must be a user name such as 'app' or a uid, not {user!r}")
    if channel == "ssh":
        raise ValidationError(f"running as {user!r} needs the agent channel; this handle uses SSH")
    return user


class Commands:
    """Commands in the sandbox: ``vm.commands``."""

    def __init__(self, vm: SmolVM) -> None:
        self._vm = vm

    @overload
    def run(
        self, cmd: str, timeout: float = 30, *, background: Literal[False] = False, **options: Any
    ) -> CommandResult: ...

    @overload
    def run(self, cmd: str, timeout: float = 30, *, background: Literal[True], **options: Any) -> Process: ...

    def run(
        self, cmd: str, timeout: float = 30, *, background: bool = False, **options: Any
    ) -> CommandResult | Process:
        """``cmd`` to its end (see ``foreground``: ``env``, ``cwd``, ``on_stdout``,
        ``on_stderr``, ``stdin``, ``max_output``), or, with ``background=True``,
        started and returned at once as a ``Process`` (``env`` and ``cwd`` only)."""
        if background:
            return self.spawn(cmd, **options)
        return self.foreground(cmd, timeout, **options)

    def foreground(
        self,
        cmd: str,
        timeout: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output: int = MAX_OUTPUT,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        stdin: str | bytes | BinaryIO | None = None,
        user: str | None = None,
        cancel: threading.Event | None = None,
    ) -> CommandResult:
        """Run ``cmd`` with bash in the sandbox and return its exit code and whole output.

        ``on_stdout`` / ``on_stderr`` get the output as it arrives, in chunks
        of text (a character split between chunks is held until whole).
        ``stdin`` (text, bytes or a binary file) is streamed to the command,
        never held whole, and closed at its end; without it stdin is empty.
        A command still running after ``timeout`` seconds is killed with its
        process group and descendants and raises OperationTimeoutError; the
        sandbox stays usable. Setting ``cancel`` (a ``threading.Event``, from another
        thread) kills the command the same way; its exit code (137) comes back.
        (``SmolVM.run``; ``run`` below with ``background``.)
        """
        vm = self._vm
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValidationError("the command must be a non-empty string")
        if not isinstance(timeout, (int, float)) or not 0 < timeout < 10**7:
            raise ValidationError(f"timeout must be a positive number of seconds, not {timeout!r}")
        extra = check_env(env) if env else None
        cwd = cwd if cwd is not None else vm._workdir()
        if cwd is not None:
            check_guest_path(cwd)
        user = _check_user(user if user is not None else vm._image_user(), vm._comm)
        stream = _text_stream(on_stdout, on_stderr) if on_stdout or on_stderr else None
        options: dict[str, Any] = dict(
            env=extra, cwd=cwd, max_output=max_output, on_output=stream, stdin=_input_source(stdin)
        )
        if vm._comm == "ssh":
            if cancel is not None:
                raise ValidationError("cancel needs the agent channel; this handle uses SSH")
            code, out, err = ssh.run(vm._ssh(), cmd, float(timeout), **options)
        else:
            options.update(user=user, cancel=cancel)
            # One deadline for the whole call: connecting, syncing and the command.
            deadline = time.monotonic() + timeout + GRACE
            with vm._agent(timeout=timeout + GRACE) as conn:
                code, out, err = conn.exec(cmd, timeout=float(timeout), deadline=deadline, **options)
        if stream is not None:
            stream(-1, b"")  # flush what the decoders still hold
        return CommandResult(exit_code=code, stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"))

    def spawn(
        self, cmd: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None, user: str | None = None
    ) -> Process:
        """Start ``cmd`` in the background and return at once. It runs on when this
        process exits; its output is kept (the last MiB of each stream) in the guest."""
        vm = self._vm
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValidationError("the command must be a non-empty string")
        fields: dict[str, Any] = {"cmd": cmd}
        if env:
            fields["env"] = check_env(env)
        cwd = cwd if cwd is not None else vm._workdir()
        if cwd is not None:
            fields["cwd"] = check_guest_path(cwd)
        user = _check_user(user if user is not None else vm._image_user(), "agent")
        if user is not None:
            fields["user"] = user
        with vm._agent() as conn:
            pid = conn.call("spawn", **fields).get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise GuestError(f"the guest agent answered spawn with a bad pid {pid!r}")
        return Process(vm, pid, cmd)

    def list(self) -> builtins.list[ProcessInfo]:
        """The background processes started in this sandbox (by any host process), running or exited."""
        with self._vm._agent() as conn:
            table = conn.call("procs").get("procs")
        if not isinstance(table, builtins.list) or len(table) > 10_000:
            raise GuestError("the guest agent sent a malformed process table")
        return [ProcessInfo.from_guest(entry) for entry in table]

    def connect(self, pid: int) -> Process:
        """A handle on a background process of this sandbox, also one another host process started."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValidationError(f"pid must be a positive integer, not {pid!r}")
        info = Process(self._vm, pid).info()  # raises if it is not one of ours
        return Process(self._vm, pid, info.cmd)

    def kill(self, pid: int) -> bool:
        """SIGKILL to a background process, its group and its descendants; False if none was left."""
        return self.connect(pid).kill()


def _text_stream(
    on_stdout: Callable[[str], object] | None, on_stderr: Callable[[str], object] | None
) -> Callable[[int, bytes], None]:
    """Output chunks to text callbacks, one incremental UTF-8 decoder per stream (-1 flushes)."""
    sinks = {P.STDOUT: on_stdout, P.STDERR: on_stderr}
    decoders = {ch: codecs.getincrementaldecoder("utf-8")(errors="replace") for ch in sinks}

    def feed(channel: int, data: bytes) -> None:
        for ch in sinks if channel == -1 else (channel,):
            sink = sinks.get(ch)
            text = decoders[ch].decode(data, final=channel == -1)
            if sink is not None and text:
                sink(text)

    return feed


def _input_source(stdin: str | bytes | BinaryIO | None) -> BinaryIO | None:
    if stdin is None:
        return None
    if isinstance(stdin, str):
        return io.BytesIO(stdin.encode())
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(stdin))
    if isinstance(stdin, io.TextIOBase):
        raise ValidationError("stdin must be a binary file (open it with 'rb', or pass sys.stdin.buffer)")
    if callable(getattr(stdin, "read", None)):
        return stdin
    raise ValidationError(f"stdin must be text, bytes or a binary file, not {type(stdin).__name__}")
