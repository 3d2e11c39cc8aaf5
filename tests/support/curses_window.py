"""A curses window for driving the console's screens in-process: keys from a list, and
curses' own refusals (writing or moving the cursor outside the window raises
curses.error), so a screen that would crash on a small terminal crashes here too."""

from __future__ import annotations

import curses
from collections.abc import Sequence


class KeysRanOut(Exception):
    """The screen kept reading keys after the given ones and the Esc/y drain."""


class FakeWindow:
    def __init__(self, h: int, w: int, keys: Sequence[int], drain: int = 64) -> None:
        self.h, self.w = h, w
        self.keys = list(keys)
        self.pos = 0
        self.drain = drain
        self.drained = 0

    def getmaxyx(self) -> tuple[int, int]:
        return self.h, self.w

    def addnstr(self, y: int, x: int, text: str, n: int, attr: int = 0) -> None:
        assert isinstance(text, str) and isinstance(n, int)
        if not (0 <= y < self.h and 0 <= x < self.w):
            raise curses.error("addnwstr() returned ERR")

    def move(self, y: int, x: int) -> None:
        if not (0 <= y < self.h and 0 <= x < self.w):
            raise curses.error("wmove() returned ERR")

    def erase(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def timeout(self, ms: int) -> None:
        pass

    def getch(self) -> int:
        """The next key; once they run out, Esc and y in turn (leave, and confirm
        leaving), so every screen returns; after `drain` of those, KeysRanOut."""
        if self.pos < len(self.keys):
            self.pos += 1
            return self.keys[self.pos - 1]
        self.drained += 1
        if self.drained > self.drain:
            raise KeysRanOut(f"still reading keys after {self.drain} of Esc/y")
        return 27 if self.drained % 2 else ord("y")
