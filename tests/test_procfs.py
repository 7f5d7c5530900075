"""Reading the host's /proc (smolvm/procfs.py): a process's name may hold ") "."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smolvm import procfs


def test_stat_and_cmdline_of_a_process_whose_name_looks_like_the_line_s_own_syntax(tmp_path: Path) -> None:
    odd = tmp_path / "x) Z 1 ("
    odd.symlink_to(sys.executable)
    code = "import time; print('up', flush=True); time.sleep(30)"
    proc = subprocess.Popen([str(odd), "-c", code, "arg two"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # past exec: argv is its own
        fields = procfs.stat(proc.pid)
        assert fields[0] in (b"S", b"R") and int(fields[1]) == os.getpid()
        assert int(fields[19]) > 0  # its start time
        assert procfs.cmdline(proc.pid)[1:4] == [b"-c", code.encode(), b"arg two"]
    finally:
        proc.kill()
        proc.communicate()
    with pytest.raises(OSError):
        procfs.stat(proc.pid)  # reaped: gone
    with pytest.raises(OSError):
        procfs.cmdline(proc.pid)
