"""The code stays ruff- and mypy-clean: CI checks it like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff() -> None:
    proc = run(str(BIN / "ruff"), "check", "smolvm", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = run(str(BIN / "mypy"), "smolvm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
