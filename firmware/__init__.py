"""MirrorUnit firmware: a remote data-mirroring appliance."""

from pathlib import Path

#: The version of this source tree (pyproject.toml says the same).
PACKAGE_VERSION = "0.1.0"

#: The copyright statement every user-facing surface shows (`mirrorunit --version`, the
#: console's status screen, the unit's `status` and so the panel's about screen).
COPYRIGHT = "Copyright (C) 2026 MirrorUnit contributors"
#: The licence the firmware is distributed under (the LICENSE file at the top of the tree).
LICENSE = "Apache-2.0"

#: The card image stamps its own version here (the package version plus the commit it was
#: built from); a unit running from an image reports that, so the console, `status` and
#: `--version` name exactly what was flashed.
IMAGE_VERSION_FILE = Path("/usr/share/mirrorunit/version")


def _running_version(stamp: Path = IMAGE_VERSION_FILE) -> str:
    try:
        text = stamp.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return PACKAGE_VERSION
    # A stamp from another package version (a root updated by hand) would mislead: ignore it.
    ok = text == PACKAGE_VERSION or text.startswith(PACKAGE_VERSION + "+")
    return text if ok and len(text) <= 64 and text.isprintable() else PACKAGE_VERSION


__version__ = _running_version()
