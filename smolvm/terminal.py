"""The local side of an interactive shell: raw mode, window size, restored on every way out."""

from __future__ import annotations

import os
import signal
import termios
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

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
