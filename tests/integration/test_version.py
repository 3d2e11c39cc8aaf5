"""The version a unit reports: the image's stamp when it runs from an image."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import firmware
from firmware import PACKAGE_VERSION, _running_version
from tests.support import REPO


def test_package_version_matches_pyproject() -> None:
    pkg = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert PACKAGE_VERSION == pkg


def test_image_stamp_is_reported(tmp_path: Path) -> None:
    stamp = tmp_path / "version"
    stamp.write_text(f"{PACKAGE_VERSION}+g1234abcd\n")
    assert _running_version(stamp) == f"{PACKAGE_VERSION}+g1234abcd"


def test_missing_or_foreign_stamp_falls_back_to_the_package(tmp_path: Path) -> None:
    assert _running_version(tmp_path / "absent") == PACKAGE_VERSION
    for bad in ("9.9.9+gdeadbeef", "", "\x00\xff", f"{PACKAGE_VERSION}+g" + "x" * 100):
        (tmp_path / "v").write_bytes(bad.encode("latin-1"))
        assert _running_version(tmp_path / "v") == PACKAGE_VERSION, bad


def test_cli_version_is_the_running_version_with_the_copyright() -> None:
    r = subprocess.run([sys.executable, "-m", "firmware.cli", "--version"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    first, second, third = r.stdout.splitlines()
    assert first.split() == ["mirrorunit", firmware.__version__]
    assert second == firmware.COPYRIGHT
    assert firmware.LICENSE in third


def test_the_licence_file_is_the_one_named() -> None:
    text = (REPO / "LICENSE").read_text()
    assert firmware.LICENSE == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert firmware.COPYRIGHT.startswith("Copyright (C) 2026 ")
    # the README says why this licence fits every dependency
    assert "Apache-2.0" in (REPO / "README.md").read_text()
