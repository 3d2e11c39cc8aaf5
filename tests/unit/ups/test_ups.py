"""UPS monitor: register-level chip fakes, GPIO debounce, the power-loss policy, and an
end-to-end power cut against a real volume."""

from __future__ import annotations

import logging
import random
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from firmware.blockdev import DeviceState, MediumError, NotReady
from firmware.cbq import CircularBufferQueue, create
from firmware.config import Config
from firmware.storage import CrashSimStorage, PowerCut, PowerRail
from firmware.ups import (
    GpioPowerInput,
    Ina219,
    Max1704x,
    NoUps,
    PolicySettings,
    PolicyState,
    RuntimeEstimator,
    StatusTracker,
    UpsDriverError,
    UpsFlag,
    UpsMonitor,
    UpsPolicy,
    UpsReading,
    build_driver,
    import_rpi_gpio,
    monitor_from_config,
)
from firmware.ups.drivers import swap16
from firmware.volume.volume import CacheMode, Volume
from tests.support.ups import FakeClock, FakeI2CChip, FakeIna219, FakeMax1704x

F = UpsFlag


def test_smbus_word_byte_order() -> None:
    chip = FakeI2CChip(0x36)
    chip.regs[0x04] = 0x5A80  # 90.5 %
    assert chip.read_word_data(0x36, 0x04) == 0x805A
    assert swap16(chip.read_word_data(0x36, 0x04)) == 0x5A80


# ------------------------------------------------------------------ INA219


def tracker(clock: Callable[[], float], low: float = 20.0) -> StatusTracker:
    return StatusTracker(low, clock)


def test_ina219_programs_config_and_calibration() -> None:
    chip = FakeIna219()
    drv = Ina219(chip)
    assert chip.regs[0x00] == Ina219.CONFIG == 0x3EEF
    assert chip.regs[0x05] == drv.calibration
    # 0.04096 / (5 A / 32768 * 0.01 ohm)
    assert drv.calibration == int(0.04096 / (5.0 / 32768 * 0.01)) & 0xFFFE


def test_ina219_through_the_states() -> None:
    clock = FakeClock()
    chip = FakeIna219()
    drv = Ina219(chip)
    tr = tracker(clock)

    chip.charging(volts=7.9, amps=0.8)
    r = drv.read()
    assert r.voltage == pytest.approx(7.9, abs=0.004)
    assert r.current == pytest.approx(0.8, abs=0.001)
    assert r.charge_percent == pytest.approx((7.9 - 6.0) / 2.4 * 100, abs=0.2)
    assert tr.update(r).flags == {F.OL, F.CHRG}

    chip.charging(volts=8.35, amps=0.0)  # full, charger idle
    assert tr.update(drv.read()).flags == {F.OL}

    chip.mains_lost(volts=7.6, amps=-1.2)
    r = drv.read()
    assert r.current == pytest.approx(-1.2, abs=0.001) and r.on_battery
    st = tr.update(r)
    assert st.flags == {F.OB, F.DISCHRG} and st.nut() == "OB DISCHRG"

    # A small discharge that would not start OB keeps it once on battery (hysteresis).
    chip.mains_lost(volts=7.5, amps=-0.04)
    assert tr.update(drv.read()).flags == {F.OB, F.DISCHRG}

    chip.mains_lost(volts=6.4, amps=-1.3)  # (6.4 - 6.0) / 2.4 = 16.7 %
    st = tr.update(drv.read())
    assert st.flags == {F.OB, F.DISCHRG, F.LB} and st.nut() == "OB LB DISCHRG"

    chip.charging(volts=7.0, amps=1.0)  # mains back
    st = tr.update(drv.read())
    assert st.flags == {F.OL, F.CHRG}
    chip.charging(volts=7.0, amps=-0.01)  # below the threshold: still on line
    assert tr.update(drv.read()).on_line


