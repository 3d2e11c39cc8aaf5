"""`mirrorunit ups`: the UPS monitor as its own process, driving the local unit
through its control socket; or, with `mirrorunit local --ups-config`, as a
service inside the local unit.

`ControlVolume` is the part of the volume the policy needs (`flush_cache`,
`cache_mode`), plus `detach`, carried over the control socket.  The policy must
keep working while the unit is unreachable (it may be restarting when mains
fails), so reads of the cache mode fall back to the last one seen and a failed
switch is retried at the next poll.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..blockdev import DeviceState
from ..config import ConfigStore, StoreState
from ..control import UPS_SOCKET, ControlError, ControlServer, call
from ..control.status import UpsReport
from ..volume.volume import CacheMode, Volume
from .drivers import SMBusLike
from .monitor import UpsMonitor, monitor_from_config

log = logging.getLogger("mirrorunit.ups")

Caller = Callable[..., Any]
DEFAULT_UPS_CONTROL = UPS_SOCKET
DEFAULT_POWEROFF = "systemctl poweroff"


class ControlVolume:
    """The local unit's volume seen through its control socket."""

    def __init__(self, control: str | os.PathLike[str], caller: Caller = call,
                 timeout: float = 30.0) -> None:
        self.control = control
        self.caller = caller
        self.timeout = timeout
        self._last_mode = CacheMode.WRITE_THROUGH
        #: a switch the unit has not confirmed yet
        self._pending: CacheMode | None = None

    def _call(self, op: str, **args: Any) -> Any:
        return self.caller(self.control, op, timeout=self.timeout, **args)

    @property
    def cache_mode(self) -> CacheMode:
        if self._pending is not None:
            return self._pending
        try:
            self._last_mode = CacheMode(self._call("status")["volume"]["cache_mode"])
        except (ControlError, KeyError, TypeError, ValueError) as e:
            log.warning("ups: cannot read the unit's cache mode (%s); assuming %s",
                        e, self._last_mode.value)
        return self._last_mode

    @cache_mode.setter
    def cache_mode(self, mode: CacheMode) -> None:
        self._pending = mode
        self.retry_pending()

    def retry_pending(self) -> bool:
        """Push a switch the unit missed; True once nothing is pending."""
        mode = self._pending
        if mode is None:
            return True
        try:
            self._call("volume.set_cache_mode", mode=mode.value)
        except ControlError as e:
            log.error("ups: cannot switch the unit to %s: %s (retrying)", mode.value, e)
            return False
        self._last_mode, self._pending = mode, None
        return True

    def flush_cache(self) -> float:
        return float(self._call("volume.flush"))

    def detach(self) -> None:
        """Stop the front ends accepting data: the volume goes OFFLINE (flushed first)."""
        self._call("volume.set_state", state=DeviceState.OFFLINE.value)


def command_hook(command: str) -> Callable[[], None]:
    argv = shlex.split(command)

    def run() -> None:
        log.warning("ups: running %s", command)
        subprocess.run(argv, check=True)
    return run


class UpsProcess:
    """Monitor + policy + config reload + a control socket answering `status`."""

    def __init__(self, store: ConfigStore, control: str | os.PathLike[str], *,
                 ups_control: str | os.PathLike[str] | None = None,
                 poweroff: Callable[[], None] | None = None, interval: float = 2.0,
                 bus_factory: Callable[[int], SMBusLike] | None = None, gpio: Any = None,
                 caller: Caller = call, sync: Callable[[], None] = os.sync,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        loaded = store.load()
        if loaded.state is not StoreState.OK or loaded.config is None:
            raise ControlError(f"config {store.settings.path}: {loaded.describe()}")
        self.generation = loaded.generation
        self.volume = ControlVolume(control, caller)
        self.monitor: UpsMonitor = monitor_from_config(
            loaded.config, self.volume, detach=self.volume.detach,
            poweroff=poweroff or command_hook(DEFAULT_POWEROFF), interval=interval,
            sync=sync, clock=clock, bus_factory=bus_factory, gpio=gpio)
        self.ups_control = ups_control
        self.server: ControlServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload_config(self) -> bool:
        """Take up live ups.* changes when the partition has a new generation."""
        try:
            loaded = self.store.load()
        except Exception as e:  # noqa: BLE001 - a bad read must not stop the monitor
            log.error("ups: cannot re-read the config: %s", e)
            return False
        if loaded.state is not StoreState.OK or loaded.config is None \
                or loaded.generation == self.generation:
            return False
        cfg = loaded.config
        self.generation = loaded.generation
        policy = self.monitor.policy
        policy.settings = replace(policy.settings,
                                  on_battery_grace_s=float(cfg["ups.on_battery_grace_s"]),
                                  low_battery_percent=float(cfg["ups.low_battery_percent"]))
        self.monitor.tracker.low_battery_percent = policy.settings.low_battery_percent
        log.info("ups: config generation %d: grace %g s, low battery %g%%", self.generation,
                 policy.settings.on_battery_grace_s, policy.settings.low_battery_percent)
        return True

    def poll(self) -> None:
        self.reload_config()
        self.volume.retry_pending()
        self.monitor.poll_once()

    def poll_and_status(self) -> UpsReport:
        self.poll()
        return self.status()

    def status(self) -> UpsReport:
        out = self.monitor.status()
        out["config_generation"] = self.generation
        out["events"] = [{"time": e.time, "step": e.step, "reason": e.reason,
                          "seconds": e.seconds, "ok": e.ok}
                         for e in self.monitor.policy.events[-16:]]
        return out

    def start(self) -> None:
        if self.ups_control is not None:
            self.server = ControlServer(self.ups_control, {
                "status": self.status,
                "ups.status": self.status,
                "ups.poll": self.poll_and_status,
            })
            self.server.start()
        self._thread = threading.Thread(target=self._run, name="ups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from .policy import PolicyState

        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - logged; power monitoring must go on
                log.exception("ups: poll failed")
            if self.monitor.policy.state is PolicyState.OFF:
                log.info("ups: unit powered off; monitor ends")
                return
            self.monitor._wake.wait(self.monitor.interval)
            self.monitor._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self.monitor.poke()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.monitor.driver.close()

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            self._stop.wait(1.0)


class UpsService:
    """The same monitor inside the local unit, on its own volume (status under "ups")."""

    name = "ups"

    def __init__(self, volume: Volume, store: ConfigStore, poweroff: Callable[[], None],
                 interval: float = 2.0) -> None:
        loaded = store.load()
        if loaded.config is None:
            raise ControlError(f"config {store.settings.path}: {loaded.describe()}")
        self.monitor = monitor_from_config(
            loaded.config, volume, detach=lambda: volume.set_state(DeviceState.OFFLINE),
            poweroff=poweroff, interval=interval)

    def start(self) -> None:
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.close()

    def status(self) -> UpsReport:
        return self.monitor.status()

    def handlers(self) -> dict[str, Any]:
        return {"ups.status": self.status}
