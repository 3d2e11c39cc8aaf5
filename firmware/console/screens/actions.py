"""The actions screen: pause or resume the link, flush, standby, promote, reboot,
power off."""

from __future__ import annotations

import curses
import subprocess
from collections.abc import Callable

from ...control import ControlError
from ..base import DOWN_KEYS, ENTER_KEYS, ESC, UP_KEYS, ConsoleBase


class ActionsScreen(ConsoleBase):
    """Commands to the running unit, each confirmed."""

    def actions_screen(self) -> None:
        actions: list[tuple[str, str, Callable[[], str]]] = [
            ("Pause the link", "pause sending to the peers",
             lambda: (self.unit_call("cbq.pause", side="dequeue"), "Link paused.")[1]),
            ("Resume the link", "resume sending",
             lambda: (self.unit_call("cbq.resume", side="dequeue"), "Link resumed.")[1]),
            ("Flush the write cache", "flush",
             lambda: f"Cache flushed in {self.unit_call('volume.flush'):.3f} s."),
            ("Standby", "put the volume in standby (the host loses data access)",
             lambda: f"Volume is {self.unit_call('volume.set_state', state='standby')}."),
            ("Promote", "serve the volume (leave standby)",
             lambda: f"Volume is {self.unit_call('volume.set_state', state='ready')}."),
            ("Reboot", "reboot the unit", lambda: self.run_command(self.s.reboot)),
            ("Power off", "power the unit off", lambda: self.run_command(self.s.poweroff)),
        ]
        sel = 0
        while True:
            self.frame("actions", "1-7 or arrows + Enter: run (asks to confirm)   Esc: back")
            for i, (label, _, _) in enumerate(actions):
                self.put(2 + i, 4, f"{i + 1}  {label}", curses.A_REVERSE if i == sel else 0)
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if k in UP_KEYS:
                sel = (sel - 1) % len(actions)
            elif k in DOWN_KEYS:
                sel = (sel + 1) % len(actions)
            elif ord("1") <= k < ord("1") + len(actions) or k in ENTER_KEYS:
                if k not in ENTER_KEYS:
                    sel = k - ord("1")
                label, what, act = actions[sel]
                if not self.confirm(f"Really {what}?"):
                    self.say("Cancelled.")
                    continue
                if not self.unlock():
                    continue
                try:
                    self.say(act())
                except ControlError as e:
                    self.say(f"{label} failed: {e}")

    def run_command(self, argv: list[str]) -> str:
        try:
            subprocess.run(argv, check=True, timeout=60, capture_output=True)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{' '.join(argv)} failed: {e}"
        return f"Ran {' '.join(argv)}."
