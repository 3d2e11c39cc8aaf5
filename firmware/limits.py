"""Limits every listener keeps: connection caps, per-source caps, deadlines, and
what to do when the process runs out of descriptors or threads.

Stdlib only (a foundation): the link, NBD and control listeners share it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: accept() errors that mean "this process or host is short of a resource right now":
#: the listener backs off and carries on instead of ending.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that cost one client only (it went away before we took it).
TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR,
                              errno.EAGAIN})


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener lets its clients hold.  The defaults suit a unit on the
    Internet serving a handful of peers: a remote serving several locals from one
    site stays far below the per-source cap."""

    #: Connections served at once; one over it is closed at once.
    max_connections: int = 256
    #: Connections at once from one IPv4 /24 or one IPv6 /64.
    max_per_source: int = 32
    #: The TLS handshake must finish within this many seconds, however the bytes trickle.
    handshake_deadline: float = 10.0
    #: The whole certificate-less exchange (pairing offer, recovery) must end by then.
    exchange_deadline: float = 20.0
    #: A connection past its handshake that sends nothing for this long is closed
    #: (link peers ping every 5 s; the NBD listener uses a longer one).
    idle_timeout: float = 20.0
    #: How long the listener pauses after a resource error (EMFILE, thread start).
    resource_backoff: float = 0.1
    #: At most one log line per this many seconds for each kind of refusal.
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_source"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("handshake_deadline", "exchange_deadline", "idle_timeout",
                     "resource_backoff", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def source_prefix(host: str) -> str:
    """The network a source address is counted under: its /24 (IPv4) or /64 (IPv6);
    an IPv4-mapped IPv6 address counts as its IPv4 address; anything else as itself."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


class RateLimitedLog:
    """Logs a kind of event at most once per `interval`, saying how many were
    suppressed, so a flood cannot fill the journal."""

    def __init__(self, logger: logging.Logger, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next.get(kind, 0.0):
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._next[kind] = now + self._interval
            dropped = self._suppressed.pop(kind, 0)
        if dropped:
            msg += " (%d more like it not logged)"
            args = (*args, dropped)
        self._log.warning(msg, *args)


class ConnectionGate:
    """Counts the connections a listener serves, overall and per source prefix.
    `admit` says why a new one is refused (None: admitted, and counted until `release`)."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._by_prefix: dict[str, int] = {}
        #: Connections refused over the overall cap and over the per-source cap.
        self.refused_total = 0
        self.refused_source = 0

    @property
    def active(self) -> int:
        with self._lock:
            return self._total

    def admit(self, host: str) -> str | None:
        prefix = source_prefix(host)
        with self._lock:
            if self._total >= self.limits.max_connections:
                self.refused_total += 1
                return f"{self._total} connections already (the cap)"
            held = self._by_prefix.get(prefix, 0)
            if held >= self.limits.max_per_source:
                self.refused_source += 1
                return f"{held} connections from {prefix} already (the per-source cap)"
            self._total += 1
            self._by_prefix[prefix] = held + 1
            return None

    def release(self, host: str) -> None:
        prefix = source_prefix(host)
        with self._lock:
            self._total -= 1
            left = self._by_prefix[prefix] - 1
            if left:
                self._by_prefix[prefix] = left
            else:
                del self._by_prefix[prefix]


def accept_failure_is_transient(exc: OSError) -> bool:
    """True when an accept() failure should not end the accept loop: the process
    is short of a resource (back off and retry) or one client vanished."""
    return exc.errno in RESOURCE_ERRNOS or exc.errno in TRANSIENT_ERRNOS


class ByteBudget:
    """Bytes a listener's clients may hold at once, shared by all its connections:
    a request waits for its share instead of allocating at the word of a client."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a byte budget must be positive")
        self.total = total
        self._free = total
        self._cond = threading.Condition()
        #: The most bytes ever held at once.
        self.peak = 0

    @property
    def held(self) -> int:
        with self._cond:
            return self.total - self._free

    def acquire(self, n: int, timeout: float | None) -> bool:
        """Take `n` bytes (at most the total), waiting up to `timeout`; False if
        they did not come free in time."""
        if not 0 < n <= self.total:
            raise ValueError(f"cannot take {n} bytes of a {self.total}-byte budget")
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= n, timeout):
                return False
            self._free -= n
            self.peak = max(self.peak, self.total - self._free)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            assert self._free <= self.total, "released more than was taken"
            self._cond.notify_all()
