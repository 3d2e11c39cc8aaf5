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
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config, ConfigError, ConfigStore, ConfigStoreError, StoreState
from ..config.backup import BackupSource, restore_blob
from ..config.errors import NetworkApplyError, SealError
from ..config.live import apply_live
from ..config.password import check_admin_password
from ..config.schema import SCHEMA, format_size
from ..control import ControlError, call
from ..notify.events import _links

log = logging.getLogger("mirrorunit.console")

IDLE_LOCK_S = 300.0
ESC = 27
ENTER_KEYS = (10, 13, curses.KEY_ENTER)
BACKSPACE_KEYS = (8, 127, curses.KEY_BACKSPACE)
UP_KEYS = (curses.KEY_UP, 16)  # Ctrl-P as well: some serial terminals lack arrows
DOWN_KEYS = (curses.KEY_DOWN, 14)  # Ctrl-N

_backup_source: BackupSource | None = None


def set_backup_source(source: BackupSource | None) -> None:
    """Register how recovery fetches this unit's sealed config from a peer (the journey
    link provides it); `--backup-file` overrides it."""
    global _backup_source
    _backup_source = source


@dataclass
class ConsoleSettings:
    store: ConfigStore
    control: str
    ups_control: str | None = None
    reboot: list[str] = field(default_factory=lambda: ["systemctl", "reboot"])
    poweroff: list[str] = field(default_factory=lambda: ["systemctl", "poweroff"])
    log_lines: Callable[[], list[str]] = lambda: []
    backup_source: BackupSource | None = None
    #: Recovery over the journey link (firmware.link.restore.PeerRecovery): used
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


def _cursor(visibility: int) -> None:
    try:
        curses.curs_set(visibility)
    except curses.error:
        pass  # vt100 has no cursor visibility control


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


def colon_fp(fp: str) -> str:
    return ":".join(fp[i:i + 2] for i in range(0, len(fp), 2)).upper()


# ------------------------------------------------------------------ text <-> values


def snmp_to_text(targets: list[dict[str, Any]]) -> str:
    out = []
    for t in targets:
        who = f"v3:{t['v3_user']}" if "v3_user" in t else t.get("community", "")
        out.append(f"{t['host']} {who}")
    return "; ".join(out)


def snmp_from_text(text: str) -> list[dict[str, Any]]:
    """'host[:port] community; host v3:user' -> notify.snmp entries."""
    targets = []
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        words = part.split()
        if len(words) != 2:
            raise ConfigError(f"notify.snmp[{i}]",
                              "write 'host[:port] community' or 'host[:port] v3:user'")
        host, who = words
        entry = {"host": host, **({"v3_user": who[3:]} if who.startswith("v3:")
                                  else {"community": who})}
        targets.append(entry)
    return SCHEMA["notify.snmp"].type.check("notify.snmp", targets)  # type: ignore[no-any-return]


@dataclass
class FormField:
    key: str
    label: str
    choices: tuple[str, ...] = ()
    to_text: Callable[[Any], str] | None = None
    from_text: Callable[[str], Any] | None = None
    help: str = ""

    def text(self, value: Any) -> str:
        if self.to_text is not None:
            return self.to_text(value)
        return SCHEMA[self.key].type.display(value)

    def parse(self, text: str) -> Any:
        if self.from_text is not None:
            return self.from_text(text)
        return SCHEMA[self.key].type.parse(self.key, text)


