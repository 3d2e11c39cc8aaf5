"""Proof that whoever erases an unreadable config holds the unit's SD card.

A Pi has no button of its own to press, and the console may be a serial line
reached from far away, so a y/N is no proof of anything.  Erasing instead asks for
a one-time code the console writes to a text file on the boot partition (FAT,
readable on any computer): the operator powers the unit off, takes the card out,
reads the file elsewhere, puts the card back and types the code.  The code stays
valid across that power cycle (it is read back from the file), for `TTL_S`, and
once; after `MAX_WRONG` wrong entries a new one replaces it.  The code is never
logged and never shown on the screen.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import write_atomic

log = logging.getLogger("mirrorunit.console")

#: Where the image's boot partition is mounted (read-only, see image/build.py).
DEFAULT_CODE_FILE = "/boot/firmware/mirrorunit-erase-code.txt"
#: Unambiguous letters and digits (no 0/O, 1/I/L): 10 of them are 50 bits.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_CHARS = 10
TTL_S = 24 * 3600.0
MAX_WRONG = 3
#: A code file is a few lines; anything longer is not ours.
MAX_FILE_BYTES = 4096

_CODE_LINE = re.compile(r"^code: ([2-9A-HJKMNP-Z]{5}-[2-9A-HJKMNP-Z]{5})$", re.M)
_ISSUED_LINE = re.compile(r"^issued: (\d{1,12})$", re.M)


def _normalise(typed: str) -> str:
    return re.sub(r"[\s-]", "", typed).upper()


@dataclass
class PresenceCode:
    """The erase code kept in `path` (on the boot partition).  `remount(True/False)`
    makes that partition writable around a write (config.mount.RemountHook)."""

    path: Path
    remount: Callable[[bool], None] | None = None
    clock: Callable[[], float] = time.time
    ttl_s: float = TTL_S
    _wrong: int = field(default=0, init=False)

    def _read(self) -> tuple[str, float] | None:
        """(code, issued) of an unexpired code in the file, else None."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(MAX_FILE_BYTES).decode("ascii", "replace")
        except OSError:
            return None
        code, issued = _CODE_LINE.search(text), _ISSUED_LINE.search(text)
        if code is None or issued is None:
            return None
        at = float(issued.group(1))
        if not 0 <= self.clock() - at < self.ttl_s:
            return None
        return _normalise(code.group(1)), at

    def _write(self, data: bytes | None) -> None:
        if self.remount is not None:
            self.remount(True)
        try:
            if data is None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                write_atomic(self.path, data, 0o600)
        finally:
            if self.remount is not None:
                self.remount(False)

    def issue(self) -> bool:
        """Make sure a valid code is in the file; True when a new one was written
        (False: the one already there, e.g. read before a power cycle, still holds).
        Raises OSError when the boot partition cannot be written."""
        if self._read() is not None:
            return False
        code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_CHARS))
        now = self.clock()
        shown = f"{code[:5]}-{code[5:]}"
        text = ("MirrorUnit: one-time code to erase an unreadable configuration\n"
                f"code: {shown}\n"
                f"issued: {int(now)}\n"
                f"Valid once, for {self.ttl_s / 3600:.0f} hours from "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))}.\n"
                "Type it at the unit's console. If you did not ask for it, someone at the "
                "console did: delete this file.\n")
        self._write(text.encode("ascii"))
        self._wrong = 0
        log.warning("console: an erase code was written to %s (the code is not logged)",
                    self.path)
        return True

    def check(self, typed: str) -> bool:
        """True (and the code used up) when `typed` is the code in the file.  After
        MAX_WRONG wrong entries the code is replaced by a new one."""
        current = self._read()
        if current is None:
            return False
        if hmac.compare_digest(_normalise(typed).encode(), current[0].encode()):
            self._write(None)
            log.warning("console: the erase code was typed; the code is used up")
            return True
        self._wrong += 1
        log.warning("console: a wrong erase code was typed (%d of %d)", self._wrong,
                    MAX_WRONG)
        if self._wrong >= MAX_WRONG:
            self._write(None)
            self.issue()
        return False
