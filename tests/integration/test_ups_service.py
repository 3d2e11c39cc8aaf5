"""The UPS monitor as its own process: driving a real local unit over its control
socket, config reload, an unreachable unit, the CLI, and the in-unit service."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.control import ControlError, call
from firmware.control.status import read_local_status, read_ups_report
from firmware.local import LocalSettings, LocalUnit
from firmware.ups.service import ControlVolume, UpsProcess
from firmware.volume import CacheMode
from tests.support import REPO as ROOT
from tests.support.unitproc import LocalProc
from tests.support.ups import FakeClock, FakeIna219

CACHE_LIMIT = 32 << 20


@pytest.fixture()
def unit(tmp_path: Path) -> Any:
    u = LocalUnit(LocalSettings(disk=tmp_path / "disk.img", buffer=tmp_path / "cbq.img",
                                control=tmp_path / "local.sock", size=128 << 20,
                                buffer_size=96 << 20,
                                cache_mode=CacheMode.WRITE_BACK, cache_limit=CACHE_LIMIT,
                                flush_interval=3600.0))
    u.start()
    yield u
    u.stop()


def ina_store(tmp_path: Path, grace: int = 60) -> ConfigStore:
    store = ConfigStore(StoreSettings(str(tmp_path / "config.slots")))
    store.set_many({"ups.model": "ina219", "ups.on_battery_grace_s": str(grace)})
    return store


def test_mains_loss_flushes_then_shutdown_detaches_the_real_unit(
        unit: Any, tmp_path: Path) -> None:
    chip = FakeIna219()
    chip.charging()
    clock = FakeClock()
    powered_off: list[str] = []
    synced: list[bool] = []
    proc = UpsProcess(ina_store(tmp_path), unit.settings.control, bus_factory=lambda n: chip,
                      poweroff=lambda: powered_off.append("off"), sync=lambda: synced.append(True),
                      clock=clock)
    block = bytes(range(256)) * 4096  # 1 MiB

    def fill_cache() -> int:
        # The RAM cache at its limit: the worst-case flush on mains loss.
        for i in range(CACHE_LIMIT // len(block) - 1):
            unit.volume.pwrite(i * len(block), block)
        dirty = int(unit.volume.status()["cache_bytes"])
        assert dirty >= CACHE_LIMIT - 2 * len(block)
        return dirty

    dirty = fill_cache()
    flush_s = proc.volume.flush_cache()
    assert unit.volume.status()["cache_bytes"] == 0
    print(f"\nflush of a full {dirty >> 20} MiB write cache over the control socket: "
          f"{flush_s:.3f} s")
    proc.poll()
    assert proc.status()["status"] == "OL CHRG" and proc.status()["policy"]["state"] == "on-mains"
    fill_cache()
    chip.mains_lost()
    t0 = time.monotonic()
    proc.poll()
    print("mains loss with a full cache to write-through (flush included): "
          f"{time.monotonic() - t0:.3f} s")
    st = read_local_status(call(unit.settings.control, "status"))
    assert st["volume"]["cache_mode"] == "write-through"
    assert st["volume"]["cache_bytes"] == 0
    assert read_ups_report(proc.status())["status"].startswith("OB")
    assert proc.status()["policy"]["last_flush_s"] is not None
    assert st["volume"]["state"] == "ready" and not powered_off
    clock.advance(61)
    proc.poll()
    st = call(unit.settings.control, "status")
    assert st["volume"]["state"] == "offline"
    assert powered_off == ["off"] and synced == [True]
    steps = [e["step"] for e in proc.status()["events"]]
    assert steps == ["write-through", "cache-flushed", "shutdown", "detached", "final-flush",
                     "synced", "poweroff"]
    # Every acknowledged write is on the mirror.
    assert unit.mirror.pread(0, len(block)) == block


def test_mains_back_restores_write_back_and_config_reload(unit: Any, tmp_path: Path) -> None:
    chip = FakeIna219()
    chip.charging()
    clock = FakeClock()
    store = ina_store(tmp_path, grace=60)
    proc = UpsProcess(store, unit.settings.control, bus_factory=lambda n: chip,
                      poweroff=lambda: None, sync=lambda: None, clock=clock)
    chip.mains_lost()
    proc.poll()
    assert call(unit.settings.control, "status")["volume"]["cache_mode"] == "write-through"
    chip.charging()
    proc.poll()
    assert call(unit.settings.control, "status")["volume"]["cache_mode"] == "write-back"
    # A live change of the grace period reaches the policy at the next poll.
    store.set("ups.on_battery_grace_s", "5")
    chip.mains_lost()
    proc.poll()
    assert proc.monitor.policy.settings.on_battery_grace_s == 5.0
    clock.advance(6)
    proc.poll()
    assert proc.monitor.policy.state.value == "off"


def test_unreachable_unit_is_retried(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    vol = ControlVolume(sock, timeout=1.0)
    assert vol.cache_mode is CacheMode.WRITE_THROUGH  # last known, unit absent
    vol.cache_mode = CacheMode.WRITE_THROUGH
    assert not vol.retry_pending()
    with pytest.raises(ControlError):
        vol.flush_cache()
    u = LocalUnit(LocalSettings(disk=tmp_path / "d.img", buffer=tmp_path / "b.img",
                                control=sock, size=8 << 20, buffer_size=8 << 20,
                                cache_mode=CacheMode.WRITE_BACK))
    u.start()
    try:
        assert vol.retry_pending()
        assert u.volume.cache_mode is CacheMode.WRITE_THROUGH
        assert vol.cache_mode is CacheMode.WRITE_THROUGH
        assert vol.flush_cache() >= 0
    finally:
        u.stop()


def test_ups_process_and_status_command(tmp_path: Path) -> None:
    cfg = tmp_path / "config.slots"
    ConfigStore(StoreSettings(str(cfg))).set("ups.on_battery_grace_s", "30")
    ups_sock = tmp_path / "ups.sock"
    log = open(tmp_path / "ups.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "firmware", "ups", "--control",
                          str(tmp_path / "local.sock"), "--config", str(cfg), "--ups-control",
                          str(ups_sock), "--interval", "0.2", "--poweroff-command", "true"],
                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if call(ups_sock, "status")["polls"] >= 1:
                    break
            except ControlError:
                pass
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polling for readiness
        r = subprocess.run([sys.executable, "-m", "firmware", "ups", "status", "--ups-control",
                            str(ups_sock)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("UPS none: OL") and "policy on-mains" in r.stdout
        r = subprocess.run([sys.executable, "-m", "firmware", "ups", "status", "--json",
                            "--ups-control", str(ups_sock)], cwd=ROOT, capture_output=True,
                           text=True)
        assert json.loads(r.stdout)["policy"]["grace_s"] == 30.0
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0
    assert not ups_sock.exists()


def test_ups_service_inside_the_local_unit(tmp_path: Path) -> None:
    cfg = tmp_path / "config.slots"
    ConfigStore(StoreSettings(str(cfg))).set("ups.low_battery_percent", "25")
    proc = LocalProc(tmp_path, size="8M", buffer_size="8M",
                     extra=("--ups-config", str(cfg), "--ups-poweroff-command", "true"))
    proc.start()
    try:
        st = proc.call("status")
        assert st["ups"]["model"] == "none" and st["ups"]["status"] in ("OL", "UNKNOWN")
        assert proc.call("ups.status")["policy"]["state"] == "on-mains"
    finally:
        proc.stop()
