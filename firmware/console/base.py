"""What every screen of the console is built on: its settings, drawing, line editing,
the admin password lock, and reading the config and the running unit."""

from __future__ import annotations

import curses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigStore, ConfigStoreError
from ..config.backup import BackupSource
from ..config.password import check_admin_password
from ..control import ControlError, call
from ..control.status import LocalStatus, StatusShapeError, read_local_status, read_ups_report

IDLE_LOCK_S = 300.0
ESC = 27
ENTER_KEYS = (10, 13, curses.KEY_ENTER)
BACKSPACE_KEYS = (8, 127, curses.KEY_BACKSPACE)
UP_KEYS = (curses.KEY_UP, 16)  # Ctrl-P as well: some serial terminals lack arrows
DOWN_KEYS = (curses.KEY_DOWN, 14)  # Ctrl-N


@dataclass
class ConsoleSettings:
    store: ConfigStore
    control: str
    ups_control: str | None = None
    reboot: list[str] = field(default_factory=lambda: ["systemctl", "reboot"])
    poweroff: list[str] = field(default_factory=lambda: ["systemctl", "poweroff"])
    log_lines: Callable[[], list[str]] = lambda: []
    backup_source: BackupSource | None = None
    #: Recovery over the journey link (firmware.recovery.PeerRecovery): used
    #: when no `backup_source` is given.
    peer_recovery: Any = None
    #: Applies a config's network settings to this unit (firmware.config.network.
    #: NetworkHook): on saving the network screen, and with the settings typed for
    #: recovery before the peer is asked.  Returns what it did; raises
    #: NetworkApplyError.  None: settings are only stored (read at the next boot).
    apply_network: Callable[[Config], str] | None = None
    own_fingerprint: str | None = None
    refresh_s: float = 2.0
    #: The config partition's directory, where SSH access is kept (firmware.ssh_access);
    #: None hides nothing but says SSH cannot be set here.
    ssh_dir: Path | None = None
    #: Start/stop ssh.service after a change (None: files only, e.g. in tests).
    ssh_runner: Callable[[Sequence[str]], None] | None = None
    #: The one-time erase code on the boot partition (console.presence.PresenceCode);
    #: None: an unreadable config cannot be erased here, only recovered from a peer.
    presence: Any = None


def _cursor(visibility: int) -> None:
    try:
        curses.curs_set(visibility)
    except curses.error:
        pass  # vt100 has no cursor visibility control


class ConsoleBase:
    """One console on one terminal: what the screens draw with, read keys with, and
    read the config and the running unit with."""

    def __init__(self, scr: Any, settings: ConsoleSettings) -> None:
        self.scr = scr
        self.s = settings
        self.message = ""
        self.unlocked_at: float | None = None
        self.last_key = time.monotonic()
        self.h, self.w = scr.getmaxyx()
        #: The operator chose to set a blank unit up afresh instead of recovering it.
        self.new_unit = False

    # ---------------------------------------------------------------- drawing

    def put(self, y: int, x: int, text: str, attr: int = 0) -> None:
        if 0 <= y < self.h and x < self.w:
            try:
                self.scr.addnstr(y, x, text, max(0, self.w - x - (1 if y == self.h - 1 else 0)),
                                 attr)
            except curses.error:
                pass

    def frame(self, title: str, keys: str) -> None:
        self.h, self.w = self.scr.getmaxyx()
        self.scr.erase()
        head = f" MirrorUnit setup - {title}"
        self.put(0, 0, head.ljust(self.w), curses.A_REVERSE)
        self.show_message()
        self.put(self.h - 1, 0, keys[:self.w - 1])

    def show_message(self) -> None:
        """The last message on the two lines above the key help (wrapped, not cut)."""
        width = self.w - 1
        for i in range(2):
            chunk = self.message[i * width:(i + 1) * width]
            self.put(self.h - 3 + i, 0, chunk.ljust(width), curses.A_BOLD if chunk else 0)

    def key(self, timeout_ms: int = -1) -> int:
        self.scr.timeout(timeout_ms)
        k = int(self.scr.getch())
        if k != -1:
            self.last_key = time.monotonic()
        return k

    def say(self, text: str) -> None:
        self.message = text

    # ---------------------------------------------------------------- input

    def edit_line(self, y: int, x: int, initial: str = "", *, secret: bool = False,
                  width: int = 40) -> str | None:
        """A one-line editor in place; Enter returns the text, Esc returns None."""
        text = initial
        _cursor(1)
        try:
            while True:
                shown = ("*" * len(text)) if secret else text
                shown = shown[-(width - 1):]
                self.put(y, x, shown.ljust(width), curses.A_UNDERLINE)
                try:
                    self.scr.move(y, min(x + len(shown), self.w - 1))
                except curses.error:
                    pass  # a field below a terminal too small for the form: keys still edit it
                self.scr.refresh()
                k = self.key()
                if k in ENTER_KEYS:
                    return text
                if k == ESC:
                    return None
                if k in BACKSPACE_KEYS:
                    text = text[:-1]
                elif k == 21:  # Ctrl-U clears the line
                    text = ""
                elif 32 <= k < 127 and len(text) < 1024:
                    text += chr(k)
        finally:
            _cursor(0)

    def confirm(self, question: str) -> bool:
        self.put(self.h - 3, 0, (question + " [y/N] ").ljust(self.w - 1), curses.A_BOLD)
        self.scr.refresh()
        return self.key() in (ord("y"), ord("Y"))

    def ask_password(self, title: str, label: str) -> str | None:
        self.frame(title, "Enter: accept   Esc: cancel")
        self.put(3, 2, label)
        return self.edit_line(3, 2 + len(label) + 1, secret=True, width=34)

    def unlock(self) -> bool:
        """True when the admin password was given recently or is given now."""
        now = time.monotonic()
        if self.unlocked_at is not None and now - self.last_key < IDLE_LOCK_S:
            return True
        cfg = self.config()
        if cfg is None:
            return False
        pw = self.ask_password("admin password", "Admin password:")
        if pw is None:
            self.say("Cancelled: nothing changed.")
            return False
        if not self.login(cfg, pw):
            self.say("Wrong password: nothing changed.")
            return False
        self.unlocked_at = time.monotonic()
        return True

    def login(self, cfg: Config, pw: str) -> bool:
        """Check the admin password; a hash of older parameters is upgraded on the way
        (the store does it; a partition that cannot be read is only checked)."""
        try:
            return self.s.store.login(pw)
        except ConfigStoreError:
            return check_admin_password(cfg, pw)

    # ---------------------------------------------------------------- data

    def config(self) -> Config | None:
        try:
            return self.s.store._editable()[0]
        except ConfigStoreError as e:
            self.say(str(e))
            return None

    def unit_status(self) -> tuple[LocalStatus | None, str]:
        """The unit's status (a separate UPS monitor's merged in), or None and why not."""
        try:
            st = read_local_status(call(self.s.control, "status", timeout=3.0))
        except ControlError as e:
            return None, str(e)
        except StatusShapeError as e:
            return None, f"its status answer is malformed: {e}"
        if "ups" not in st and self.s.ups_control:
            try:
                st["ups"] = read_ups_report(call(self.s.ups_control, "status", timeout=3.0))
            except (ControlError, StatusShapeError):
                pass  # the screen says "UPS not monitored"
        return st, ""

    def unit_call(self, op: str, **args: Any) -> Any:
        return call(self.s.control, op, timeout=60.0, **args)