def test_ina219_brownout_reset_is_recovered() -> None:
    clock = FakeClock()
    chip = FakeIna219()
    drv = Ina219(chip)
    tr = tracker(clock)
    chip.mains_lost()
    assert tr.update(drv.read()).on_battery
    chip.reset()  # the chip lost its calibration: current would read 0
    r = drv.read()
    assert r.on_battery is None and r.current is None
    assert chip.regs[0x05] == drv.calibration
    assert tr.update(r).on_battery  # the last known line state holds
    assert drv.read().current == pytest.approx(-1.2, abs=0.001)


def test_ina219_overflow_gives_no_voltage() -> None:
    chip = FakeIna219()
    drv = Ina219(chip)
    chip.register = lambda reg: 0x0001 if reg == 0x02 else FakeIna219.register(chip, reg)  # type: ignore[method-assign]
    r = drv.read()
    assert r.voltage is None and r.charge_percent is None


# ------------------------------------------------------------------ MAX17048 / MAX17040


def test_max17048_through_the_states() -> None:
    clock = FakeClock()
    chip = FakeMax1704x("max17048")
    drv = Max1704x(chip, chip="max17048", clock=clock)
    assert drv.version == 0x0012
    tr = tracker(clock, low=20)

    chip.set(volts=4.05, soc=80.5, rate=12.0)
    r = drv.read()
    assert r.voltage == pytest.approx(4.05, abs=1e-4)
    assert r.charge_percent == pytest.approx(80.5)
    assert r.charge_rate == pytest.approx(12.0, abs=0.21)
    st = tr.update(r)
    assert st.flags == {F.OL, F.CHRG} and st.runtime_s is None

    chip.set(volts=3.8, soc=50.0, rate=-25.0)
    st = tr.update(drv.read())
    assert st.flags == {F.OB, F.DISCHRG}
    # 50 % at 25 %/h (CRATE rounds to 0.208 %/h steps)
    assert st.runtime_s == pytest.approx(50 / (round(25 / 0.208) * 0.208) * 3600)

    chip.set(volts=3.5, soc=15.25, rate=-30.0)
    st = tr.update(drv.read())
    assert st.flags == {F.OB, F.DISCHRG, F.LB}

    chip.set(volts=3.9, soc=16.0, rate=20.0)
    st = tr.update(drv.read())
    assert st.flags == {F.OL, F.CHRG, F.LB} and st.runtime_s is None


def test_max17040_uses_the_soc_trend() -> None:
    clock = FakeClock()
    chip = FakeMax1704x("max17040")
    drv = Max1704x(chip, chip="max17040", clock=clock, trend_window_s=60)
    tr = tracker(clock)
    chip.set(volts=3.9, soc=70.0)
    r = drv.read()
    assert r.voltage == pytest.approx(3.9, abs=1.25e-3) and r.charge_rate is None
    assert r.on_battery is None  # not enough history yet
    assert tr.update(r).flags == frozenset()
    soc = 70.0
    for _ in range(6):  # 36 %/h discharge, one reading every 10 s
        clock.advance(10)
        soc -= 0.1
        chip.set(volts=3.85, soc=soc)
        st = tr.update(drv.read())
    assert st.flags == {F.OB, F.DISCHRG}
    assert st.runtime_s is not None and st.runtime_s == pytest.approx(soc / 36 * 3600, rel=0.05)


def test_max17040_with_a_power_loss_input() -> None:
    clock = FakeClock()
    gpio = FakeGPIO()
    pin = GpioPowerInput(17, gpio=gpio, clock=clock, debounce_ms=0)
    chip = FakeMax1704x("max17040")
    drv = Max1704x(chip, chip="max17040", clock=clock, power_input=pin)
    assert drv.read().on_battery is False
    gpio.drive(17, gpio.LOW)
    assert drv.read().on_battery is True
    drv.close()
    assert chip.closed and 17 in gpio.cleaned


# ------------------------------------------------------------------ GPIO


