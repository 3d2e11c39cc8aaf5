"""UPS drivers: INA219 power monitor, MAX17048/MAX17040 fuel gauges, a GPIO
power-loss input, and "none".

The I2C chips are reached through an smbus2-compatible object (tests pass
register-level fakes).  Their registers are big-endian 16-bit words while SMBus
"read word" transfers the low byte first, so every word is byte-swapped here.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Protocol

from .errors import UpsDriverError
from .status import UpsReading

log = logging.getLogger("mirrorunit.ups")


class SMBusLike(Protocol):
    def read_word_data(self, i2c_addr: int, register: int) -> int: ...

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def close(self) -> None: ...


class UpsDriver(Protocol):
    name: str

    def read(self) -> UpsReading: ...

    def close(self) -> None: ...


def swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | ((word >> 8) & 0xFF)


def read_be16(bus: SMBusLike, addr: int, reg: int) -> int:
    return swap16(bus.read_word_data(addr, reg))


def write_be16(bus: SMBusLike, addr: int, reg: int, value: int) -> None:
    bus.write_word_data(addr, reg, swap16(value & 0xFFFF))


def signed16(v: int) -> int:
    return v - 0x10000 if v & 0x8000 else v


# ------------------------------------------------------------------ none


class NoUps:
    """No UPS fitted: always on line, nothing else known."""

    name = "none"

    def read(self) -> UpsReading:
        return UpsReading(on_battery=False)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ INA219


class Ina219:
    """INA219 on the battery side of a UPS HAT (Waveshare UPS HAT style).

    The shunt sits in the battery lead: current flows into the battery while the
    charger runs from mains and out of it when mains is gone, so the sign of the
    current tells the power source; the bus voltage gives the state of charge.
    """

    name = "ina219"
    REG_CONFIG = 0x00
    REG_SHUNT_VOLTAGE = 0x01
    REG_BUS_VOLTAGE = 0x02
    REG_POWER = 0x03
    REG_CURRENT = 0x04
    REG_CALIBRATION = 0x05
    DEFAULT_ADDRESS = 0x42

    # 32 V bus range, PGA /8 (+-320 mV shunt), 12-bit x32 averaging for bus and
    # shunt, continuous shunt and bus conversion.
    CONFIG_BRNG_32V = 1 << 13
    CONFIG_PG_320MV = 0b11 << 11
    CONFIG_BADC_12BIT_32S = 0b1101 << 7
    CONFIG_SADC_12BIT_32S = 0b1101 << 3
    CONFIG_MODE_CONTINUOUS = 0b111
    CONFIG = (CONFIG_BRNG_32V | CONFIG_PG_320MV | CONFIG_BADC_12BIT_32S
              | CONFIG_SADC_12BIT_32S | CONFIG_MODE_CONTINUOUS)
    BUS_VOLTAGE_LSB = 0.004
    BUS_OVF = 0x0001

    def __init__(self, bus: SMBusLike, address: int = DEFAULT_ADDRESS, *,
                 shunt_ohms: float = 0.01, max_current_a: float = 5.0,
                 empty_v: float = 6.0, full_v: float = 8.4,
                 discharge_threshold_a: float = 0.05) -> None:
        self.bus = bus
        self.address = address
        self.shunt_ohms = shunt_ohms
        self.current_lsb = max_current_a / 32768
        # Datasheet: Cal = trunc(0.04096 / (Current_LSB * R_shunt)), bit 0 unused.
        self.calibration = int(0.04096 / (self.current_lsb * shunt_ohms)) & 0xFFFE
        self.empty_v, self.full_v = empty_v, full_v
        self.discharge_threshold_a = discharge_threshold_a
        self._on_battery = False
        self._configure()

    def _configure(self) -> None:
        write_be16(self.bus, self.address, self.REG_CONFIG, self.CONFIG)
        write_be16(self.bus, self.address, self.REG_CALIBRATION, self.calibration)

    def read(self) -> UpsReading:
        cal = read_be16(self.bus, self.address, self.REG_CALIBRATION)
        if cal != self.calibration:
            # A brown-out resets the chip to Cal = 0 and the current register then
            # reads 0; set it up again and trust the current from the next poll.
            log.warning("ups: INA219 calibration lost (0x%04x), reprogramming", cal)
            self._configure()
            voltage = self._bus_voltage()
            return UpsReading(on_battery=None, voltage=voltage,
                              charge_percent=self._charge(voltage))
        voltage = self._bus_voltage()
        current = signed16(read_be16(self.bus, self.address, self.REG_CURRENT)) * self.current_lsb
        # Hysteresis so a current hovering at the threshold does not flap the state.
        if self._on_battery:
            self._on_battery = current < -self.discharge_threshold_a / 2
        else:
            self._on_battery = current < -self.discharge_threshold_a
        return UpsReading(
            on_battery=self._on_battery,
            charging=current > self.discharge_threshold_a,
            discharging=current < -self.discharge_threshold_a,
            voltage=voltage, current=current, charge_percent=self._charge(voltage))

    def _bus_voltage(self) -> float | None:
        raw = read_be16(self.bus, self.address, self.REG_BUS_VOLTAGE)
        if raw & self.BUS_OVF:
            return None  # the math overflowed: power and current are meaningless
        return (raw >> 3) * self.BUS_VOLTAGE_LSB

    def _charge(self, voltage: float | None) -> float | None:
        if voltage is None:
            return None
        pct = (voltage - self.empty_v) / (self.full_v - self.empty_v) * 100.0
        return max(0.0, min(100.0, pct))

    def close(self) -> None:
        self.bus.close()


# ------------------------------------------------------------------ MAX17048 / MAX17040


class Max1704x:
    """MAX17048 / MAX17040 fuel gauge (ModelGauge): cell voltage and state of charge.

    A gauge cannot see mains.  When a power-loss input is given it decides OL/OB;
    otherwise the charge rate does: CRATE on the MAX17048, the SOC trend over
    `trend_window_s` on the MAX17040 (unknown until the window has filled).
    """

    REG_VCELL = 0x02
    REG_SOC = 0x04
    REG_MODE = 0x06
    REG_VERSION = 0x08
    REG_CRATE = 0x16  # MAX17048 only
    DEFAULT_ADDRESS = 0x36
    #: 78.125 uV per LSB over the whole word (the MAX17040's 1.25 mV per 12-bit count
    #: in bits 15..4 is the same scale).
    VCELL_LSB = 78.125e-6
    CRATE_LSB = 0.208  # %/hour

    def __init__(self, bus: SMBusLike, address: int = DEFAULT_ADDRESS, *,
                 chip: str = "max17048", cells: int = 1,
                 power_input: GpioPowerInput | None = None,
                 rate_threshold_pct_h: float = 2.0, trend_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if chip not in ("max17048", "max17040"):
            raise UpsDriverError(f"unknown fuel gauge {chip!r}")
        self.name = chip
        self.bus = bus
        self.address = address
        self.cells = cells
        self.power_input = power_input
        self.rate_threshold = rate_threshold_pct_h
        self.trend_window_s = trend_window_s
        self.clock = clock
        self._soc_history: deque[tuple[float, float]] = deque()
        self._on_battery = False
        self.version = read_be16(bus, address, self.REG_VERSION)
        log.info("ups: %s at 0x%02x, version 0x%04x", chip, address, self.version)

    def _rate(self, now: float, soc: float) -> float | None:
        if self.name == "max17048":
            return signed16(read_be16(self.bus, self.address, self.REG_CRATE)) * self.CRATE_LSB
        self._soc_history.append((now, soc))
        while now - self._soc_history[0][0] > self.trend_window_s:
            self._soc_history.popleft()
        t0, s0 = self._soc_history[0]
        if now - t0 < self.trend_window_s / 2:
            return None
        return (soc - s0) / (now - t0) * 3600.0

    def read(self) -> UpsReading:
        now = self.clock()
        vcell = read_be16(self.bus, self.address, self.REG_VCELL) * self.VCELL_LSB * self.cells
        soc_raw = read_be16(self.bus, self.address, self.REG_SOC)
        soc = min(100.0, soc_raw / 256.0)
        rate = self._rate(now, soc)
        charging = None if rate is None else rate > self.rate_threshold
        discharging = None if rate is None else rate < -self.rate_threshold
        if self.power_input is not None:
            on_battery = self.power_input.power_lost()
        elif discharging is None:
            on_battery = None
        else:
            # Hysteresis: leave OB only once the gauge no longer sees a real discharge.
            limit = -self.rate_threshold / 2 if self._on_battery else -self.rate_threshold
            self._on_battery = rate is not None and rate < limit
            on_battery = self._on_battery
        return UpsReading(on_battery=on_battery, charging=charging, discharging=discharging,
                          voltage=vcell, charge_percent=soc,
                          charge_rate=rate if self.name == "max17048" else None)

    def close(self) -> None:
        if self.power_input is not None:
            self.power_input.close()
        self.bus.close()


# ------------------------------------------------------------------ GPIO


def import_rpi_gpio() -> ModuleType:
    """RPi.GPIO, imported only on a board that uses it (the module fails elsewhere)."""
    try:
        return importlib.import_module("RPi.GPIO")
    except (ImportError, RuntimeError) as e:
        raise UpsDriverError(f"RPi.GPIO is not available: {e}") from e


class GpioPowerInput:
    """A power-fail input pin, debounced in software.

    RPi.GPIO's `bouncetime` drops every edge inside the window, including the
    last one of a burst, which can leave the reported level wrong; so edges
    only wake the monitor, and the level is accepted once it has been stable
    for `debounce_ms`.
    """

    name = "gpio"

    def __init__(self, pin: int, *, active_low: bool = True, debounce_ms: int = 50,
                 gpio: Any = None, clock: Callable[[], float] = time.monotonic,
                 on_edge: Callable[[], None] | None = None) -> None:
        self.gpio = gpio if gpio is not None else import_rpi_gpio()
        self.pin = pin
        self.active_low = active_low
        self.debounce_s = debounce_ms / 1000.0
        self.clock = clock
        self.on_edge = on_edge
        self._lock = threading.Lock()
        self.edges = 0
        g = self.gpio
        g.setmode(g.BCM)
        # Pull to the "mains present" level: a floating input must not shut the unit down.
        g.setup(pin, g.IN, pull_up_down=g.PUD_UP if active_low else g.PUD_DOWN)
        self._stable = self._asserted()
        self._candidate: bool | None = None
        self._candidate_since = 0.0
        self._last_edge = float("-inf")
        g.add_event_detect(pin, g.BOTH, callback=self._edge)
        log.info("ups: power-loss input on BCM %d (active %s, debounce %d ms): %s", pin,
                 "low" if active_low else "high", debounce_ms,
                 "power lost" if self._stable else "mains present")

    def _asserted(self) -> bool:
        level = self.gpio.input(self.pin)
        return (level == self.gpio.LOW) if self.active_low else (level == self.gpio.HIGH)

    def _edge(self, channel: int) -> None:
        with self._lock:
            self.edges += 1
            # A bounce between two polls is invisible to sampling; the edge restarts
            # the stability window all the same.
            self._last_edge = self.clock()
        if self.on_edge is not None:
            self.on_edge()

    def power_lost(self) -> bool:
        """The debounced state of the input."""
        with self._lock:
            now = self.clock()
            level = self._asserted()
            if level == self._stable:
                self._candidate = None
            elif self._candidate != level:
                self._candidate, self._candidate_since = level, now
            if self._candidate is not None and now - self._stable_since() >= self.debounce_s:
                self._stable, self._candidate = self._candidate, None
                log.info("ups: power-loss input settled: %s",
                         "power lost" if self._stable else "mains present")
            return self._stable

    @property
    def settling_until(self) -> float | None:
        """When a pending change will have been stable long enough (monitor re-polls then)."""
        with self._lock:
            if self._candidate is None:
                return None
            return self._stable_since() + self.debounce_s

    def _stable_since(self) -> float:
        return max(self._candidate_since, self._last_edge)

    def read(self) -> UpsReading:
        lost = self.power_lost()
        return UpsReading(on_battery=lost, discharging=lost)

    def close(self) -> None:
        self.gpio.remove_event_detect(self.pin)
        self.gpio.cleanup(self.pin)


# ------------------------------------------------------------------ from the config


def build_driver(ups: Mapping[str, Any], *,
                 bus_factory: Callable[[int], SMBusLike] | None = None,
                 gpio: Any = None, clock: Callable[[], float] = time.monotonic,
                 on_edge: Callable[[], None] | None = None) -> UpsDriver:
    """A driver for the `ups.*` fields of a Config (or any mapping with those keys)."""
    model = ups["ups.model"]

    def open_bus() -> SMBusLike:
        if bus_factory is not None:
            return bus_factory(ups["ups.i2c_bus"])
        import smbus2

        try:
            return smbus2.SMBus(ups["ups.i2c_bus"])  # type: ignore[no-any-return]
        except OSError as e:
            raise UpsDriverError(f"cannot open I2C bus {ups['ups.i2c_bus']}: {e}") from e

    def power_input() -> GpioPowerInput | None:
        if ups["ups.gpio_pin"] is None:
            return None
        return GpioPowerInput(ups["ups.gpio_pin"], active_low=ups["ups.gpio_active_low"],
                              debounce_ms=ups["ups.debounce_ms"], gpio=gpio, clock=clock,
                              on_edge=on_edge)

    if model == "none":
        return NoUps()
    if model == "ina219":
        return Ina219(open_bus(), ups["ups.i2c_address"] or Ina219.DEFAULT_ADDRESS)
    if model in ("max17048", "max17040"):
        return Max1704x(open_bus(), ups["ups.i2c_address"] or Max1704x.DEFAULT_ADDRESS,
                        chip=model, power_input=power_input(), clock=clock)
    if model == "gpio":
        pin = power_input()
        if pin is None:
            raise UpsDriverError("ups.model gpio needs ups.gpio_pin")
        return pin
    raise UpsDriverError(f"unknown UPS model {model!r}")