NETWORK_FIELDS = [
    FormField("network.mode", "Address mode", ("dhcp", "static")),
    FormField("network.address", "Address"),
    FormField("network.netmask", "Netmask / prefix"),
    FormField("network.gateway", "Gateway"),
    FormField("network.dns", "DNS servers", help="comma-separated"),
]
BUFFER_FIELDS = [
    FormField("volume.size", "Volume size", help="e.g. 64G, or auto"),
    FormField("buffer.size", "Buffer size", help="e.g. 8G, or auto"),
    FormField("buffer.high_water", "High-water mark", help="0.5 .. 0.95 or 80%"),
]
CACHE_FIELDS = [FormField("cache.mode", "Cache mode", ("write-through", "write-back"))]
NOTIFY_FIELDS = [
    FormField("notify.snmp", "SNMP trap targets", to_text=snmp_to_text,
              from_text=snmp_from_text, help="host[:port] community; host v3:user"),
    FormField("notify.email.recipients", "E-mail recipients", help="comma-separated"),
    FormField("notify.email.relay", "SMTP relay", help="host[:port]"),
    FormField("notify.email.from", "Sender address"),
    FormField("notify.poll_interval_s", "Check every (s)"),
]
PEER_FIELDS = [
    FormField("name", "Peer name"), FormField("address", "Address host:port"),
    FormField("fingerprint", "SHA-256 fingerprint"),
]


