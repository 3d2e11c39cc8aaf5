"""What the front panel is shown and what it may do, with the console's checks.

Every change needs the admin password, checked by `config.password.
check_admin_password` against the config store exactly as the console checks it;
changes go through the config store (`ConfigStore.update`, then `config.live.
apply_live`) and the unit's control socket (`volume.set_state`, `volume.flush`), the
same calls the console's screens make.  The panel asks by operation name only: it
cannot reach any other control method.  Wrong passwords are rate limited.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import COPYRIGHT, __version__
from ..config import ConfigError, ConfigStore, ConfigStoreError
from ..config.live import apply_live
from ..config.password import MAX_PASSWORD_LENGTH, check_admin_password
from ..config.schema import SCHEMA
from ..control import ControlError, call
from ..control.status import StatusShapeError, read_local_status, read_ups_report
from ..errors import MirrorUnitError
from ..notify.events import links

log = logging.getLogger("mirrorunit.panel")

#: Wrong passwords allowed before the panel is locked out, and the first lockout (it
#: doubles with each further wrong password, up to LOCKOUT_MAX_S).
FREE_ATTEMPTS = 3
LOCKOUT_S = 30.0
LOCKOUT_MAX_S = 900.0
#: How long a switchover waits for the remote to acknowledge every queued write.
SWITCHOVER_WAIT_S = 60.0
#: Longest text of one status field the panel is sent (its screen has 16 columns).
MAX_FIELD = 48

Caller = Callable[..., Any]


@dataclass(frozen=True)
class ActionSettings:
    control: str
    store: ConfigStore
    ups_control: str | None = None
    #: this unit's certificate fingerprint (hex), shown for pairing
    fingerprint: str | None = None
    #: applies network.* to this machine (firmware.config.network.NetworkHook)
    apply_network: Callable[[Any], str] | None = None
    poweroff: tuple[str, ...] = ("systemctl", "poweroff")


class Refused(MirrorUnitError):
    """An action the panel asked for is refused; the message is shown on the panel."""


def _short(value: Any) -> str:
    return str(value)[:MAX_FIELD]


class PanelActions:
    def __init__(self, settings: ActionSettings, caller: Caller = call,
                 clock: Callable[[], float] = time.monotonic,
                 runner: Callable[[Sequence[str]], None] | None = None,
                 switchover_wait_s: float = SWITCHOVER_WAIT_S) -> None:
        self.s = settings
        self.caller = caller
        self.clock = clock
        self.switchover_wait_s = switchover_wait_s
        self.runner = runner or _run
        self.failures = 0
        self.locked_until = 0.0

    # ------------------------------------------------------------ what is shown

    def status(self) -> dict[str, Any]:
        """The STATUS frame's body: short fields the panel's home screen draws."""
        cfg = None
        try:
            cfg = self.s.store.load().config
        except ConfigStoreError as e:
            log.warning("panel: cannot read the config: %s", e)
        out: dict[str, Any] = {
            "name": _short(cfg["unit.name"] if cfg else "mirrorunit"),
            "ver": __version__, "copy": _short(COPYRIGHT),
            "net": _short(_network_text(cfg)) if cfg else "",
        }
        try:
            st = read_local_status(self.caller(self.s.control, "status", timeout=3.0))
        except (ControlError, StatusShapeError) as e:
            out.update(role="-", vol="down", link="-", lag=None, fill=None, mode="",
                       ups="-", fault=_short(f"unit not running: {e}"))
            return out
        if "ups" not in st and self.s.ups_control:
            try:
                st["ups"] = read_ups_report(
                    self.caller(self.s.ups_control, "status", timeout=3.0))
            except (ControlError, StatusShapeError):
                pass  # shown as no UPS
        vol, q = st["volume"], st["cbq"]
        peers = list(links(st))
        link_state, lag, link_error = "none", None, ""  # type: str, float | None, str
        if peers:
            _, first = peers[0]
            link_state = _short(first["state"])
            lag = first["lag_seconds"]
            link_error = first["last_error"] or ""
        ups = st.get("ups")
        ups_text = _short(ups["status"]) if ups is not None else "none"
        faults = []
        if vol["state"] == "offline":
            faults.append("volume offline")
        if any(c["needs_resync"] for n, c in q["consumers"].items() if not n.startswith("@")):
            faults.append("needs resync")
        if link_error:
            faults.append(f"link: {link_error}")
        if ups is not None and "OB" in ups["status"].split():
            faults.append(f"ups {ups['status']}")
        out.update(role=_short(st["role"]), vol=_short(vol["state"]), link=link_state,
                   lag=None if lag is None else round(lag, 1), fill=round(q["fill"], 3),
                   mode=_short(q["mode"]), ups=ups_text, fault=_short("; ".join(faults)))
        return out

    # ------------------------------------------------------------ what is done

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """A REQUEST frame's body -> the REPLY frame's body (never raises for bad input)."""
        rid = req.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return {"id": None, "ok": False, "msg": "request without an id"}
        op, args, pin = req.get("op"), req.get("args", {}), req.get("pin")
        try:
            if not isinstance(op, str) or op not in OPERATIONS:
                raise Refused(f"unknown operation {str(op)[:20]!r}")
            if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
                raise Refused("bad arguments")
            method, needs_password = OPERATIONS[op]
            try:
                inspect.signature(method).bind(self, **args)
            except TypeError as e:
                raise Refused(f"bad arguments: {e}") from e
            if needs_password:
                self._check_password(pin)
            result = method(self, **args)
        except Refused as e:
            log.info("panel: %s refused: %s", op, e)
            return {"id": rid, "ok": False, "msg": str(e)[:MAX_FIELD * 2]}
        log.info("panel: %s done", op)
        if isinstance(result, list):
            return {"id": rid, "ok": True, "msg": "", "data": result}
        return {"id": rid, "ok": True, "msg": result}

    def _check_password(self, pin: Any) -> None:
        now = self.clock()
        if now < self.locked_until:
            raise Refused(f"locked for {self.locked_until - now:.0f} s after wrong passwords")
        try:
            cfg = self.s.store.load().config
        except ConfigStoreError as e:
            raise Refused(f"config unreadable: {e}") from e
        if cfg is None or not cfg["admin.password_hash"]:
            raise Refused("no admin password set: set one at the console first")
        ok = isinstance(pin, str) and len(pin) <= MAX_PASSWORD_LENGTH and \
            check_admin_password(cfg, pin)
        if ok:
            self.failures = 0
            return
        self.failures += 1
        log.warning("panel: wrong admin password (%d in a row)", self.failures)
        if self.failures >= FREE_ATTEMPTS:
            extra = self.failures - FREE_ATTEMPTS
            self.locked_until = now + min(LOCKOUT_MAX_S, LOCKOUT_S * (2 ** min(extra, 10)))
        raise Refused("wrong password: nothing changed")

    def _unit(self, op: str, **args: Any) -> Any:
        try:
            return self.caller(self.s.control, op, timeout=60.0, **args)
        except ControlError as e:
            raise Refused(str(e)) from e

    def fingerprint(self) -> list[str]:
        fp = self.s.fingerprint
        if not fp:
            raise Refused("this unit has no certificate yet")
        return ["Fingerprint"] + [fp[i:i + 16] for i in range(0, len(fp), 16)]

    def standby(self) -> str:
        return f"Volume is {self._unit('volume.set_state', state='standby')}."

    def promote(self) -> str:
        return f"Volume is {self._unit('volume.set_state', state='ready')}."

    def switchover(self) -> str:
        """A planned role reversal with the unit's remote (docs/failover.md), the same
        `link.switchover` as `mirrorunit role switchover`: from the primary the queue is
        drained (at most `switchover_wait_s`), the remote is promoted at the drained seq
        and this unit becomes its standby; from the standby the unit takes the remote's
        changes back and is the primary again."""
        peers = self._peers()
        if not peers:
            raise Refused("no peer to hand the volume to")
        name = sorted(peers)[0]
        if "link" not in self._unit("status"):
            raise Refused("the unit runs no link: nothing to switch over")
        try:
            r = self.caller(self.s.control, "link.switchover", timeout=24 * 3600.0,
                            name=name, drain_timeout=self.switchover_wait_s)
        except ControlError as e:
            raise Refused(str(e)) from e
        if r["direction"] == "to-remote":
            return f"{name} is the primary from seq {r['seq']}; this unit is its standby."
        return f"Primary again: {r['chunks_moved']} chunks taken back from {name}."

    def _peers(self) -> dict[str, dict[str, Any]]:
        consumers = (self._unit("status").get("cbq") or {}).get("consumers") or {}
        return {str(k): v for k, v in consumers.items()
                if not str(k).startswith("@") and isinstance(v, dict)}

    def shutdown(self) -> str:
        seconds = self._unit("volume.flush")
        try:
            self.runner(self.s.poweroff)
        except (OSError, subprocess.SubprocessError) as e:
            raise Refused(f"flushed, but {' '.join(self.s.poweroff)} failed: {e}") from e
        return f"Flushed in {float(seconds):.2f} s; powering off."

    def network(self, mode: str, address: str = "", prefix: int = 0) -> str:
        texts = {"network.mode": str(mode)}
        if mode == "static":
            texts["network.address"] = str(address)
            texts["network.netmask"] = str(prefix)
        try:
            changes = {k: SCHEMA[k].type.parse(k, v) for k, v in texts.items()}
            result = self.s.store.update(changes)
        except (ConfigError, ConfigStoreError) as e:
            raise Refused(f"{e}") from e
        report = apply_live(result.diff, result.config, self.s.control,
                            network=self.s.apply_network)
        if report.errors:
            raise Refused(f"saved, not applied: {report.errors[0][1]}")
        applied = bool(report.applied) and not report.restart
        return (f"Saved (gen {result.generation}); "
                + ("applied." if applied else "applies at next boot."))


def _network_text(cfg: Any) -> str:
    if cfg["network.mode"] == "static":
        return f"static {cfg['network.address']}/{cfg['network.netmask']}"
    return "dhcp"


def _run(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, timeout=60, capture_output=True)


#: The operations a panel may ask for: method, needs the admin password.
OPERATIONS: dict[str, tuple[Callable[..., Any], bool]] = {
    "fingerprint": (PanelActions.fingerprint, False),
    "standby": (PanelActions.standby, True),
    "promote": (PanelActions.promote, True),
    "switchover": (PanelActions.switchover, True),
    "shutdown": (PanelActions.shutdown, True),
    "network": (PanelActions.network, True),
}
