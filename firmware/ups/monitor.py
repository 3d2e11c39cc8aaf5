"""The UPS polling loop: driver -> status -> policy, and the status for `mirrorunit status`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..control.status import UpsReport
from .drivers import SMBusLike, UpsDriver, build_driver
from .errors import UpsDriverError
from .policy import CachedVolume, PolicySettings, PolicyState, UpsPolicy
from .status import StatusTracker, UpsStatus, rounded

log = logging.getLogger("mirrorunit.ups")


class UpsMonitor:
    def __init__(self, driver: UpsDriver, policy: UpsPolicy, interval: float = 2.0, *,
                 tracker: StatusTracker | None = None) -> None:
        self.driver = driver
        self.policy = policy
        self.interval = interval
        self.tracker = tracker or StatusTracker(policy.settings.low_battery_percent,
                                                policy.clock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing = False
        self.polls = 0

    def poll_once(self) -> UpsStatus:
        with self._lock:
            try:
                reading = self.driver.read()
                error = None
                if self._failing:
                    log.info("ups: %s readable again", self.driver.name)
                    self._failing = False
            except (OSError, UpsDriverError) as e:
                reading, error = None, f"{self.driver.name}: {e}"
                if not self._failing:
                    # Logged once per failure streak; the policy keeps the last line state.
                    log.error("ups: cannot read %s", error)
                    self._failing = True
            status = self.tracker.update(reading, error)
            self.policy.update(status)
            self.polls += 1
            return status

    def poke(self) -> None:
        """Poll now (a power-loss input edge)."""
        self._wake.set()

    def _next_wait(self, now: float) -> float:
        settle = getattr(self.driver, "settling_until", None)
        if settle is not None:
            return max(0.0, min(self.interval, settle - now))
        return self.interval

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until `stop` is set or the policy has powered the unit off.

        Whoever sets an external `stop` calls poke() too, so the wait ends at once.
        """
        stop = stop or self._stop
        while not stop.is_set():
            status = self.poll_once()
            if self.policy.state is PolicyState.OFF:
                log.info("ups: monitor ends, unit powered off")
                return
            self._wake.wait(self._next_wait(status.time))
            self._wake.clear()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="ups-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.driver.close()

    def status(self) -> UpsReport:
        last = self.tracker.last
        now = last if last is not None else UpsStatus(frozenset(), self.policy.clock())
        return {"model": self.driver.name, "polls": self.polls, "interval_s": self.interval,
                "status": now.nut(), "charge_percent": rounded(now.charge_percent, 1),
                "voltage": rounded(now.voltage, 3), "current": rounded(now.current, 3),
                "runtime_s": rounded(now.runtime_s, 0),
                "runtime": "unknown" if now.runtime_s is None else f"{now.runtime_s:.0f} s",
                "error": now.error, "policy": self.policy.status()}


def monitor_from_config(ups: Mapping[str, Any], volume: CachedVolume, *,
                        detach: Callable[[], None], poweroff: Callable[[], None],
                        interval: float = 2.0, sync: Callable[[], None] = os.sync,
                        clock: Callable[[], float] = time.monotonic,
                        bus_factory: Callable[[int], SMBusLike] | None = None,
                        gpio: Any = None) -> UpsMonitor:
    """The `mirrorunit ups` wiring: driver and policy from the `ups.*` fields of a Config."""
    policy = UpsPolicy(volume, detach, poweroff,
                       PolicySettings(float(ups["ups.on_battery_grace_s"]),
                                      float(ups["ups.low_battery_percent"])),
                       sync=sync, clock=clock)
    wake: list[UpsMonitor] = []
    driver = build_driver(ups, bus_factory=bus_factory, gpio=gpio, clock=clock,
                          on_edge=lambda: wake[0].poke() if wake else None)
    monitor = UpsMonitor(driver, policy, interval)
    wake.append(monitor)
    return monitor
