"""The console as a real program on a pseudo-terminal (pexpect), its screen read back
through a vt100 emulator (pyte) at 80x24."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pexpect
import pyte

from tests.support import REPO as ROOT

# What a vt100 sends for the arrows once curses put it in keypad-transmit mode.
UP, DOWN, ESC, ENTER = "\x1bOA", "\x1bOB", "\x1b", "\r"


class Term:
    """The console process on a 80x24 vt100 pty, its screen as pyte sees it."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.screen = pyte.Screen(80, 24)
        self.stream = pyte.ByteStream(self.screen)
        env = dict(os.environ, TERM="vt100", ESCDELAY="25")
        self.child = pexpect.spawn(sys.executable, ["-m", "firmware", "console", *args],
                                   cwd=str(ROOT), env=env, dimensions=(24, 80))

    def pump(self, timeout: float = 0.05) -> None:
        try:
            while True:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=timeout))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    @property
    def flat(self) -> str:
        # Messages wrap at column 79; joining the rows lets a test look for a whole one.
        return "".join(line[:79] for line in self.screen.display)

    def wait(self, *texts: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if all(t in self.text or t in self.flat for t in texts):
                return self.text
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {texts!r} on the screen:\n{self.text}")

    def send(self, keys: str) -> None:
        self.child.send(keys)
        if keys == ESC:
            time.sleep(0.1)  # lets curses tell a lone Esc from an arrow key's sequence

    def line(self, keys: str) -> None:
        self.send(keys + ENTER)

    def close(self) -> None:
        self.child.terminate(force=True)
