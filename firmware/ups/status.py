"""NUT-style UPS status built from driver readings, with a runtime estimate."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class UpsFlag(enum.Enum):
    OL = "OL"  # on line (mains present)
    OB = "OB"  # on battery
    LB = "LB"  # low battery
    CHRG = "CHRG"
    DISCHRG = "DISCHRG"


#: NUT prints flags in this order.
_FLAG_ORDER = (UpsFlag.OL, UpsFlag.OB, UpsFlag.LB, UpsFlag.CHRG, UpsFlag.DISCHRG)


@dataclass(frozen=True)
class UpsReading:
    """What one driver poll saw; None wherever the hardware cannot tell."""

    on_battery: bool | None
    charging: bool | None = None
    discharging: bool | None = None
    voltage: float | None = None
    #: battery current in amperes, positive while charging
    current: float | None = None
    charge_percent: float | None = None
    #: %/hour from the gauge itself (MAX17048 CRATE), negative while discharging
    charge_rate: float | None = None


@dataclass(frozen=True)
class UpsStatus:
    flags: frozenset[UpsFlag]
    time: float
    charge_percent: float | None = None
    voltage: float | None = None
    current: float | None = None
    #: seconds to empty at the present discharge rate; None = unknown
    runtime_s: float | None = None
    error: str | None = None

    @property
    def on_battery(self) -> bool:
        return UpsFlag.OB in self.flags

    @property
    def on_line(self) -> bool:
        return UpsFlag.OL in self.flags

    @property
    def low_battery(self) -> bool:
        return UpsFlag.LB in self.flags

    def nut(self) -> str:
        return " ".join(f.value for f in _FLAG_ORDER if f in self.flags) or "UNKNOWN"


def rounded(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


@dataclass
class RuntimeEstimator:
    """Time to empty from the discharge rate.

    Uses the gauge's own rate when it has one; otherwise the slope of charge over
    the samples of the current discharge, once they span `min_span_s` and show a
    drop.  Until then the runtime is unknown rather than a guess.
    """

    min_span_s: float = 30.0
    window_s: float = 600.0
    _samples: deque[tuple[float, float]] = field(default_factory=deque)

    def reset(self) -> None:
        self._samples.clear()

    def update(self, now: float, charge: float | None, discharging: bool,
               rate_pct_per_h: float | None = None) -> float | None:
        if not discharging or charge is None:
            self.reset()
            return None
        if rate_pct_per_h is not None:
            return charge / -rate_pct_per_h * 3600.0 if rate_pct_per_h < 0 else None
        self._samples.append((now, charge))
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        span = now - t0
        if span < self.min_span_s or c0 <= charge:
            return None
        return charge / ((c0 - charge) / span)


class StatusTracker:
    """Turns readings into UpsStatus; remembers the last known line state."""

    def __init__(self, low_battery_percent: float, clock: Callable[[], float],
                 estimator: RuntimeEstimator | None = None) -> None:
        self.low_battery_percent = low_battery_percent
        self.clock = clock
        self.estimator = estimator or RuntimeEstimator()
        self._last_on_battery: bool | None = None
        self.last: UpsStatus | None = None

    def update(self, reading: UpsReading | None, error: str | None = None) -> UpsStatus:
        now = self.clock()
        if reading is None:
            reading = UpsReading(on_battery=None)
        on_battery = reading.on_battery
        if on_battery is None:
            # A poll that cannot tell (I/O error, gauge settling) keeps the last state.
            on_battery = self._last_on_battery
        else:
            self._last_on_battery = on_battery
        flags: set[UpsFlag] = set()
        if on_battery is not None:
            flags.add(UpsFlag.OB if on_battery else UpsFlag.OL)
        discharging = bool(on_battery) or bool(reading.discharging)
        if discharging:
            flags.add(UpsFlag.DISCHRG)
        elif reading.charging:
            flags.add(UpsFlag.CHRG)
        charge = reading.charge_percent
        if charge is not None and charge <= self.low_battery_percent:
            flags.add(UpsFlag.LB)
        runtime = self.estimator.update(now, charge, discharging, reading.charge_rate)
        self.last = UpsStatus(frozenset(flags), now, charge, reading.voltage, reading.current,
                              runtime, error)
        return self.last