class FakeGPIO(types.ModuleType):
    """The RPi.GPIO API surface the driver uses, with a settable pin level."""

    BCM, BOARD = 11, 10
    IN, OUT = 1, 0
    HIGH, LOW = 1, 0
    PUD_OFF, PUD_DOWN, PUD_UP = 20, 21, 22
    RISING, FALLING, BOTH = 31, 32, 33

    def __init__(self) -> None:
        super().__init__("RPi.GPIO")
        self.mode: int | None = None
        self.pull: dict[int, int] = {}
        self.level: dict[int, int] = {}
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.cleaned: list[int] = []

    def setmode(self, mode: int) -> None:
        self.mode = mode

    def setup(self, pin: int, direction: int, pull_up_down: int = PUD_OFF) -> None:
        assert self.mode == self.BCM and direction == self.IN
        self.pull[pin] = pull_up_down
        self.level.setdefault(pin, self.HIGH if pull_up_down == self.PUD_UP else self.LOW)

    def input(self, pin: int) -> int:
        return self.level[pin]

    def add_event_detect(self, pin: int, edge: int, callback: Callable[[int], None],
                         bouncetime: int | None = None) -> None:
        assert edge == self.BOTH
        self.callbacks[pin] = callback

    def remove_event_detect(self, pin: int) -> None:
        self.callbacks.pop(pin, None)

    def cleanup(self, pin: int | None = None) -> None:
        self.cleaned.append(pin if pin is not None else -1)

    def drive(self, pin: int, level: int) -> None:
        if self.level.get(pin) != level:
            self.level[pin] = level
            if pin in self.callbacks:
                self.callbacks[pin](pin)


def test_gpio_debounce_active_low() -> None:
    clock = FakeClock()
    gpio = FakeGPIO()
    edges: list[int] = []
    pin = GpioPowerInput(6, active_low=True, debounce_ms=50, gpio=gpio, clock=clock,
                         on_edge=lambda: edges.append(1))
    assert gpio.pull[6] == gpio.PUD_UP
    tr = tracker(clock)
    assert tr.update(pin.read()).flags == {F.OL}

    # A 30 ms glitch is ignored.
    gpio.drive(6, gpio.LOW)
    assert pin.read().on_battery is False and pin.settling_until == pytest.approx(clock() + 0.05)
    clock.advance(0.03)
    assert pin.read().on_battery is False
    gpio.drive(6, gpio.HIGH)
    clock.advance(0.03)
    assert pin.read().on_battery is False and pin.settling_until is None

    # A real loss is accepted once it has been stable for 50 ms.
    gpio.drive(6, gpio.LOW)
    assert pin.read().on_battery is False
    clock.advance(0.048)
    assert pin.read().on_battery is False
    clock.advance(0.003)
    st = tr.update(pin.read())
    assert st.flags == {F.OB, F.DISCHRG}
    # Bouncing back during the window restarts it.
    gpio.drive(6, gpio.HIGH)
    pin.read()
    clock.advance(0.04)
    gpio.drive(6, gpio.LOW)
    gpio.drive(6, gpio.HIGH)
    assert pin.read().on_battery is True
    clock.advance(0.02)
    assert pin.read().on_battery is True  # 60 ms since the first sample, 20 since the edge
    clock.advance(0.031)
    assert pin.read().on_battery is False
    assert len(edges) == pin.edges == 6
    pin.close()
    assert 6 not in gpio.callbacks and gpio.cleaned == [6]


def test_gpio_active_high_and_lazy_import(monkeypatch: pytest.MonkeyPatch) -> None:
    gpio = FakeGPIO()
    package = types.ModuleType("RPi")
    package.GPIO = gpio  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "RPi", package)
    monkeypatch.setitem(sys.modules, "RPi.GPIO", gpio)
    cfg = Config.defaults().replace({"ups.model": "gpio", "ups.gpio_pin": 4,
                                     "ups.gpio_active_low": False, "ups.debounce_ms": 0})
    drv = build_driver(cfg)  # no gpio given: RPi.GPIO is imported now
    assert isinstance(drv, GpioPowerInput) and drv.gpio is gpio
    assert gpio.pull[4] == gpio.PUD_DOWN
    assert drv.read().on_battery is False
    gpio.drive(4, gpio.HIGH)
    assert drv.read().on_battery is True


