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
from typing import Any, cast

from ..control.status import (
    CbqStats,
    GuessBudget,
    LocalStatus,
    PeerLinkStatus,
    RemoteStatus,
    UpsReport,
    UsbStatus,
    is_remote_status,
)


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
    GUESS_LOCKOUT = "guess-lockout"
    FENCED = "fenced"
    HOST_DISCONNECTED = "host-disconnected"
    HOST_CONNECTED = "host-connected"
    SPLIT_BRAIN = "split-brain"
    TEST = "test"


#: The number each kind has in the trap OID (see docs/notifications.md); never reuse one.
TRAP_NUMBER = {
    EventKind.BUFFER_HIGH_WATER: 1, EventKind.BUFFER_OVERFLOW: 2, EventKind.LINK_DOWN: 3,
    EventKind.LINK_RESTORED: 4, EventKind.REMOTE_OUT_OF_SYNC: 5,
    EventKind.RESYNC_FINISHED: 6, EventKind.ON_BATTERY: 7, EventKind.LOW_BATTERY: 8,
    EventKind.MAINS_RESTORED: 9, EventKind.UNIT_UNREACHABLE: 10,
    EventKind.UNIT_REACHABLE: 11, EventKind.GUESS_LOCKOUT: 12,
    EventKind.FENCED: 13, EventKind.SPLIT_BRAIN: 14, EventKind.HOST_DISCONNECTED: 15,
    EventKind.HOST_CONNECTED: 16, EventKind.TEST: 99,
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

    def feed(self, status: LocalStatus | RemoteStatus, now: float) -> list[Event]:
        """Events from a local unit's status or, on a remote appliance, a remote's."""
        events: list[Event] = []
        if self._reachable is False:
            events.append(Event(EventKind.UNIT_REACHABLE, Severity.INFO,
                                "The unit answers again.", time=now))
        self._reachable = True
        if is_remote_status(status):
            return events + self._guess_limits(status["guess_limits"], now)
        local = cast(LocalStatus, status)
        events += self._buffer(local["cbq"], now)
        events += self._link_events(local, now)
        usb = local.get("usb")
        if usb is not None:
            events += self._host(usb, local["cbq"], now)
        ups = local.get("ups")
        if ups is not None:
            events += self._ups(ups, now)
        return events

    def _guess_limits(self, limits: dict[str, GuessBudget], now: float) -> list[Event]:
        """A lockout of a unit-wide guess budget (recovery or pairing): someone may be
        guessing the admin password.  Edge: on each new lockout; one already in force
        when the notifier starts is reported too."""
        out: list[Event] = []
        for what, snap in limits.items():
            count = snap["lockouts"]
            changed, prev = self._edge(("lockout", what), count)
            if not changed or count <= (prev or 0):
                continue
            if prev is None and not snap["locked_for_s"]:
                continue  # an old lockout, over before the notifier started
            out.append(Event(EventKind.GUESS_LOCKOUT, Severity.CRITICAL,
                             _lockout_text(what, snap), subject=what, time=now))
        return out

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
            out += self._lineage_events(name, link, now)
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

    def _host(self, usb: UsbStatus, cbq: CbqStats, now: float) -> list[Event]:
        """The USB host went away (cable pulled, host off) while writes it made are still
        only here: said once; and when it is back."""
        out: list[Event] = []
        attached = usb["host"]["connection"] == "configured"
        changed, prev = self._edge(("usb", "host"), attached)
        queued = cbq["queued_records"]
        if changed and not attached and prev is True and queued:
            self._seen[("usb", "alarm")] = True
            out.append(Event(EventKind.HOST_DISCONNECTED, Severity.WARNING,
                             f"The host disconnected ({usb['host']['connection']}) while "
                             f"{queued} of its writes ({cbq['queued_bytes']} bytes) are still "
                             "queued here and not yet on a remote; keep the unit powered "
                             "until they are sent.", time=now))
        elif changed and attached and self._seen.pop(("usb", "alarm"), False):
            out.append(Event(EventKind.HOST_CONNECTED, Severity.INFO,
                             "The host is connected again.", time=now))
        return out

    def _lineage_events(self, name: str, link: PeerLinkStatus, now: float) -> list[Event]:
        """The remote refuses this copy on their lineages: it was promoted while this
        copy was away (fenced), or both became writable (split brain).  Each is said once
        per reason, and neither resolves itself (docs/failover.md)."""
        out: list[Event] = []
        for kind, reason, advice in (
                (EventKind.FENCED, link["fenced"],
                 "this copy keeps serving its host and queueing; `mirrorunit role "
                 "failback` brings the remote's image back, keeping this copy's writes "
                 "since as a conflict image"),
                (EventKind.SPLIT_BRAIN, link["split_brain"],
                 "no data moves until one side gives up its writes: `mirrorunit role "
                 "failback` here, or `mirrorunit role resolve UNIT --give-up-here` on the "
                 "remote")):
            changed, _ = self._edge((kind.value, name), reason)
            if changed and reason:
                out.append(Event(kind, Severity.CRITICAL,
                                 f"Remote {name} refuses this copy's writes: {reason}; "
                                 f"{advice}.", subject=name, time=now))
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


#: Source networks named in a lockout notice; the rest are counted.
LOCKOUT_PREFIXES_SHOWN = 10


def _lockout_text(what: str, snap: GuessBudget) -> str:
    raw = snap["last_lockout"]
    last: dict[str, Any] = dict(raw) if raw is not None else {}
    prefixes = [p for p in last.get("prefixes", []) if isinstance(p, list | tuple)
                and len(p) == 2]
    shown = ", ".join(f"{p}: {n}" for p, n in prefixes[:LOCKOUT_PREFIXES_SHOWN])
    more = len(prefixes) - LOCKOUT_PREFIXES_SHOWN
    if more > 0:
        shown += f" and {more} more"
    length = last.get("length_s", snap.get("locked_for_s", "?"))
    recovery = what == "recovery"
    failed = "wrong admin-password proofs" if recovery else "refused offers"
    who = ("Someone may be guessing the admin password" if recovery else
           "Someone may be offering certificates this unit's config does not list")
    return (f"Too many {failed} in the {what} exchange: "
            f"{last.get('failures', '?')} within {snap.get('window_s', '?')} s from "
            f"{len(prefixes)} source network(s) ({shown or 'unknown'}). Every source is "
            f"refused for {length} s (lockout {last.get('number', snap['lockouts'])}; "
            f"each next one lasts twice as long). {who}: check who can reach the "
            "journey-link port.")


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
