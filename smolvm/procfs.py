"""What the host's /proc says of a process, read in one place and one way.

Each raises ``OSError`` for a process that is gone (or was never there).
"""

from __future__ import annotations

from pathlib import Path


def cmdline(pid: int) -> list[bytes]:
    """Its argv, as the process left it (a zombie's or a kernel thread's is ``[b""]``)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def stat(pid: int) -> list[bytes]:
    """The fields of its stat line after its name (which may hold spaces and ")"):
    ``[0]`` its state (``b"Z"`` a zombie), ``[1]`` its parent, ``[19]`` its start time
    in clock ticks after boot. ``IndexError`` for a line of another shape."""
    return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
