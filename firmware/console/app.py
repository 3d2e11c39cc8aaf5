"""The setup utility on tty1 and the serial console (curses, 80x24, keyboard only).

Every change goes through the config store in one validated update (nothing is
half-applied), needs the admin password (asked once, then valid until the
console is idle for IDLE_LOCK_S), and is then pushed to the running unit where
that can be done live.  The unit is read and driven only through its control
socket; a unit that does not answer is shown as not running.
"""

from __future__ import annotations

import curses
import logging
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, ConfigStoreError, StoreState
from ..config.backup import restore_blob
from ..config.errors import NetworkApplyError, SealError
from ..control import ControlError
from .base import (
    BACKSPACE_KEYS,
    DOWN_KEYS,
    ENTER_KEYS,
    ESC,
    IDLE_LOCK_S,
    UP_KEYS,
    ConsoleSettings,
    _cursor,
)
from .forms import FormField
from .screens.actions import ActionsScreen
from .screens.buffer import BUFFER_FIELDS, BufferScreen
from .screens.cache import CACHE_FIELDS, CacheScreen
from .screens.log import LogScreen, command_log, file_log
from .screens.network import NETWORK_FIELDS, NetworkScreen
from .screens.notify import NOTIFY_FIELDS, NotifyScreen, snmp_from_text, snmp_to_text
from .screens.password import PasswordScreen
from .screens.peers import PEER_FIELDS, PeersScreen, colon_fp
from .screens.ssh import SshScreen
from .screens.status import StatusScreen

log = logging.getLogger("mirrorunit.console")

