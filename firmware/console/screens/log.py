"""The log screen, and the sources it reads the log from."""

from __future__ import annotations

import curses
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..base import DOWN_KEYS, ESC, UP_KEYS, ConsoleBase


def command_log(command: str) -> Callable[[], list[str]]:
    argv = shlex.split(command)

    def read() -> list[str]:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [f"cannot run {command}: {e}"]
        return (r.stdout or r.stderr).splitlines()
    return read


def file_log(path: str) -> Callable[[], list[str]]:
    def read() -> list[str]:
        try:
            return Path(path).read_text(errors="replace").splitlines()[-1000:]
        except OSError as e:
            return [f"cannot read {path}: {e.strerror or e}"]
    return read


class LogScreen(ConsoleBase):
    """The unit's log, scrollable."""

    def log_screen(self) -> None:
        # The journal names peers, addresses and what failed: it is for the admin.
        if not self.unlock():
            return
        lines = self.s.log_lines() or ["(the log is empty)"]
        rows = self.h - 4
        top = max(0, len(lines) - rows)
        while True:
            self.frame("log", "arrows / PgUp / PgDn: scroll   r: reload   Esc: back")
            for i, line in enumerate(lines[top:top + rows]):
                self.put(1 + i, 0, line[:self.w - 1])
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if k in UP_KEYS:
                top = max(0, top - 1)
            elif k in DOWN_KEYS:
                top = min(max(0, len(lines) - rows), top + 1)
            elif k == curses.KEY_PPAGE:
                top = max(0, top - rows)
            elif k == curses.KEY_NPAGE:
                top = min(max(0, len(lines) - rows), top + rows)
            elif k == ord("r"):
                lines = self.s.log_lines() or ["(the log is empty)"]
                top = max(0, len(lines) - rows)
