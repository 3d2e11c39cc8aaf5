"""What the unit does when mains fails: a state machine fed UPS statuses.

    ON_MAINS --OB--> ON_BATTERY --OL--> ON_MAINS            (cache mode restored)
                        |
                        +--LB, or grace expired--> SHUTTING_DOWN --> OFF

Going on battery switches the volume to write-through and flushes its RAM cache,
so from then on every acknowledged write is already durable.  Shutting down
detaches the front ends (no new writes), flushes once more, syncs filesystems
and powers off.  Time comes from an injected clock; the volume and the hooks are
the only things touched, so tests drive it with fakes.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..volume.volume import CacheMode
from .status import UpsStatus

log = logging.getLogger("mirrorunit.ups")


class CachedVolume(Protocol):
    """The part of the local volume the policy drives (firmware.volume.Volume has it)."""

    cache_mode: CacheMode

    def flush_cache(self) -> float: ...


class PolicyState(enum.Enum):
    ON_MAINS = "on-mains"
    ON_BATTERY = "on-battery"
    SHUTTING_DOWN = "shutting-down"
    OFF = "off"


@dataclass(frozen=True)
class PolicySettings:
    on_battery_grace_s: float = 60.0
    low_battery_percent: float = 20.0


@dataclass(frozen=True)
class PolicyEvent:
    time: float
    step: str
    reason: str
    seconds: float | None = None
    ok: bool = True


@dataclass
class UpsPolicy:
    volume: CachedVolume
    detach: Callable[[], None]
    poweroff: Callable[[], None]
    settings: PolicySettings = field(default_factory=PolicySettings)
    sync: Callable[[], None] = os.sync
    clock: Callable[[], float] = time.monotonic

    state: PolicyState = field(default=PolicyState.ON_MAINS, init=False)
    events: list[PolicyEvent] = field(default_factory=list, init=False)
    on_battery_since: float | None = field(default=None, init=False)
    saved_cache_mode: CacheMode | None = field(default=None, init=False)
    last_flush_s: float | None = field(default=None, init=False)

    def _record(self, step: str, reason: str, seconds: float | None = None,
                ok: bool = True) -> None:
        ev = PolicyEvent(self.clock(), step, reason, seconds, ok)
        self.events.append(ev)
        took = f" in {seconds:.3f} s" if seconds is not None else ""
        level = logging.WARNING if step != "mains-restored" else logging.INFO
        if not ok:
            level = logging.ERROR
        log.log(level, "ups: %s%s (%s)", step, took, reason)

    def _flush(self, step: str, reason: str) -> bool:
        try:
            seconds = self.volume.flush_cache()
        except Exception as e:  # noqa: BLE001 - logged; the next step must still run
            self._record(step, f"{reason}; flush failed: {e}", ok=False)
            return False
        self.last_flush_s = seconds
        self._record(step, reason, seconds)
        return True

    def update(self, status: UpsStatus) -> list[PolicyEvent]:
        """Feed one status; returns the steps taken for it."""
        before = len(self.events)
        if self.state is PolicyState.ON_MAINS and status.on_battery:
            self._go_on_battery(status)
        if self.state is PolicyState.ON_BATTERY:
            if status.on_line:
                self._mains_back()
            elif status.on_battery and status.low_battery:
                self._shutdown(f"low battery ({_pct(status.charge_percent)} <= "
                               f"{self.settings.low_battery_percent:g}%)")
            else:
                self.tick()
        return self.events[before:]

    def tick(self) -> list[PolicyEvent]:
        """Re-check the grace deadline without a new status (a driver that cannot be read)."""
        before = len(self.events)
        if self.state is PolicyState.ON_BATTERY and self.on_battery_since is not None:
            elapsed = self.clock() - self.on_battery_since
            if elapsed >= self.settings.on_battery_grace_s:
                self._shutdown(f"{elapsed:.0f} s on battery, grace is "
                               f"{self.settings.on_battery_grace_s:g} s")
        return self.events[before:]

    def _go_on_battery(self, status: UpsStatus) -> None:
        self.state = PolicyState.ON_BATTERY
        self.on_battery_since = self.clock()
        self.saved_cache_mode = self.volume.cache_mode
        # Switch before flushing: a write racing the switch is then either cached
        # before the flush (and flushed by it) or written through.
        self.volume.cache_mode = CacheMode.WRITE_THROUGH
        self._record("write-through",
                     f"mains lost ({status.nut()}, charge {_pct(status.charge_percent)}); "
                     f"cache mode was {self.saved_cache_mode.value}")
        self._flush("cache-flushed", "mains lost")

    def _mains_back(self) -> None:
        assert self.on_battery_since is not None
        away = self.clock() - self.on_battery_since
        mode = self.saved_cache_mode or CacheMode.WRITE_THROUGH
        self.volume.cache_mode = mode
        self.state = PolicyState.ON_MAINS
        self.on_battery_since = None
        self.saved_cache_mode = None
        self._record("mains-restored", f"after {away:.1f} s on battery; cache mode {mode.value}")

    def _shutdown(self, reason: str) -> None:
        self.state = PolicyState.SHUTTING_DOWN
        self._record("shutdown", reason)
        # Power is going away whatever happens: a failing step is logged and the
        # next one still runs, so the flush is attempted even if detach failed.
        self._hook("detached", self.detach, "stop accepting writes")
        self._flush("final-flush", "before power-off")
        self._hook("synced", self.sync, "filesystems")
        self._hook("poweroff", self.poweroff, "battery must not run flat under load")
        self.state = PolicyState.OFF

    def _hook(self, step: str, hook: Callable[[], None], reason: str) -> None:
        t0 = self.clock()
        try:
            hook()
        except Exception as e:  # noqa: BLE001 - logged; the shutdown must go on
            self._record(step, f"{reason}; failed: {e}", ok=False)
            return
        self._record(step, reason, self.clock() - t0)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "on_battery_since": self.on_battery_since,
            "grace_s": self.settings.on_battery_grace_s,
            "shutdown_in_s": (None if self.on_battery_since is None else max(
                0.0, self.on_battery_since + self.settings.on_battery_grace_s - self.clock())),
            "saved_cache_mode": self.saved_cache_mode.value if self.saved_cache_mode else None,
            "last_flush_s": self.last_flush_s,
            "last_step": self.events[-1].step if self.events else None,
        }


def _pct(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0f}%"
