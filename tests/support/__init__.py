"""Code the tests share (processes, fault proxy, fakes, the VM harness); no test modules."""

from __future__ import annotations

from pathlib import Path

#: The repository root: tests run `python -m firmware` and read docs and image files from here.
REPO = Path(__file__).resolve().parents[2]