class Console:
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
                self.scr.move(y, min(x + len(shown), self.w - 1))
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
        if not check_admin_password(cfg, pw):
            self.say("Wrong password: nothing changed.")
            return False
        self.unlocked_at = time.monotonic()
        return True

    # ---------------------------------------------------------------- data

    def config(self) -> Config | None:
        try:
            return self.s.store._editable()[0]
        except ConfigStoreError as e:
            self.say(str(e))
            return None

    def unit_status(self) -> tuple[dict[str, Any] | None, str]:
        try:
            st = dict(call(self.s.control, "status", timeout=3.0))
        except ControlError as e:
            return None, str(e)
        if "ups" not in st and self.s.ups_control:
            try:
                st["ups"] = call(self.s.ups_control, "status", timeout=3.0)
            except ControlError:
                pass
        return st, ""

    def unit_call(self, op: str, **args: Any) -> Any:
        return call(self.s.control, op, timeout=60.0, **args)

    # ---------------------------------------------------------------- screens

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

    def set_password(self, first: bool = False) -> bool:
        title = "set admin password" if first else "admin password"
        while True:
            new = self.ask_password(title, "New admin password:")
            if new is None:
                if first:
                    self.say("An admin password is needed before anything else.")
                    continue
                self.say("Cancelled: nothing changed.")
                return False
            self.put(5, 2, "Repeat it:")
            again = self.edit_line(5, 2 + len("New admin password:") + 1, secret=True,
                                   width=34)
            if again is None:
                continue
            if again != new:
                self.say("The two entries differ: try again.")
                continue
            try:
                self.s.store.set_admin_password(new)
            except (ConfigError, ConfigStoreError) as e:
                self.say(f"Refused: {e}")
                continue
            self.unlocked_at = time.monotonic()
            self.say("Admin password saved.")
            return True

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
            elif self.confirm("Erase and start with a new configuration?"):
                self.s.store.reset()
                self.say("New configuration written.")
        elif k == ord("1"):
            self.recover_from_peer()

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
        source = self.s.backup_source or _backup_source
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

    # ---- status

    def status_lines(self) -> list[str]:
        st, err = self.unit_status()
        cfg = self.config()
        serial = (cfg["unit.serial"] if cfg else "") or "-"
        name = cfg["unit.name"] if cfg else "-"
        if st is None:
            return [f"Unit        {name}   serial {serial}   console {__version__}", "",
                    "*** LOCAL UNIT NOT RUNNING ***", f"  {err}", "",
                    "The host sees no disk and nothing is mirrored until it starts."]
        v, q = st.get("volume", {}), st.get("cbq", {})
        lines = [f"Role        {st.get('role', '?'):<10} version {st.get('version', '?'):<10}"
                 f" serial {serial}   name {name}"]
        if v:
            lines.append(f"Volume      {format_size(int(v.get('size', 0)))}B, "
                         f"{v.get('state')}, mode {v.get('cache_mode')}, "
                         f"{v.get('cache_bytes', 0)} bytes in RAM cache")
        if q:
            lines.append(f"Buffer      {q.get('fill', 0):.1%} full, mode {q.get('mode')}, "
                         f"{q.get('queued_blocks', 0)} blocks in buffer, last seq "
                         f"{q.get('last_seq')}"
                         + ("  LINK PAUSED" if q.get("dequeue_paused") else ""))
        links = dict(_links(st))
        for peer, c in (q.get("consumers") or {}).items():
            if str(peer).startswith("@"):
                continue
            link = links.get(peer, {})
            lag = link.get("lag_seconds")
            if lag is None and q.get("oldest_queued_ns"):
                lag = max(0.0, time.time() - q["oldest_queued_ns"] / 1e9)
            lines.append(f"Peer {peer:<7}sent {c.get('sent_seq')}, acked by remote "
                         f"{c.get('acked_seq')}, lag {c.get('pending_records', 0)} writes"
                         f" / {0.0 if lag is None else lag:.1f} s"
                         + (", NEEDS RESYNC" if c.get("needs_resync") else ""))
            lines.append(f"  link      {link.get('state', 'no link service running')}"
                         + (f" ({link['last_error']})" if link.get("last_error") else ""))
        ups = st.get("ups")
        if isinstance(ups, dict):
            charge = ups.get("charge_percent")
            lines.append(f"UPS         {ups.get('status')}, charge "
                         f"{'unknown' if charge is None else f'{charge:.0f}%'}, runtime "
                         f"{ups.get('runtime', 'unknown')}, policy "
                         f"{(ups.get('policy') or {}).get('state', '-')}")
        else:
            lines.append("UPS         not monitored")
        return lines

    def status_screen(self) -> None:
        while True:
            self.frame("status", "Esc: back   (refreshes every few seconds)")
            for i, line in enumerate(self.status_lines()):
                self.put(2 + i, 1, line,
                         curses.A_BOLD if line.startswith("***") else 0)
            self.scr.refresh()
            k = self.key(int(self.s.refresh_s * 1000))
            if k in (ESC, ord("q")):
                return

    # ---- forms

    def edit_form(self, title: str, fields: list[FormField], values: dict[str, Any],
                  save_label: str = "save", info: Callable[[], list[str]] | None = None,
                  raw_keys: set[str] | None = None,
                  draft: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Edit `values` field by field; returns the changed values on save, None on Esc.
        `draft` resumes an edit whose save was refused."""
        raw_keys = raw_keys or set()
        draft = dict(values) if draft is None else dict(draft)
        sel = 0
        while True:
            self.frame(title, f"arrows: move   Enter: edit   s: {save_label}   Esc: back")
            for i, f in enumerate(fields):
                v = draft[f.key]
                text = v if f.key in raw_keys else f.text(v)
                mark = "*" if draft[f.key] != values[f.key] else " "
                self.put(2 + i, 1, f"{mark}{f.label:<22}", curses.A_REVERSE if i == sel else 0)
                self.put(2 + i, 25, text[:self.w - 27])
            y = 3 + len(fields)
            if fields[sel].choices:
                self.put(y, 2, "Choices: " + ", ".join(fields[sel].choices))
            elif fields[sel].help:
                self.put(y, 2, fields[sel].help)
            for j, line in enumerate(info() if info else []):
                self.put(y + 2 + j, 2, line)
            self.scr.refresh()
            k = self.key()
            if k in UP_KEYS:
                sel = (sel - 1) % len(fields)
            elif k in DOWN_KEYS:
                sel = (sel + 1) % len(fields)
            elif k in ENTER_KEYS:
                f = fields[sel]
                current = draft[f.key] if f.key in raw_keys else f.text(draft[f.key])
                while True:
                    text = self.edit_line(2 + sel, 25, current, width=min(54, self.w - 26))
                    if text is None:
                        self.say("")
                        break
                    try:
                        draft[f.key] = text.strip() if f.key in raw_keys else f.parse(text)
                    except ConfigError as e:
                        self.say(f"Refused: {e}")
                        self.show_message()
                        current = text
                        continue
                    self.say("")
                    break
            elif k == ord("s"):
                return {key: v for key, v in draft.items() if v != values[key]}
            elif k in (ESC, ord("q")):
                if draft != values and not self.confirm("Discard the changes?"):
                    continue
                self.say("Nothing changed.")
                return None

    def save(self, changes: dict[str, Any]) -> bool:
        if not changes:
            self.say("No change.")
            return True
        if not self.unlock():
            return False
        try:
            result = self.s.store.update(changes)
        except (ConfigError, ConfigStoreError) as e:
            self.say(f"Refused, nothing saved: {e}")
            return False
        report = apply_live(result.diff, result.config, self.s.control,
                            network=self.s.apply_network)
        live = [k for k, _ in report.applied]
        restart = [k for k, _ in report.restart]
        # One failure (networkctl) often covers several keys: say it once.
        failed: dict[str, list[str]] = {}
        for k, m in report.errors:
            failed.setdefault(m, []).append(k)
        self.say(f"Saved (generation {result.generation}). "
                 + (f"Applied now: {', '.join(live)}. " if live else "")
                 + (f"Needs restart: {', '.join(restart)}." if restart else "")
                 + "".join(f" FAILED {', '.join(ks)}: {m}" for m, ks in failed.items()))
        return True

    def config_form(self, title: str, fields: list[FormField],
                    info: Callable[[], list[str]] | None = None) -> None:
        draft: dict[str, Any] | None = None
        while True:
            cfg = self.config()
            if cfg is None:
                return
            values = {f.key: cfg[f.key] for f in fields}
            changes = self.edit_form(title, fields, values, info=info, draft=draft)
            if changes is None or self.save(changes):
                return
            # Refused: the form stays with what was typed so it can be corrected.
            draft = {**values, **changes}

    def network_screen(self) -> None:
        self.config_form("network", NETWORK_FIELDS)

    def buffer_screen(self) -> None:
        def info() -> list[str]:
            st, _ = self.unit_status()
            if st is None:
                return ["Local unit not running."]
            v, q = st.get("volume", {}), st.get("cbq", {})
            return [f"Now: volume {format_size(int(v.get('size', 0)))}B, buffer "
                    f"{format_size(int(q.get('ring_bytes', 0)))}B, {q.get('fill', 0):.1%} full,"
                    f" high-water {q.get('high_water', 0):.0%}, mode {q.get('mode')}"]
        self.config_form("buffer and volume", BUFFER_FIELDS, info)

    def cache_screen(self) -> None:
        def info() -> list[str]:
            cfg = self.config()
            lines = ["write-through: a write completes once it is on disk.",
                     "write-back: completes from RAM; safe only with a working UPS."]
            if cfg is not None and cfg["ups.model"] == "none":
                lines.append("WARNING: no UPS is configured (ups.model = none).")
            return lines
        self.config_form("cache mode", CACHE_FIELDS, info)

    def notify_screen(self) -> None:
        self.config_form("notifications", NOTIFY_FIELDS)

    def password_screen(self) -> None:
        cfg = self.config()
        if cfg is None:
            return
        if cfg["admin.password_hash"]:
            pw = self.ask_password("admin password", "Current password:")
            if pw is None or not check_admin_password(cfg, pw):
                self.say("Wrong password: nothing changed." if pw is not None
                         else "Cancelled: nothing changed.")
                return
        self.set_password()

    def peers_screen(self) -> None:
        sel = 0
        while True:
            cfg = self.config()
            if cfg is None:
                return
            peers: list[dict[str, Any]] = [dict(p) for p in cfg["peers"]]
            self.frame("peers and pairing",
                       "a: add   e/Enter: edit   d: delete   arrows: move   Esc: back")
            st, _ = self.unit_status()
            own = self.s.own_fingerprint
            for name, value in (st or {}).items():
                if name.startswith("link") and isinstance(value, dict) and \
                        value.get("fingerprint"):
                    own = str(value["fingerprint"])
            self.put(2, 1, "This unit's certificate fingerprint (SHA-256):")
            self.put(3, 3, colon_fp(own) if own else "not available (no link service)")
            self.put(5, 1, "Paired peers:" if peers else "No peers paired.")
            for i, p in enumerate(peers):
                self.put(6 + 2 * i, 3, f"{p['name']:<16} {p['address']}",
                         curses.A_REVERSE if i == sel else 0)
                self.put(7 + 2 * i, 5, colon_fp(p["fingerprint"]))
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if k in UP_KEYS and peers:
                sel = (sel - 1) % len(peers)
            elif k in DOWN_KEYS and peers:
                sel = (sel + 1) % len(peers)
            elif k == ord("d") and peers:
                if self.confirm(f"Remove peer {peers[sel]['name']}?"):
                    del peers[sel]
                    self.save({"peers": peers})
                    sel = 0
            elif k == ord("a") or (k in (ord("e"), *ENTER_KEYS) and peers):
                editing = k != ord("a")
                base = peers[sel] if editing else {"name": "", "address": "",
                                                   "fingerprint": ""}
                raw = {f.key for f in PEER_FIELDS}
                vals = self.edit_form("peer", PEER_FIELDS, dict(base), raw_keys=raw)
                if vals is None:
                    continue
                entry = {**base, **vals}
                new = list(peers)
                if editing:
                    new[sel] = entry
                else:
                    new.append(entry)
                self.save({"peers": new})

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

    def ssh_screen(self) -> None:
        from ..ssh_access import SshSetupError, disable, enable, state

        while True:
            self.frame("SSH access", "e: enable with a public key   d: disable   Esc: back")
            if self.s.ssh_dir is None:
                self.put(2, 2, "SSH cannot be set up here (no config partition given).")
            else:
                st = state(self.s.ssh_dir)
                self.put(2, 2, "SSH is " + ("ON" if st.enabled else "OFF") +
                         (f", {st.authorized_keys} authorized key(s)" if st.enabled else ""))
                self.put(3, 2, f"Host key  {st.host_key_fingerprint or 'none yet'}")
                self.put(5, 2, "Public keys only, no passwords. Log in as root with the key.")
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if self.s.ssh_dir is None or k not in (ord("e"), ord("d")):
                continue
            if k == ord("d") and not self.confirm("Really turn SSH off?"):
                self.say("Cancelled.")
                continue
            if not self.unlock():
                continue
            from ..config.mount import RemountHook

            remount = RemountHook(str(self.s.ssh_dir / "ssh"))
            try:
                if k == ord("d"):
                    st = disable(self.s.ssh_dir, remount=remount, runner=self.s.ssh_runner)
                    self.say(st.describe() + ".")
                    continue
                self.frame("SSH access", "Enter: enable   Esc: cancel")
                self.put(2, 2, "Paste one public key (ssh-ed25519 AAAA... comment):")
                text = self.edit_line(4, 2, width=min(76, self.w - 3))
                if text is None:
                    self.say("Cancelled: nothing changed.")
                    continue
                st = enable(self.s.ssh_dir, text, remount=remount, runner=self.s.ssh_runner)
                self.say(f"SSH on. Host key {st.host_key_fingerprint}")
            except SshSetupError as e:
                self.say(f"Refused: {e}. Nothing changed.")

    def run_command(self, argv: list[str]) -> str:
        try:
            subprocess.run(argv, check=True, timeout=60, capture_output=True)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{' '.join(argv)} failed: {e}"
        return f"Ran {' '.join(argv)}."

    def log_screen(self) -> None:
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
