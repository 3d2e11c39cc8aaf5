"""The code style the project keeps: ruff and mypy clean."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO as ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_clean() -> None:
    res = _run("ruff", "check", "firmware", "tests")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_clean() -> None:
    res = _run("mypy", "firmware")
    assert res.returncode == 0, res.stdout + res.stderr
