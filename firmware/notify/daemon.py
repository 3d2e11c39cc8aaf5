"""The notifier: polls the local unit's status, detects events, sends them.

Targets and the polling interval are re-read whenever the config partition has a
new generation, so `config set notify...` takes effect at the next poll.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config, ConfigStore, StoreState
from ..control import ControlError, call
from ..control.status import LocalStatus, StatusShapeError, read_local_status, read_ups_report
from .events import Event, EventDetector, EventKind, RateLimiter, Severity
from .senders import Sender, build_senders, deliver

log = logging.getLogger("mirrorunit.notify")

Caller = Callable[..., Any]
DEFAULT_RATE_LIMIT_S = 300.0


class Notifier:
    def __init__(self, store: ConfigStore, control: str | os.PathLike[str], *,
                 ups_control: str | os.PathLike[str] | None = None,
                 rate_limit_s: float = DEFAULT_RATE_LIMIT_S, caller: Caller = call,
                 clock: Callable[[], float] = time.time,
                 senders_factory: Callable[[Mapping[str, Any]], list[Sender]] = build_senders
                 ) -> None:
        self.store = store
        self.control = control
        self.ups_control = ups_control
        self.caller = caller
        self.clock = clock
        self.senders_factory = senders_factory
        self.limiter = RateLimiter(rate_limit_s)
        self.detector = EventDetector()
        self.generation = -1
        self.cfg = Config.defaults()
        self.senders: list[Sender] = []
        #: (event, [(target, result)]) of the last events, newest last
        self.history: list[tuple[Event, list[tuple[str, str]]]] = []
        self._stop = threading.Event()
        self.reload()

    @property
    def interval(self) -> float:
        return float(self.cfg["notify.poll_interval_s"])

    def reload(self) -> bool:
        try:
            loaded = self.store.load()
        except Exception as e:  # noqa: BLE001 - keep notifying with the targets we have
            log.error("notify: cannot read the config: %s", e)
            return False
        if loaded.state is not StoreState.OK or loaded.config is None \
                or loaded.generation == self.generation:
            return False
        self.generation = loaded.generation
        self.cfg = loaded.config
        self.detector.unit_name = self.cfg["unit.name"]
        self.senders = self.senders_factory(self.cfg)
        log.info("notify: config generation %d: %s", self.generation,
                 "; ".join(s.target for s in self.senders) or "no targets")
        return True

    def _status(self) -> LocalStatus:
        """The unit's status, with a separate UPS monitor's merged in; StatusShapeError
        when either answer does not have the documented shape."""
        status = read_local_status(self.caller(self.control, "status", timeout=10.0))
        if self.ups_control is not None and "ups" not in status:
            try:
                status["ups"] = read_ups_report(
                    self.caller(self.ups_control, "status", timeout=10.0))
            except ControlError as e:
                log.debug("notify: no UPS monitor: %s", e)
        return status

    def poll_once(self) -> list[Event]:
        """One check; returns the events that passed the rate limiter (and were sent)."""
        self.reload()
        now = self.clock()
        try:
            events = self.detector.feed(self._status(), now)
        except ControlError as e:
            events = self.detector.unreachable(str(e), now)
        except StatusShapeError as e:
            # a unit whose answer cannot be read is as unwatched as one that does not answer
            log.error("notify: the unit's status cannot be read: %s", e)
            events = self.detector.unreachable(f"its status answer is malformed: {e}", now)
        sent = []
        for ev in events:
            admitted = self.limiter.admit(ev, now)
            if admitted is None:
                log.info("notify: %s rate-limited", ev.title)
                continue
            log.warning("notify: %s: %s", admitted.title, admitted.text)
            self.history = (self.history + [(admitted, deliver(self.senders, admitted,
                                                               self.cfg["unit.name"]))])[-32:]
            sent.append(admitted)
        return sent

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - logged; the notifier must keep watching
                log.exception("notify: poll failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def test_event(cfg: Mapping[str, Any], now: float | None = None) -> Event:
    return Event(EventKind.TEST, Severity.INFO,
                 f"Test notification from {cfg['unit.name']}: if you read this, alerts "
                 "reach you.", time=time.time() if now is None else now)