def test_rpi_gpio_missing_is_a_driver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "RPi", None)
    monkeypatch.setitem(sys.modules, "RPi.GPIO", None)
    with pytest.raises(UpsDriverError, match="RPi.GPIO"):
        import_rpi_gpio()


def test_build_driver_from_config() -> None:
    chips: dict[int, FakeI2CChip] = {}

    def bus(n: int) -> FakeI2CChip:
        chips[n] = FakeIna219(address=0x43)
        return chips[n]

    cfg = Config.defaults().replace({"ups.model": "ina219", "ups.i2c_bus": 3,
                                     "ups.i2c_address": 0x43})
    drv = build_driver(cfg, bus_factory=bus)
    assert isinstance(drv, Ina219) and drv.address == 0x43 and 3 in chips
    cfg = Config.defaults().replace({"ups.model": "max17048"})
    drv2 = build_driver(cfg, bus_factory=lambda n: FakeMax1704x())
    assert isinstance(drv2, Max1704x) and drv2.address == 0x36 and drv2.power_input is None
    assert isinstance(build_driver(Config.defaults()), NoUps)
    assert tracker(FakeClock()).update(NoUps().read()).flags == {F.OL}


# ------------------------------------------------------------------ runtime estimate


def test_runtime_unknown_until_enough_data() -> None:
    est = RuntimeEstimator(min_span_s=30)
    assert est.update(0, 80.0, discharging=True) is None
    assert est.update(10, 79.0, discharging=True) is None  # only 10 s of data
    assert est.update(30, 77.0, discharging=True) == pytest.approx(77.0 / (3.0 / 30))
    assert est.update(40, 77.0, discharging=False) is None  # charging resets
    assert est.update(50, 77.0, discharging=True) is None
    assert est.update(90, 77.0, discharging=True) is None  # no drop seen: unknown
    assert est.update(100, 50.0, discharging=True, rate_pct_per_h=-10.0) == 5 * 3600
    assert est.update(100, None, discharging=True) is None


# ------------------------------------------------------------------ the policy


class FakeVolume:
    def __init__(self, calls: list[str], flush_s: float = 0.25,
                 mode: CacheMode = CacheMode.WRITE_BACK) -> None:
        self.calls = calls
        self.flush_s = flush_s
        self._mode = mode

    @property
    def cache_mode(self) -> CacheMode:
        return self._mode

    @cache_mode.setter
    def cache_mode(self, mode: CacheMode) -> None:
        self.calls.append(f"cache_mode={mode.value}")
        self._mode = mode

    def flush_cache(self) -> float:
        self.calls.append("flush_cache")
        return self.flush_s


def status(clock: FakeClock, *flags: UpsFlag, charge: float | None = 80.0) -> Any:
    from firmware.ups import UpsStatus
    return UpsStatus(frozenset(flags), clock(), charge)


def make_policy(clock: FakeClock, calls: list[str], grace: float = 60,
                **kw: Any) -> tuple[UpsPolicy, FakeVolume]:
    vol = FakeVolume(calls, **kw)
    policy = UpsPolicy(vol, detach=lambda: calls.append("detach"),
                       poweroff=lambda: calls.append("poweroff"),
                       settings=PolicySettings(on_battery_grace_s=grace),
                       sync=lambda: calls.append("sync"), clock=clock)
    return policy, vol


