"""What the panel may do (firmware/panel/actions.py): the console's password check,
a lockout after wrong passwords, only the named operations, and the status summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.control import ControlError
from firmware.panel.actions import FREE_ATTEMPTS, LOCKOUT_S, ActionSettings, PanelActions
from tests.support.status import consumer, local_status, peer

PASSWORD = "7302951846"


class FakeUnit:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.up = True
        self.consumers: dict[str, Any] = {"r1": consumer(needs_resync=True)}
        self.switchover_refusal = ""
        self.no_link = False

    def __call__(self, path: str, op: str, timeout: float = 0, **args: Any) -> Any:
        if not self.up:
            raise ControlError(f"cannot reach the unit at {path}: Connection refused")
        self.calls.append((op, args))
        if op == "status":
            st = local_status(fill=0.25, peers={"r1": peer("connected")},
                              ups_flags="OB DISCHRG")
            st["volume"]["state"] = "ready"
            st["cbq"]["consumers"] = self.consumers
            assert "link" in st
            st["link"]["peers"]["r1"]["lag_seconds"] = 1.25
            if self.no_link:
                del st["link"]
            return st
        if op == "volume.set_state":
            return args["state"]
        if op == "volume.flush":
            return 0.01
        if op == "link.switchover":
            if self.switchover_refusal:
                raise ControlError(self.switchover_refusal)
            return {"direction": "to-remote", "seq": 42}
        raise ControlError(f"unknown operation {op!r}")


@pytest.fixture()
def rig(tmp_path: Path) -> tuple[PanelActions, FakeUnit, list[float]]:
    store = ConfigStore(StoreSettings(str(tmp_path / "cfg")))
    store.set_admin_password(PASSWORD)
    unit = FakeUnit()
    now = [1000.0]
    actions = PanelActions(ActionSettings(control="unit.sock", store=store,
                                          fingerprint="ab" * 32),
                           caller=unit, clock=lambda: now[0],
                           switchover_wait_s=5.0)
    return actions, unit, now


def test_standby_needs_the_admin_password(rig: Any) -> None:
    actions, unit, _ = rig
    r = actions.handle({"id": 1, "op": "standby", "args": {}, "pin": "wrong-password"})
    assert r == {"id": 1, "ok": False, "msg": "wrong password: nothing changed"}
    r = actions.handle({"id": 2, "op": "standby", "args": {}})
    assert not r["ok"] and "wrong password" in r["msg"]
    assert not [c for c in unit.calls if c[0] != "status"]
    r = actions.handle({"id": 3, "op": "standby", "args": {}, "pin": PASSWORD})
    assert r == {"id": 3, "ok": True, "msg": "Volume is standby."}
    assert unit.calls[-1] == ("volume.set_state", {"state": "standby"})


def test_wrong_passwords_lock_the_panel_out_for_a_while(rig: Any) -> None:
    actions, unit, now = rig
    for i in range(FREE_ATTEMPTS):
        r = actions.handle({"id": i, "op": "promote", "args": {}, "pin": "nope-nope-1"})
        assert "wrong password" in r["msg"]
    # locked: even the right password is refused until the lockout ends
    r = actions.handle({"id": 9, "op": "promote", "args": {}, "pin": PASSWORD})
    assert not r["ok"] and "locked for 30 s" in r["msg"]
    now[0] += LOCKOUT_S + 1
    r = actions.handle({"id": 10, "op": "promote", "args": {}, "pin": PASSWORD})
    assert r["ok"] and r["msg"] == "Volume is ready."


@pytest.mark.parametrize("req, msg", [
    ({"op": "standby"}, "request without an id"),
    ({"id": True, "op": "standby"}, "request without an id"),
    ({"id": 1, "op": "volume.discard"}, "unknown operation 'volume.discard'"),
    ({"id": 1, "op": "standby", "args": [1]}, "bad arguments"),
    ({"id": 1, "op": "network", "args": {"mode": "dhcp", "evil": 1}, "pin": PASSWORD},
     "bad arguments"),
])
def test_malformed_requests_are_refused_before_the_password(rig: Any, req: dict[str, Any],
                                                            msg: str) -> None:
    actions, unit, _ = rig
    r = actions.handle(req)
    assert not r["ok"] and msg in r["msg"]
    assert actions.failures == 0


def test_network_goes_through_the_config_schema(rig: Any) -> None:
    actions, _, _ = rig
    r = actions.handle({"id": 1, "op": "network", "pin": PASSWORD,
                        "args": {"mode": "static", "address": "10.0.0.300", "prefix": 24}})
    assert not r["ok"] and "network.address" in r["msg"]
    r = actions.handle({"id": 2, "op": "network", "pin": PASSWORD,
                        "args": {"mode": "static", "address": "10.0.0.3", "prefix": 24}})
    assert r["ok"] and r["msg"].startswith("Saved (gen ")
    cfg = actions.s.store.load().config
    assert (cfg["network.mode"], cfg["network.address"]) == ("static", "10.0.0.3")


def test_fingerprint_needs_no_password_and_fits_the_screen(rig: Any) -> None:
    actions, _, _ = rig
    r = actions.handle({"id": 1, "op": "fingerprint", "args": {}})
    assert r["ok"] and r["data"] == ["Fingerprint"] + ["ab" * 8] * 4


def test_status_summary_names_the_faults(rig: Any) -> None:
    actions, unit, _ = rig
    st = actions.status()
    assert st["name"] == "mirrorunit" and st["role"] == "local" and st["vol"] == "ready"
    assert (st["link"], st["lag"], st["fill"], st["mode"]) == ("connected", 1.2, 0.25,
                                                               "normal")
    assert st["ups"] == "OB DISCHRG"
    assert st["fault"] == "needs resync; ups OB DISCHRG"
    unit.up = False
    st = actions.status()
    assert st["vol"] == "down" and st["fault"].startswith("unit not running")


def _states(unit: FakeUnit) -> list[str]:
    return [a["state"] for op, a in unit.calls if op == "volume.set_state"]


def test_switchover_goes_through_the_units_link_switchover(rig: Any) -> None:
    actions, unit, _ = rig
    unit.consumers.clear()
    r = actions.handle({"id": 1, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert r["msg"] == "no peer to hand the volume to"
    unit.consumers.update({"@mirror": consumer(), "r1": consumer()})
    r = actions.handle({"id": 2, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert r == {"id": 2, "ok": True,
                 "msg": "r1 is the primary from seq 42; this unit is its standby."}
    assert unit.calls[-1] == ("link.switchover", {"name": "r1", "drain_timeout": 5.0})
    unit.no_link = True
    r = actions.handle({"id": 4, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert r["msg"] == "the unit runs no link: nothing to switch over"
    unit.no_link = False
    unit.switchover_refusal = "remote r1 did not take the queue up to seq 9 within 5 s"
    r = actions.handle({"id": 3, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert not r["ok"] and "did not take the queue" in r["msg"]
