"""Terminals: ``vm.pty``, and the local side of an interactive shell (raw mode,
window size, restored on every way out)."""

from __future__ import annotations

import os
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from . import protocol as P

if TYPE_CHECKING:
    from .sandbox import SmolVM

DEFAULT_SIZE = (24, 80)


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, or 24x80 when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_SIZE
    return (size.lines or DEFAULT_SIZE[0], size.columns or DEFAULT_SIZE[1])


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Keys go through unprocessed (Ctrl-C reaches the guest, not us) while the block runs;
    the terminal's settings come back however it ends. Not a terminal: nothing to do."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    try:
        tty.setraw(fd, termios.TCSANOW)  # keys typed ahead stay: TCSAFLUSH would drop them
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)  # and so do keys typed after, for the next program


@contextmanager
def resize_watch() -> Iterator[Callable[[], bool]]:
    """A check that says, once per change, that the local window was resized (SIGWINCH).
    Only the main thread can take signals; elsewhere the check says never."""
    changed = [False]

    def on_winch(signum: int, frame: FrameType | None) -> None:
        changed[0] = True

    def check() -> bool:
        hit, changed[0] = changed[0], False
        return hit

    try:
        old = signal.signal(signal.SIGWINCH, on_winch)
    except ValueError:  # not the main thread
        yield check
        return
    try:
        yield check
    finally:
        signal.signal(signal.SIGWINCH, old)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Pty:
    """Terminals in the sandbox: ``vm.pty`` (``SmolVM.shell`` calls this)."""

    def __init__(self, vm: SmolVM) -> None:
        self._vm = vm

    def shell(self, cmd: str | None = None) -> int:
        """An interactive login shell (or ``cmd``) on a terminal in the sandbox, wired to
        this process's stdin and stdout; returns its exit status. The local terminal is
        put in raw mode while it runs and restored however it ends."""
        keys, screen = sys.stdin.fileno(), sys.stdout.fileno()
        sys.stdout.flush()
        term = os.environ.get("TERM") or "xterm-256color"
        if not P.PLAIN_WORD.fullmatch(term) or len(term) > 64:
            term = "xterm-256color"
        with self._vm._agent() as conn, raw_terminal(keys), resize_watch() as resized:
            return conn.terminal(
                keys,
                lambda data: write_all(screen, data),
                lambda: window_size(screen),
                cmd=cmd,
                term=term,
                resized=resized,
            )