def test_policy_mains_loss_then_return(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mirrorunit.ups")
    clock, calls = FakeClock(), list[str]()
    policy, vol = make_policy(clock, calls)
    assert policy.update(status(clock, F.OL, F.CHRG)) == []
    steps = policy.update(status(clock, F.OB, F.DISCHRG))
    assert [s.step for s in steps] == ["write-through", "cache-flushed"]
    assert calls == ["cache_mode=write-through", "flush_cache"]
    assert steps[1].seconds == 0.25 and policy.last_flush_s == 0.25
    assert policy.state is PolicyState.ON_BATTERY
    clock.advance(59)
    assert policy.update(status(clock, F.OB, F.DISCHRG)) == []
    clock.advance(0.5)
    steps = policy.update(status(clock, F.OL, F.CHRG))
    assert [s.step for s in steps] == ["mains-restored"]
    assert calls[-1] == "cache_mode=write-back" and vol.cache_mode is CacheMode.WRITE_BACK
    assert policy.state is PolicyState.ON_MAINS and "detach" not in calls
    text = caplog.text
    assert "mains lost (OB DISCHRG, charge 80%); cache mode was write-back" in text
    assert "cache-flushed in 0.250 s (mains lost)" in text
    assert "after 59.5 s on battery; cache mode write-back" in text


def test_policy_grace_expiry_shuts_down_in_order() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls, grace=30)
    policy.update(status(clock, F.OB))
    calls.clear()
    clock.advance(29.9)
    assert policy.tick() == []
    clock.advance(0.1)
    steps = policy.update(status(clock, F.OB))
    assert calls == ["detach", "flush_cache", "sync", "poweroff"]
    assert [s.step for s in steps] == ["shutdown", "detached", "final-flush", "synced",
                                       "poweroff"]
    assert "30 s on battery, grace is 30 s" in steps[0].reason
    assert policy.state is PolicyState.OFF
    # Mains returning after the shutdown began changes nothing.
    assert policy.update(status(clock, F.OL)) == [] and calls[-1] == "poweroff"


def test_policy_low_battery_shuts_down_at_once() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls, grace=600)
    steps = policy.update(status(clock, F.OB, F.DISCHRG, F.LB, charge=12.0))
    assert calls == ["cache_mode=write-through", "flush_cache", "detach", "flush_cache", "sync",
                     "poweroff"]
    assert "low battery (12% <= 20%)" in steps[2].reason
    # LB while on line (charging after an outage) is no reason to stop.
    clock2, calls2 = FakeClock(), list[str]()
    policy2, _ = make_policy(clock2, calls2)
    assert policy2.update(status(clock2, F.OL, F.CHRG, F.LB, charge=10.0)) == []


def test_policy_unknown_status_keeps_the_grace_clock() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls, grace=10)
    assert policy.update(status(clock)) == []  # no flags: unknown, no action
    policy.update(status(clock, F.OB))
    clock.advance(11)
    policy.update(status(clock))  # the driver cannot be read any more
    assert calls[-1] == "poweroff"


def test_policy_failing_steps_do_not_stop_the_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mirrorunit.ups")
    clock, calls = FakeClock(), list[str]()
    vol = FakeVolume(calls, mode=CacheMode.WRITE_THROUGH)

    def bad_detach() -> None:
        calls.append("detach")
        raise RuntimeError("gadget busy")

    policy = UpsPolicy(vol, detach=bad_detach, poweroff=lambda: calls.append("poweroff"),
                       settings=PolicySettings(on_battery_grace_s=0),
                       sync=lambda: calls.append("sync"), clock=clock)
    policy.update(status(clock, F.OB))
    assert calls[-4:] == ["detach", "flush_cache", "sync", "poweroff"]
    assert any(r.levelno == logging.ERROR and "gadget busy" in r.getMessage()
               for r in caplog.records)
    assert policy.events[3].step == "detached" and policy.events[3].ok is False


def test_policy_restores_write_through() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, vol = make_policy(clock, calls, mode=CacheMode.WRITE_THROUGH)
    policy.update(status(clock, F.OB))
    policy.update(status(clock, F.OL))
    assert vol.cache_mode is CacheMode.WRITE_THROUGH


# ------------------------------------------------------------------ the monitor


class ScriptedDriver:
    name = "scripted"

    def __init__(self, readings: Sequence[UpsReading | Exception]) -> None:
        self.readings = readings
        self.reads = 0
        self.closed = False

    def read(self) -> UpsReading:
        item = self.readings[min(self.reads, len(self.readings) - 1)]
        self.reads += 1
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


