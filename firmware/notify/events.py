"""Events worth an administrator's attention, found by comparing successive statuses.

Pure: `EventDetector.feed(status, now)` takes the local unit's `status` answer, checked
by `firmware.control.status.read_local_status` (with a separate UPS monitor's answer
merged under "ups" when the monitor runs as its own process), and
returns the events whose condition changed since the previous status.  Conditions
are edge-triggered, so a buffer that stays past high-water is reported once, and
the first status only reports what is already wrong (nothing is "restored").
`RateLimiter` then drops repeats of one event kind and subject inside a window.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..control.status import CbqStats, LocalStatus, PeerLinkStatus, UpsReport


class Severity(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class EventKind(enum.Enum):
    BUFFER_HIGH_WATER = "buffer-high-water"
    BUFFER_OVERFLOW = "buffer-overflow"
    LINK_DOWN = "link-down"
    LINK_RESTORED = "link-restored"
    REMOTE_OUT_OF_SYNC = "remote-out-of-sync"
    RESYNC_FINISHED = "resync-finished"
    ON_BATTERY = "on-battery"
    LOW_BATTERY = "low-battery"
    MAINS_RESTORED = "mains-restored"
    UNIT_UNREACHABLE = "unit-unreachable"
    UNIT_REACHABLE = "unit-reachable"
    TEST = "test"


#: The number each kind has in the trap OID (see docs/notifications.md); never reuse one.
TRAP_NUMBER = {
    EventKind.BUFFER_HIGH_WATER: 1, EventKind.BUFFER_OVERFLOW: 2, EventKind.LINK_DOWN: 3,
    EventKind.LINK_RESTORED: 4, EventKind.REMOTE_OUT_OF_SYNC: 5,
    EventKind.RESYNC_FINISHED: 6, EventKind.ON_BATTERY: 7, EventKind.LOW_BATTERY: 8,
    EventKind.MAINS_RESTORED: 9, EventKind.UNIT_UNREACHABLE: 10,
    EventKind.UNIT_REACHABLE: 11, EventKind.TEST: 99,
}


@dataclass(frozen=True)
class Event:
    kind: EventKind
    severity: Severity
    text: str
    subject: str = ""
    time: float = 0.0
    #: repeats dropped by the rate limiter since this kind and subject was last sent
    suppressed: int = 0

    @property
    def title(self) -> str:
        return self.kind.value + (f" ({self.subject})" if self.subject else "")


#: link states (PeerLinkStatus.state) that mean data can flow; "paused" is the operator's
#: choice, neither up nor down. Any other state (retrying, or the code of a refusal such as
#: fenced or split-brain) means the remote is not receiving this unit's writes.
LINK_UP_STATES = frozenset({"connected", "resyncing"})
LINK_NEUTRAL_STATES = frozenset({"paused"})


def links(status: LocalStatus) -> Iterator[tuple[str, PeerLinkStatus]]:
    """(peer name, link status) of every peer of the unit's replication service."""
    link = status.get("link")
    if link is not None:
        yield from link["peers"].items()


def link_up(link: PeerLinkStatus) -> bool | None:
    """True when up, False when down, None when paused by the operator."""
    state = link["state"]
    if state in LINK_UP_STATES:
        return True
    if state in LINK_NEUTRAL_STATES:
        return None
    return False


def _pct(v: float) -> str:
    return f"{v:.0%}"


