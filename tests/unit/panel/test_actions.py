"""What the panel may do (firmware/panel/actions.py): the console's password check,
a lockout after wrong passwords, only the named operations, and the status summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.control import ControlError
from firmware.panel.actions import FREE_ATTEMPTS, LOCKOUT_S, ActionSettings, PanelActions

PASSWORD = "0123456789"


class FakeUnit:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.up = True
        self.consumers: dict[str, Any] = {"r1": {"needs_resync": True}}

    def __call__(self, path: str, op: str, timeout: float = 0, **args: Any) -> Any:
        if not self.up:
            raise ControlError(f"cannot reach the unit at {path}: Connection refused")
        self.calls.append((op, args))
        if op == "status":
            return {"role": "local", "volume": {"state": "ready"},
                    "cbq": {"fill": 0.25, "mode": "normal", "consumers": self.consumers},
                    "link": {"peers": {"r1": {"state": "up", "lag_seconds": 1.25}}},
                    "ups": {"status": "on_battery"}}
        if op == "volume.set_state":
            return args["state"]
        if op == "volume.flush":
            return 0.01
        raise ControlError(f"unknown operation {op!r}")


@pytest.fixture()
def rig(tmp_path: Path) -> tuple[PanelActions, FakeUnit, list[float]]:
    store = ConfigStore(StoreSettings(str(tmp_path / "cfg")))
    store.set_admin_password(PASSWORD)
    unit = FakeUnit()
    now = [1000.0]
    def sleep(s: float) -> None:
        now[0] += s
        # the peer acknowledges one more write each time the panel looks
        for c in unit.consumers.values():
            if c.get("pending_records"):
                c["pending_records"] -= 1
    actions = PanelActions(ActionSettings(control="unit.sock", store=store,
                                          fingerprint="ab" * 32),
                           caller=unit, clock=lambda: now[0], sleep=sleep,
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
    assert (st["link"], st["lag"], st["fill"], st["mode"]) == ("up", 1.2, 0.25, "normal")
    assert st["ups"] == "on_battery"
    assert st["fault"] == "needs resync; ups on_battery"
    unit.up = False
    st = actions.status()
    assert st["vol"] == "down" and st["fault"].startswith("unit not running")


def _states(unit: FakeUnit) -> list[str]:
    return [a["state"] for op, a in unit.calls if op == "volume.set_state"]


def test_switchover_waits_for_the_peer_to_have_every_write(rig: Any) -> None:
    actions, unit, now = rig
    unit.consumers.clear()
    r = actions.handle({"id": 1, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert r["msg"] == "no peer to hand the volume to" and _states(unit) == []
    unit.consumers.update({"@mirror": {"pending_records": 9}, "r1": {"pending_records": 3}})
    t0 = now[0]
    r = actions.handle({"id": 2, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert r == {"id": 2, "ok": True, "msg": "Standby; r1 has every write: promote it."}
    assert _states(unit) == ["standby"] and now[0] - t0 == 1.5
    # a peer that does not catch up in time: the volume goes back to ready
    unit.calls.clear()
    unit.consumers["r1"] = {"pending_records": 500}
    r = actions.handle({"id": 3, "op": "switchover", "args": {}, "pin": PASSWORD})
    assert not r["ok"] and r["msg"] == "r1 is 490 writes behind; volume back to ready"
    assert _states(unit) == ["standby", "ready"]