def test_monitor_status_and_read_errors(caplog: pytest.LogCaptureFixture) -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls, grace=100)
    drv = ScriptedDriver([UpsReading(on_battery=False, charging=True, charge_percent=90.0),
                          UpsReading(on_battery=True, discharging=True, charge_percent=89.0),
                          OSError(121, "Remote I/O error"), OSError(121, "Remote I/O error"),
                          UpsReading(on_battery=True, discharging=True, charge_percent=88.0)])
    mon = UpsMonitor(drv, policy, interval=1.0)
    assert mon.status()["status"] == "UNKNOWN"
    assert mon.poll_once().flags == {F.OL, F.CHRG}
    mon.poll_once()
    assert policy.state is PolicyState.ON_BATTERY
    st = mon.poll_once()
    assert st.on_battery and st.error == "scripted: [Errno 121] Remote I/O error"
    mon.poll_once()
    assert sum("cannot read" in r.getMessage() for r in caplog.records) == 1
    clock.advance(40)
    mon.poll_once()
    s = mon.status()
    assert s["model"] == "scripted" and s["status"] == "OB DISCHRG" and s["polls"] == 5
    assert s["runtime"] == "unknown" and s["charge_percent"] == 88.0 and s["error"] is None
    assert s["policy"]["state"] == "on-battery" and s["policy"]["last_flush_s"] == 0.25
    assert s["policy"]["shutdown_in_s"] == pytest.approx(60)
    mon.close()
    assert drv.closed


def test_monitor_loop_ends_after_poweroff() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls, grace=5)
    drv = ScriptedDriver([UpsReading(on_battery=False)] * 3 + [UpsReading(on_battery=True)])

    class TickingDriver(ScriptedDriver):
        def read(self) -> UpsReading:
            clock.advance(2)  # every poll takes the fake clock two seconds on
            return super().read()

    mon = UpsMonitor(TickingDriver(drv.readings), policy, interval=0.0)
    mon.run(threading.Event())  # returns by itself once the unit is powered off
    assert calls[-1] == "poweroff" and policy.state is PolicyState.OFF
    # Three polls on line; OB seen at t0, t0+2, t0+4 (inside the grace), t0+6 shuts down.
    assert mon.polls == 7
    assert policy.events[2].reason == "6 s on battery, grace is 5 s"


def test_monitor_thread_start_stop_and_poke() -> None:
    clock, calls = FakeClock(), list[str]()
    policy, _ = make_policy(clock, calls)
    polled = threading.Event()

    class Signalling(ScriptedDriver):
        def read(self) -> UpsReading:
            r = super().read()
            if self.reads >= 2:
                polled.set()
            return r

    mon = UpsMonitor(Signalling([UpsReading(on_battery=False)]), policy, interval=60.0)
    mon.start()
    mon.poke()  # without the poke the second poll would come a minute later
    assert polled.wait(10)
    mon.stop()
    assert mon._thread is None and policy.state is PolicyState.ON_MAINS


def test_monitor_from_config_with_gpio_edges() -> None:
    clock, calls = FakeClock(), list[str]()
    gpio = FakeGPIO()
    cfg = Config.defaults().replace({"ups.model": "gpio", "ups.gpio_pin": 26,
                                     "ups.debounce_ms": 20, "ups.on_battery_grace_s": 5})
    vol = FakeVolume(calls)
    mon = monitor_from_config(cfg, vol, detach=lambda: calls.append("detach"),
                              poweroff=lambda: calls.append("poweroff"),
                              sync=lambda: calls.append("sync"), clock=clock, gpio=gpio)
    assert mon.policy.settings.on_battery_grace_s == 5
    mon.poll_once()
    gpio.drive(26, gpio.LOW)
    assert mon._wake.is_set()  # the edge wakes the loop...
    assert mon.poll_once().on_line  # ...which samples the pin, not yet settled,
    assert mon._next_wait(clock()) == pytest.approx(0.02)  # and comes back when it is
    clock.advance(0.021)
    mon.poll_once()
    assert calls == ["cache_mode=write-through", "flush_cache"]


# ------------------------------------------------------------------ end to end


BS = 512
VOLUME_BLOCKS = 2048