@dataclass
class EventDetector:
    unit_name: str = "mirrorunit"
    _seen: dict[tuple[str, str], Any] = field(default_factory=dict)
    _reachable: bool | None = None

    def _edge(self, key: tuple[str, str], value: Any) -> tuple[bool, Any]:
        """(changed, previous); the first sight of a condition counts as a change from
        its healthy value, so existing trouble is reported at start-up."""
        first = key not in self._seen
        prev = self._seen.get(key)
        self._seen[key] = value
        return (first or prev != value), (None if first else prev)

    def unreachable(self, reason: str, now: float) -> list[Event]:
        if self._reachable is False:
            return []
        self._reachable = False
        return [Event(EventKind.UNIT_UNREACHABLE, Severity.CRITICAL,
                      f"The local unit does not answer on its control socket ({reason}); "
                      "the host's data may not be mirrored.", time=now)]

    def feed(self, status: LocalStatus, now: float) -> list[Event]:
        events: list[Event] = []
        if self._reachable is False:
            events.append(Event(EventKind.UNIT_REACHABLE, Severity.INFO,
                                "The local unit answers again.", time=now))
        self._reachable = True
        events += self._buffer(status["cbq"], now)
        events += self._link_events(status, now)
        ups = status.get("ups")
        if ups is not None:
            events += self._ups(ups, now)
        return events

    def _buffer(self, cbq: CbqStats, now: float) -> list[Event]:
        out: list[Event] = []
        fill, hw, mode = cbq["fill"], cbq["high_water"], cbq["mode"]
        past = fill >= hw or mode == "compact"
        changed, _ = self._edge(("buffer", "high"), past)
        if changed and past:
            out.append(Event(EventKind.BUFFER_HIGH_WATER, Severity.WARNING,
                             f"The buffer is {_pct(fill)} full, past its high-water mark of "
                             f"{_pct(hw)}: the link is not keeping up and the queue now keeps "
                             "only the latest data of each area.", time=now))
        over = mode == "overflow"
        changed, _ = self._edge(("buffer", "overflow"), over)
        if changed and over:
            out.append(Event(EventKind.BUFFER_OVERFLOW, Severity.CRITICAL,
                             "The buffer is full: writes are tracked only as changed areas "
                             "and the remote copy will need a checksum resync.", time=now))
        for name, c in cbq["consumers"].items():
            if name.startswith("@"):  # the unit's own consumers, not remotes
                continue
            needs = c["needs_resync"]
            changed, prev = self._edge(("resync", name), needs)
            if changed and needs:
                out.append(Event(EventKind.REMOTE_OUT_OF_SYNC, Severity.CRITICAL,
                                 f"Remote {name} is out of sync: it needs a checksum "
                                 "resync before it again holds a consistent copy.",
                                 subject=name, time=now))
            elif changed and prev is True:
                out.append(Event(EventKind.RESYNC_FINISHED, Severity.INFO,
                                 f"Remote {name} finished its resync and is consistent "
                                 "again.", subject=name, time=now))
        return out

    def _link_events(self, status: LocalStatus, now: float) -> list[Event]:
        out: list[Event] = []
        for name, link in links(status):
            up = link_up(link)
            if up is None:
                continue
            changed, prev = self._edge(("link", name), up)
            if not changed:
                continue
            if not up:
                why = link["last_error"] or link["state"]
                out.append(Event(EventKind.LINK_DOWN, Severity.CRITICAL,
                                 f"The link to {name} is down ({why}); writes queue in the "
                                 "buffer until it returns.", subject=name, time=now))
            elif prev is False:
                out.append(Event(EventKind.LINK_RESTORED, Severity.INFO,
                                 f"The link to {name} is up again.", subject=name, time=now))
        return out

    def _ups(self, ups: UpsReport, now: float) -> list[Event]:
        out: list[Event] = []
        flags = ups["status"].split()
        charge = ups["charge_percent"]
        charge_txt = "unknown" if charge is None else f"{charge:.0f}%"
        ob = "OB" in flags
        changed, prev = self._edge(("ups", "OB"), ob)
        if changed and ob:
            out.append(Event(EventKind.ON_BATTERY, Severity.WARNING,
                             f"Mains power lost: running on battery (charge {charge_txt}, "
                             f"runtime {ups['runtime']}); the write cache was "
                             "flushed and writes go straight to disk.", time=now))
        elif changed and prev is True and "OL" in flags:
            out.append(Event(EventKind.MAINS_RESTORED, Severity.INFO,
                             f"Mains power is back (charge {charge_txt}).", time=now))
        lb = "LB" in flags and ob
        changed, _ = self._edge(("ups", "LB"), lb)
        if changed and lb:
            out.append(Event(EventKind.LOW_BATTERY, Severity.CRITICAL,
                             f"Battery low ({charge_txt}): the unit stops accepting writes, "
                             "flushes and powers off.", time=now))
        return out


@dataclass
class RateLimiter:
    """At most one event per kind and subject every `interval_s` seconds."""

    interval_s: float = 300.0
    _last: dict[tuple[EventKind, str], float] = field(default_factory=dict)
    _dropped: dict[tuple[EventKind, str], int] = field(default_factory=dict)

    def admit(self, event: Event, now: float) -> Event | None:
        key = (event.kind, event.subject)
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            return Event(event.kind, event.severity, event.text, event.subject, event.time,
                         dropped)
        return event