class Console(StatusScreen, NetworkScreen, PeersScreen, BufferScreen, CacheScreen,
              NotifyScreen, PasswordScreen, ActionsScreen, SshScreen, LogScreen):
    """The main menu over the screens, after first start or recovery when needed."""

    def run(self) -> None:
        _cursor(0)
        self.first_boot()
        items = [("Status", self.status_screen), ("Network", self.network_screen),
                 ("Peers and pairing", self.peers_screen),
                 ("Buffer and volume", self.buffer_screen),
                 ("Cache mode", self.cache_screen), ("Notifications", self.notify_screen),
                 ("Admin password", self.password_screen), ("Actions", self.actions_screen),
                 ("SSH access", self.ssh_screen), ("Log", self.log_screen)]
        sel = 0
        while True:
            self.frame("main menu", "1-9, 0 or arrows + Enter: open")
            for i, (label, _) in enumerate(items):
                self.put(2 + i, 3, f"{(i + 1) % 10:>2}  {label}",
                         curses.A_REVERSE if i == sel else 0)
            self.scr.refresh()
            k = self.key()
            if k in UP_KEYS:
                sel = (sel - 1) % len(items)
            elif k in DOWN_KEYS:
                sel = (sel + 1) % len(items)
            elif ord("0") <= k <= ord("9") and (k - ord("1")) % 10 < len(items):
                sel = (k - ord("1")) % 10
                self.say("")
                items[sel][1]()
            elif k in ENTER_KEYS:
                self.say("")
                items[sel][1]()

    def first_boot(self) -> None:
        while True:
            loaded = self.s.store.load()
            if loaded.state is StoreState.CORRUPT or (
                    loaded.state is StoreState.BLANK and not self.new_unit):
                self.recovery_screen(loaded.describe(), blank=loaded.state is StoreState.BLANK)
                continue
            cfg = loaded.config
            if cfg is not None and cfg["admin.password_hash"]:
                return
            self.say("First start: choose the admin password (10 characters or more).")
            self.set_password(first=True)

    def recovery_screen(self, why: str, blank: bool = False) -> None:
        second = "Set up as a new unit" if blank else \
            "Start with a new configuration (erases what is left)"
        self.frame("recovery", f"1: recover from a peer   2: {second.split(' (')[0].lower()}")
        if blank:
            self.put(2, 2, "This unit has no configuration (new, or its card was replaced).")
        else:
            self.put(2, 2, "The configuration partition cannot be read:")
            self.put(3, 4, why[:self.w - 6])
        self.put(5, 2, "1  Recover it from a peer (network settings first, then the")
        self.put(6, 5, "admin password of this unit)")
        self.put(7, 2, f"2  {second}")
        self.scr.refresh()
        k = self.key()
        if k == ord("2"):
            if blank:
                self.new_unit = True
            else:
                self.erase_with_presence()
        elif k == ord("1"):
            self.recover_from_peer()

    def erase_with_presence(self) -> None:
        """Erase an unreadable config only for someone holding the unit's card: the
        one-time code is on its boot partition, never on this screen (presence.py)."""
        presence = self.s.presence
        if presence is None:
            self.say("Erasing needs the code on the boot partition, which this unit "
                     "lacks: recover from a peer instead.")
            return
        try:
            presence.issue()
        except OSError as e:
            self.say(f"Cannot write the erase code to the boot partition: {e}")
            return
        self.frame("erase the configuration", "Enter: check the code   Esc: cancel")
        name = Path(presence.path).name
        lines = ["Erasing needs a one-time code, written just now to the file",
                 f"  {name}",
                 "on the SD card's boot partition. To read it: power the unit off,",
                 "take the card out, open that file on another computer, put the",
                 "card back and start the unit (the code stays valid for 24 hours).",
                 "", "Nothing is erased without it. Esc leaves."]
        for i, line in enumerate(lines):
            self.put(2 + i, 2, line[:self.w - 3])
        label = "Erase code:"
        self.put(10, 2, label)
        typed = self.edit_line(10, 2 + len(label) + 1, width=20)
        if typed is None:
            self.say("Cancelled: nothing erased.")
            return
        if not presence.check(typed):
            self.say("Wrong erase code: nothing erased.")
            return
        self.s.store.reset()
        self.say("New configuration written.")

    def _recovery_form(self, with_unit: bool) -> tuple[Config, dict[str, str]] | None:
        """Network settings and the peer, typed and checked; None when left."""
        draft = Config.defaults()
        peer_fields = [FormField("peer.address", "Peer address host:port"),
                       FormField("peer.fingerprint", "Peer fingerprint")]
        if with_unit:
            peer_fields.append(FormField("peer.unit", "Unit id (if asked)",
                                         help="only when the peer keeps several units'"))
        initial = {**{f.key: draft[f.key] for f in NETWORK_FIELDS},
                   **{f.key: "" for f in peer_fields}}
        changes = self.edit_form("recovery: network", NETWORK_FIELDS + peer_fields, initial,
                                 save_label="fetch", raw_keys={f.key for f in peer_fields})
        if changes is None:
            return None
        values = {**initial, **changes}
        peer = {f.key.split(".")[1]: values.pop(f.key) for f in peer_fields}
        try:
            peers = [{"name": "recovery", "address": peer["address"],
                      "fingerprint": peer["fingerprint"]}]
            draft = draft.replace({**values, "peers": peers})
        except ConfigError as e:
            self.say(f"Refused: {e}")
            return None
        return draft, peer

    def _apply_recovery_network(self, draft: Config) -> bool:
        """The network typed on the recovery form, in effect before the peer is asked
        (the config holding it is not saved until the recovery succeeds)."""
        if self.s.apply_network is None:
            return True
        self.say("Applying the network settings...")
        self.frame("recovery", "")
        self.scr.refresh()
        try:
            self.s.apply_network(draft)
        except (NetworkApplyError, OSError, ValueError) as e:
            self.say(f"Cannot apply the network settings: {e}")
            return False
        return True

    def recover_from_peer(self) -> None:
        source = self.s.backup_source
        if source is None and self.s.peer_recovery is not None:
            self._recover_over_link()
            return
        if source is None:
            self.say("No way to reach a peer is installed on this unit.")
            return
        form = self._recovery_form(with_unit=False)
        if form is None:
            return
        draft, _ = form
        if not self._apply_recovery_network(draft):
            return
        try:
            blob = source(draft)
        except (OSError, ConnectionError, ControlError) as e:
            self.say(f"Cannot get the backup from the peer: {e}")
            return
        pw = self.ask_password("recovery", "Admin password of this unit:")
        if pw is None:
            return
        try:
            restore_blob(self.s.store, blob, pw)
        except (SealError, ConfigError, ConfigStoreError) as e:
            self.say(f"Recovery refused: {e}")
            return
        self.unlocked_at = time.monotonic()
        self.say("Configuration recovered from the peer.")

    def _recover_over_link(self) -> None:
        """The peer is asked first (reachable? the fingerprint typed? a backup?), then
        the password, which may be retyped until the peer's attempts run out."""
        from ..config.schema import split_host_port
        from ..link.errors import LinkError, LinkRefused
        from ..link.recovery import ERR_WRONG_PASSWORD
        from ..recovery import describe_recovery_failure

        form = self._recovery_form(with_unit=True)
        if form is None:
            return
        draft, peer = form
        address = split_host_port("peers[0].address", draft["peers"][0]["address"])
        fp = draft["peers"][0]["fingerprint"]
        unit = peer["unit"] or None
        where = draft["peers"][0]["address"]
        failures = (LinkError, OSError, ValueError, SealError, ConfigError, ConfigStoreError)
        if not self._apply_recovery_network(draft):
            return
        self.say(f"Asking the peer at {where}...")
        self.frame("recovery", "")
        self.scr.refresh()
        try:
            offered = self.s.peer_recovery.probe(address, fp, unit)
        except failures as e:
            self.say(describe_recovery_failure(e, where))
            return
        self.say(f"The peer keeps a backup of unit {offered}.")
        while True:
            pw = self.ask_password("recovery", "Admin password of this unit:")
            if pw is None:
                self.say("Cancelled: nothing was written.")
                return
            self.say("Checking the password with the peer...")
            self.show_message()
            self.scr.refresh()
            try:
                result = self.s.peer_recovery.recover(address, fp, pw, offered)
            except LinkRefused as e:
                self.say(describe_recovery_failure(e, where))
                if e.code == ERR_WRONG_PASSWORD:
                    continue
                return
            except failures as e:
                self.say(describe_recovery_failure(e, where))
                return
            break
        self.unlocked_at = time.monotonic()
        self.say(f"Recovered unit {result.unit_id} from the peer (generation "
                 f"{result.generation}"
                 + (", link identity restored" if result.fingerprint else "") + ").")


def _quiet_logging() -> None:
    """Log records must not be written over the screen: stderr is the terminal here."""
    import logging.handlers
    import os

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if os.path.exists("/dev/log"):
        root.addHandler(logging.handlers.SysLogHandler("/dev/log"))
    else:
        root.addHandler(logging.NullHandler())


def run_console(settings: ConsoleSettings) -> None:
    _quiet_logging()

    def main(scr: Any) -> None:
        curses.set_escdelay(50)
        scr.keypad(True)
        Console(scr, settings).run()
    curses.wrapper(main)


# What callers imported from here before the screens had modules of their own.
__all__ = [
    "BACKSPACE_KEYS", "BUFFER_FIELDS", "CACHE_FIELDS", "DOWN_KEYS", "ENTER_KEYS", "ESC",
    "IDLE_LOCK_S", "NETWORK_FIELDS", "NOTIFY_FIELDS", "PEER_FIELDS", "UP_KEYS", "Console",
    "ConsoleSettings", "FormField", "colon_fp", "command_log", "file_log", "run_console",
    "snmp_from_text", "snmp_to_text",
]