def open_volume(cbq_st: CrashSimStorage, mirror_st: CrashSimStorage,
                mode: CacheMode = CacheMode.WRITE_BACK) -> Volume:
    return Volume(mirror_st, CircularBufferQueue(cbq_st), cache_mode=mode)


def fresh_storages(rail: PowerRail | None = None) -> tuple[CrashSimStorage, CrashSimStorage]:
    rail = rail or PowerRail()
    cbq_st = CrashSimStorage(16 << 20, rail=rail)
    mirror_st = CrashSimStorage(VOLUME_BLOCKS * BS, rail=rail)
    create(cbq_st, volume_blocks=VOLUME_BLOCKS, consumers=("peer",))
    return cbq_st, mirror_st


def reopen(cbq_st: CrashSimStorage, mirror_st: CrashSimStorage,
           rng: random.Random | None) -> bytes:
    cbq_img = cbq_st.crash_image(rng)
    mirror_img = mirror_st.crash_image(rng)
    vol = open_volume(CrashSimStorage.from_image(bytes(cbq_img)),
                      CrashSimStorage.from_image(bytes(mirror_img)))
    return vol.pread(0, VOLUME_BLOCKS * BS)


def test_write_back_without_ups_flush_loses_acknowledged_writes() -> None:
    """The hazard the UPS policy exists for, shown on the same setup as below."""
    cbq_st, mirror_st = fresh_storages()
    vol = open_volume(cbq_st, mirror_st)
    expected = bytearray(VOLUME_BLOCKS * BS)
    for i in range(20):
        data = bytes([i + 1]) * BS
        vol.pwrite(i * BS, data)
        expected[i * BS:(i + 1) * BS] = data
    assert vol.pread(0, len(expected)) == bytes(expected)
    assert reopen(cbq_st, mirror_st, None) != bytes(expected)


