"""Atomic small-file replacement."""

from __future__ import annotations

import os
from pathlib import Path

from firmware.fsutil import write_atomic


def test_write_atomic_replaces_with_the_mode_from_the_start(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    (tmp_path / "key.pem.tmp").write_bytes(b"torn leftover of a cut")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"new" * 10_000, 0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" * 10_000
    assert target.stat().st_mode & 0o777 == 0o644  # the umask did not narrow it
    assert not (tmp_path / "key.pem.tmp").exists()
    write_atomic(target, b"", 0o600)
    assert target.read_bytes() == b"" and target.stat().st_mode & 0o777 == 0o600