@pytest.mark.parametrize("seed", range(4))
def test_power_cut_after_the_flush_deadline_keeps_every_acknowledged_write(
        seed: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mirrorunit.ups")
    rail = PowerRail()
    cbq_st, mirror_st = fresh_storages(rail)
    vol = open_volume(cbq_st, mirror_st, CacheMode.WRITE_BACK)
    clock = FakeClock()
    chip = FakeIna219()
    chip.charging()
    hooks: list[str] = []

    def detach() -> None:
        hooks.append("detach")
        vol.set_state(DeviceState.OFFLINE)

    def poweroff() -> None:
        hooks.append("poweroff")
        rail.dead = True  # the battery is cut off: both disks lose power together

    policy = UpsPolicy(vol, detach=detach, poweroff=poweroff,
                       settings=PolicySettings(on_battery_grace_s=30, low_battery_percent=10),
                       sync=lambda: hooks.append("sync"), clock=clock)
    mon = UpsMonitor(Ina219(chip), policy, interval=1.0)
    assert mon.poll_once().flags == {F.OL, F.CHRG}

    expected = bytearray(VOLUME_BLOCKS * BS)
    acked = 0
    milestones = {200: threading.Event(), 300: threading.Event()}
    refused = threading.Event()
    rng = random.Random(seed)
    writes = [(rng.randrange(VOLUME_BLOCKS - 8), rng.randrange(1, 8)) for _ in range(1500)]

    in_flight: list[tuple[int, bytes]] = []

    def writer() -> None:
        nonlocal acked
        for n, (lbn, nblocks) in enumerate(writes):
            data = bytes([(n % 251) + 1]) * (nblocks * BS - 2) + n.to_bytes(2, "little")
            try:
                vol.pwrite(lbn * BS, data)
            except NotReady:
                refused.set()
                return
            except (PowerCut, MediumError):
                # It passed the state check before the detach and was cut with the power.
                in_flight.append((lbn * BS, data))
                refused.set()
                return
            # Acknowledged: the host may now rely on it.
            expected[lbn * BS:(lbn + nblocks) * BS] = data
            acked = n + 1
            if acked in milestones:
                milestones[acked].set()

    t = threading.Thread(target=writer)
    t.start()
    assert milestones[200].wait(60)
    # Acknowledged writes sit in RAM only: the cut would lose them without the policy.
    assert vol.status()["cache_bytes"] > 0
    chip.mains_lost()
    st = mon.poll_once()  # flushes and switches to write-through while writes go on
    assert st.flags == {F.OB, F.DISCHRG}
    assert vol.cache_mode is CacheMode.WRITE_THROUGH
    assert milestones[300].wait(60)
    clock.advance(30)
    mon.poll_once()  # grace over: detach, final flush, sync, poweroff
    t.join(60)
    assert not t.is_alive()
    assert hooks == ["detach", "sync", "poweroff"] and policy.state is PolicyState.OFF
    assert acked >= 300 and (refused.is_set() or acked == len(writes))
    assert policy.last_flush_s is not None and policy.last_flush_s >= 0
    flushes = [e for e in policy.events if e.step in ("cache-flushed", "final-flush")]
    assert len(flushes) == 2 and all(e.ok and e.seconds is not None for e in flushes)
    print(f"seed {seed}: {acked} writes acknowledged; flush on mains loss "
          f"{flushes[0].seconds:.4f} s, final flush {flushes[1].seconds:.4f} s")

    # Power is cut now: whatever the disks' volatile caches held may be lost or torn.
    allowed = {bytes(expected)}
    for off, data in in_flight:  # never acknowledged: old or new contents are both fine
        new = bytearray(expected)
        new[off:off + len(data)] = data
        allowed.add(bytes(new))
    for cut_seed in range(3):
        image = reopen(cbq_st, mirror_st, random.Random(seed * 100 + cut_seed))
        assert image in allowed
    assert "cache-flushed" in caplog.text and "final-flush" in caplog.text


@pytest.mark.parametrize("seed", range(6))
def test_power_cut_at_any_moment_on_battery_keeps_acknowledged_writes(seed: int) -> None:
    """Once the policy has flushed on mains loss, an abrupt cut loses no acknowledged write."""
    rail = PowerRail()
    cbq_st, mirror_st = fresh_storages(rail)
    vol = open_volume(cbq_st, mirror_st, CacheMode.WRITE_BACK)
    clock = FakeClock()
    chip = FakeIna219()
    policy = UpsPolicy(vol, detach=lambda: None, poweroff=lambda: None,
                       settings=PolicySettings(on_battery_grace_s=300), sync=lambda: None,
                       clock=clock)
    mon = UpsMonitor(Ina219(chip), policy)
    rng = random.Random(seed)
    expected = bytearray(VOLUME_BLOCKS * BS)
    for _ in range(150):  # acknowledged from RAM while mains is present
        lbn, nblocks = rng.randrange(VOLUME_BLOCKS - 8), rng.randrange(1, 8)
        data = rng.randbytes(nblocks * BS)
        vol.pwrite(lbn * BS, data)
        expected[lbn * BS:(lbn + nblocks) * BS] = data
    chip.mains_lost()
    assert mon.poll_once().on_battery and vol.cache_mode is CacheMode.WRITE_THROUGH
    # Cut at a random write boundary of the write-through traffic that follows.
    rail.cut_after_writes = rail.ops + rng.randrange(1, 200)
    in_flight: tuple[int, bytes] | None = None
    while in_flight is None:
        lbn, nblocks = rng.randrange(VOLUME_BLOCKS - 8), rng.randrange(1, 8)
        data = rng.randbytes(nblocks * BS)
        try:
            vol.pwrite(lbn * BS, data)
        except (PowerCut, MediumError):
            in_flight = (lbn * BS, data)
            break
        expected[lbn * BS:(lbn + nblocks) * BS] = data
    for cut_seed in range(3):
        image = reopen(cbq_st, mirror_st, random.Random(seed * 10 + cut_seed))
        off, data = in_flight
        # The write that was cut was never acknowledged: old or new contents are both fine.
        new = bytearray(expected)
        new[off:off + len(data)] = data
        assert image in (bytes(expected), bytes(new))
