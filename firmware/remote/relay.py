"""Relay: a remote forwards what it applies for a unit to a further remote (A -> B -> C).

B keeps no queue of its own for this.  The records a relay still needs are the ones
its unit store already holds in the receive journal: `RelayHold` keeps the journal
entries B has applied and C has not acknowledged (their segments are not trimmed
while held), in seq order, and `RelaySource` streams them to C through the same
`LinkClient` a local unit uses.  Seqs stay the local's: C's unit follows the same
queue (same queue id, same lineage), so C's durable seq is A's seq, a record C
already holds is skipped there, and A pointed at C directly meets a copy it can
compare by digests.

What cannot be streamed is covered by chunks:
- more than `hold_bytes` of held records (C away for long): the oldest are let go,
  their chunks marked dirty;
- B's own checksum resync (its chunks written in place) and a rollback of B's
  mirror;
- a C that lost what it had acknowledged, or follows another queue: every chunk.
The next session then runs a checksum resync of those chunks (only digests and the
chunks that differ cross the link), at the seq right before the first held record,
and streams on from there.  Relaying pauses while B's unit is promoted or runs its
own resync: there is no consistent image to read then.

`RelayHold` has no lock and no I/O: the unit store calls it under its own lock and
persists `to_state()` in its state file (docs/failover.md, "Relay chain").
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from firmware.cbq.format import BARRIER_IN_RESYNC, barrier_flags
from firmware.link.errors import SourceGap
from firmware.link.frames import WriteRecord, barrier_record, skip_record
from firmware.link.session import ResyncFinished, ResyncPlan, SenderConfig, SessionEvent
from firmware.link.shell import Backoff, LinkClient
from firmware.link.tls import (
    Identity,
    PeerNotPinned,
    PeerStore,
    TlsIdentityError,
    fetch_certificate,
)
from firmware.remote.format import RecordKind
from firmware.remote.journal import LogEntry
from firmware.remote.points import Point
from firmware.units import AddressError, split_host_port

log = logging.getLogger("mirrorunit.relay")

#: Journal bytes held for a relay before the oldest are let go (their chunks resync).
RELAY_HOLD_BYTES = 256 * 1024 * 1024
#: The remotes this remote relays to, pinned apart from the locals it accepts.
RELAY_PEERS_FILE = "relay-peers.json"


def _last_seq(e: LogEntry) -> int:
    return e.lbn if e.kind is RecordKind.SKIP else e.seq


def chunk_ranges(chunks: Iterable[int]) -> list[list[int]]:
    """Chunk numbers as sorted inclusive [first, last] ranges."""
    out: list[list[int]] = []
    for c in sorted(set(chunks)):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


class RelayHold:
    """What one unit store keeps for its relay: held journal entries, dirty chunks,
    the seq the next remote acknowledged.  Invariant: the held entries cover the
    seqs (base, applied] without a gap, and every seq <= base is acknowledged by
    the next remote or covered by `dirty` / `full`."""

    def __init__(self, state: dict[str, Any], applied: int, *,
                 hold_bytes: int = RELAY_HOLD_BYTES) -> None:
        self.name: str = state["name"]
        self.acked: int = int(state["acked"])
        self.full: bool = bool(state["full"])
        self.dirty: set[int] = {c for lo, hi in state["dirty"] for c in range(lo, hi + 1)}
        #: Chunks of the resync in progress (back into `dirty` if it never finishes).
        self.resyncing: set[int] = set()
        self.hold_bytes = hold_bytes
        self.held: deque[LogEntry] = deque()
        self.held_bytes = 0
        self.base = applied
        self.let_go = 0

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "acked": self.acked, "full": self.full,
                "dirty": chunk_ranges(self.dirty | self.resyncing)}

    @classmethod
    def new_state(cls, name: str, has_data: bool) -> dict[str, Any]:
        # A downstream added to a unit that holds data gets all of it by digests.
        return {"name": name, "acked": 0, "full": has_data, "dirty": []}

    # ------------------------------------------------------------ fed by the store

    def rebuild(self, received: Sequence[LogEntry], applied: int) -> None:
        """After opening the store: hold the applied entries the next remote lacks."""
        self.held.clear()
        self.held_bytes = 0
        keep = [e for e in received if self.acked < _last_seq(e) <= applied]
        first = keep[0].seq if keep else applied + 1
        self.base = first - 1
        if self.base > self.acked and not (self.dirty or self.full):
            log.warning("relay %s: seqs %d..%d are no longer in the journal; the next "
                        "session compares every chunk", self.name, self.acked + 1, self.base)
            self.full = True
        for e in keep:
            self.held.append(e)
            self.held_bytes += e.payload_len

    def applied(self, entries: Iterable[LogEntry], chunks_of: Callable[[LogEntry], Iterable[int]]
                ) -> None:
        for e in entries:
            if _last_seq(e) <= self.acked:
                # The next remote had it already (it was fed by the local directly).
                self.base = max(self.base, _last_seq(e))
                continue
            self.held.append(e)
            self.held_bytes += e.payload_len
        while self.held_bytes > self.hold_bytes and len(self.held) > 1:
            self._let_go_oldest(chunks_of)

    def _let_go_oldest(self, chunks_of: Callable[[LogEntry], Iterable[int]]) -> None:
        e = self.held.popleft()
        self.held_bytes -= e.payload_len
        if e.seq > self.acked:
            self.dirty.update(chunks_of(e))
            self.let_go += 1
        self.base = _last_seq(e)

    def cover(self, upto: int, chunks_of: Callable[[LogEntry], Iterable[int]]) -> None:
        """Every seq <= `upto` is now in the mirror by other means than the held
        records (the store's own resync completed there)."""
        while self.held and _last_seq(self.held[0]) <= upto:
            self._let_go_oldest(chunks_of)
        self.base = max(self.base, upto)

    def reset(self, applied: int) -> None:
        """The mirror changed in ways no record says (a rollback): compare it all."""
        self.held.clear()
        self.held_bytes = 0
        self.base = applied
        self.full = True

    def keep_segment(self) -> int | None:
        return self.held[0].segment if self.held else None

    # ------------------------------------------------------------ read by the source

    def ack(self, seq: int) -> None:
        if seq <= self.acked:
            return
        self.acked = seq
        while self.held and _last_seq(self.held[0]) <= seq:
            e = self.held.popleft()
            self.held_bytes -= e.payload_len
            self.base = max(self.base, _last_seq(e))
        if not self.held:
            self.base = max(self.base, seq)

    def plan(self, remote_durable: int, chunk_count: int) -> ResyncPlan | None:
        if remote_durable < self.acked and not self.full:
            log.warning("relay %s: the next remote is at seq %d, it acknowledged %d; every "
                        "chunk is compared", self.name, remote_durable, self.acked)
            self.full = True
        if remote_durable > self.acked:
            self.ack(remote_durable)
        if not (self.full or self.dirty or self.resyncing) and self.base > self.acked:
            log.warning("relay %s: seqs %d..%d are not held; every chunk is compared",
                        self.name, self.acked + 1, self.base)
            self.full = True
        if not (self.full or self.dirty or self.resyncing):
            return None
        self.resyncing |= self.dirty
        self.dirty = set()
        chunks = tuple(range(chunk_count)) if self.full else tuple(sorted(self.resyncing))
        return ResyncPlan(verify=False, seq=self.base, chunks=chunks)

    def finished(self, plan: ResyncPlan) -> None:
        self.resyncing = set()
        self.full = False
        self.acked = max(self.acked, plan.seq)


class RelayStore(Protocol):
    """The unit store as the relay reads it (firmware.remote.unit.UnitStore)."""

    unit_id: str
    volume_size: int
    block_size: int

    @property
    def last_applied_seq(self) -> int: ...

    def relay_call(self, fn: Callable[[RelayHold], Any]) -> Any: ...

    def relay_records(self, after: int, barrier_after: int, max_bytes: int
                      ) -> tuple[list[WriteRecord], int]: ...

    def relay_paused(self) -> str | None: ...

    def read_mirror(self, offset: int, length: int) -> bytes: ...

    def chunk_digests(self, chunks: Iterable[int] | None = None) -> dict[int, bytes]: ...


def barrier_of(p: Point) -> WriteRecord:
    kind = p.kind | (BARRIER_IN_RESYNC if p.in_resync else 0)
    return barrier_record(p.seq, p.ts, barrier_flags(kind, p.front_end, p.opcode),
                          p.connection, p.cum_blocks)


def records_for_relay(held: Sequence[LogEntry], points: Sequence[Point], after: int,
                      barrier_after: int, max_bytes: int,
                      payload: Callable[[LogEntry], bytes],
                      dropped: Callable[[int], bool]) -> tuple[list[WriteRecord], int]:
    """The records after seq `after` (and the barriers after `barrier_after`), in the
    host's order, up to `max_bytes` of data (one larger record alone); also the seq of
    the last barrier included (or `barrier_after`)."""
    out: list[WriteRecord] = []
    i = bisect.bisect_right(points, barrier_after, key=lambda p: p.seq)
    nbytes = 0
    lo, hi = 0, len(held)
    while lo < hi:  # first held entry ending after `after`
        mid = (lo + hi) // 2
        if _last_seq(held[mid]) <= after:
            lo = mid + 1
        else:
            hi = mid
    start = lo
    last_barrier = barrier_after
    for e in itertools.islice(held, start, None):
        while i < len(points) and points[i].seq < e.seq:
            out.append(barrier_of(points[i]))
            last_barrier = points[i].seq
            i += 1
        if e.kind is RecordKind.SKIP:
            r = skip_record(max(e.seq, after + 1), e.lbn, e.ts)
        elif dropped(e.seq):
            r = skip_record(e.seq, e.seq, e.ts)
        else:
            if out and nbytes + e.payload_len > max_bytes:
                break
            r = WriteRecord(seq=e.seq, lbn=e.lbn, data=payload(e), ts=e.ts)
            nbytes += e.payload_len
        out.append(r)
        while i < len(points) and points[i].seq <= r.last_seq:
            out.append(barrier_of(points[i]))
            last_barrier = points[i].seq
            i += 1
    if not out or not any(not r.barrier for r in out):
        # Only barriers that came after their writes were sent (or nothing new).
        top = _last_seq(held[start - 1]) if start else after
        while i < len(points) and points[i].seq <= max(after, top):
            out.append(barrier_of(points[i]))
            last_barrier = points[i].seq
            i += 1
    return out, last_barrier


class RelaySource:
    """`WriteSource` + `ResyncSource` over a unit store's relay hold."""

    def __init__(self, store: RelayStore, chunk_size: int) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._next_after = store.relay_call(lambda h: h.acked)
        self._barrier_after = self._next_after - 1
        self.records_sent = 0
        self.resyncs_done = 0
        self.resync_chunks_sent = 0
        self.resync: dict[str, Any] | None = None

    def head_seq(self) -> int:
        """The newest seq this copy applied (HELLO's `last_seq`)."""
        return int(self.store.last_applied_seq)

    def next_batch(self, max_bytes: int) -> list[WriteRecord]:
        if self.store.relay_paused() is not None:
            return []
        with self._lock:
            records, self._barrier_after = self.store.relay_records(
                self._next_after, self._barrier_after, max_bytes)
            for r in records:
                if not r.barrier:
                    self._next_after = r.last_seq
            self.records_sent += sum(1 for r in records if not r.barrier)
            return records

    def ack(self, seq: int) -> None:
        self.store.relay_call(lambda h: h.ack(seq))

    def rewind_to(self, seq: int) -> None:
        def check(h: RelayHold) -> None:
            # Records after `seq` were let go: only a resync of their chunks covers them.
            if h.base > seq:
                raise SourceGap(f"relay holds seqs after {h.base}, the next remote needs "
                                f"{seq + 1}")
        self.store.relay_call(check)
        with self._lock:
            self._next_after = seq
            self._barrier_after = seq - 1

    def resync_plan(self, remote_durable: int) -> ResyncPlan | None:
        if self.store.relay_paused() is not None:
            return None
        count = -(-self.store.volume_size // self.chunk_size)
        plan: ResyncPlan | None = self.store.relay_call(
            lambda h: h.plan(remote_durable, count))
        if plan is not None:
            self.resync = {"chunks": len(plan.chunks), "seq": plan.seq,
                           "started_ns": time.time_ns()}
            log.warning("relay of unit %s: checksum resync of %d chunks at seq %d",
                        self.store.unit_id, len(plan.chunks), plan.seq)
            with self._lock:
                self._next_after = plan.seq
                self._barrier_after = plan.seq
        return plan

    def read_chunk(self, chunk: int) -> bytes:
        off = chunk * self.chunk_size
        return self.store.read_mirror(off, min(self.chunk_size, self.store.volume_size - off))

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return self.store.chunk_digests(chunks)

    def resync_finished(self, plan: ResyncPlan, differing: list[int], seq: int) -> None:
        if plan.verify:
            return
        self.store.relay_call(lambda h: h.finished(plan))
        self.resyncs_done += 1
        self.resync_chunks_sent += len(differing)
        self.resync = None

    def require_full_resync(self, reason: str) -> None:
        log.warning("relay of unit %s: %s; every chunk is compared", self.store.unit_id, reason)

        def full(h: RelayHold) -> None:
            h.full = True
        self.store.relay_call(full)


@dataclass(frozen=True)
class RelaySpec:
    """`UNIT=NAME@HOST:PORT`: forward unit UNIT to the remote pinned as NAME."""

    unit_id: str
    name: str
    host: str
    port: int
    #: The fingerprint NAME must show, pinned at the first contact (None: pinned already).
    fingerprint: str | None = None

    @classmethod
    def parse(cls, text: str) -> RelaySpec:
        unit, sep, rest = text.partition("=")
        name, at, addr = rest.partition("@")
        if not (sep and at and unit and name):
            raise ValueError(f"--relay {text!r}: expected UNIT=NAME@HOST:PORT")
        try:
            host, port = split_host_port(addr)
        except AddressError as exc:
            raise ValueError(f"--relay {text!r}: {exc}") from None
        return cls(unit, name, host, port)


class Relay:
    """Forwards one unit of this remote to a further remote, reconnecting as needed."""

    def __init__(self, spec: RelaySpec, store: Any, identity: Identity, peers: PeerStore,
                 *, keepalive: float = 5.0, dead_after: float = 20.0,
                 backoff_max: float = 10.0) -> None:
        self.spec = spec
        self.store = store
        self.identity = identity
        self.peers = peers
        self.keepalive, self.dead_after, self.backoff_max = keepalive, dead_after, backoff_max
        store.relay_enable(spec.name)
        self.source = RelaySource(store, store.chunk_size)
        self.client: LinkClient | None = None
        self._generation: int | None = None
        self._pin_after = 0.0
        self.last_resync: dict[str, Any] | None = None

    def _make_client(self) -> LinkClient:
        lineage = self.store.lineage
        self._generation = lineage.generation
        config = SenderConfig(
            unit_id=self.store.unit_id, volume_size=self.store.volume_size,
            block_size=self.store.block_size,
            resume_seq=self.store.relay_call(lambda h: h.acked),
            queue_id=self.store.queue_id, lineage=lineage, barriers=True)
        client = LinkClient((self.spec.host, self.spec.port), self.identity, self.peers,
                            self.spec.name, config, self.source,
                            backoff=Backoff(maximum=self.backoff_max),
                            keepalive=self.keepalive, dead_after=self.dead_after,
                            offer_pairing=False)

        def on_event(event: SessionEvent) -> None:
            if isinstance(event, ResyncFinished) and not event.verify:
                self.last_resync = {"seq": event.seq, "chunks_compared": event.chunks_compared,
                                    "differing": len(event.differing),
                                    "finished_ns": time.time_ns()}
        client.listeners.append(on_event)
        return client

    def _ensure_pinned(self) -> None:
        """Pin the next remote's certificate if the spec gives its fingerprint and it is
        not pinned yet (it may be down: tried again from `tick`)."""
        spec = self.spec
        if spec.fingerprint is None or self.peers.get(spec.name) is not None:
            return
        now = time.monotonic()
        if now < self._pin_after:
            return
        self._pin_after = now + 10.0
        try:
            der = fetch_certificate(spec.host, spec.port, timeout=5.0)
            self.peers.pin(spec.name, der, spec.fingerprint)
        except (OSError, PeerNotPinned, TlsIdentityError) as exc:
            log.warning("relay of unit %s: cannot pin %s at %s:%d yet: %s",
                        self.store.unit_id, spec.name, spec.host, spec.port, exc)

    def start(self) -> None:
        self._ensure_pinned()
        self.client = self._make_client()
        self.client.start()

    def tick(self) -> None:
        """Called from the store's timer: a new generation of the unit (it adopted
        its local's fork) is announced to the next remote by a new session."""
        self._ensure_pinned()
        if self.client is not None and self.store.lineage.generation != self._generation:
            log.info("relay of unit %s: the unit's generation changed; reconnecting",
                     self.store.unit_id)
            self.client.stop()
            self.start()

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None

    def status(self) -> dict[str, Any]:
        hold = self.store.relay_call(lambda h: {
            "acked_seq": h.acked, "held_records": len(h.held), "held_bytes": h.held_bytes,
            "dirty_chunks": len(h.dirty | h.resyncing), "full_resync": h.full,
            "records_let_go": h.let_go})
        client = self.client
        paused = self.store.relay_paused()
        state = ("paused: " + paused if paused is not None
                 else "resyncing" if self.source.resync is not None
                 else "connected" if client is not None and client.connected else "retrying")
        return {"unit": self.spec.unit_id, "to": self.spec.name,
                "address": f"{self.spec.host}:{self.spec.port}", "state": state,
                "last_error": client.stats.last_error if client is not None else None,
                "applied_seq": self.store.last_applied_seq,
                "records_sent": self.source.records_sent,
                "resyncs_done": self.source.resyncs_done,
                "resync_chunks_sent": self.source.resync_chunks_sent,
                "resync": self.source.resync, "last_resync": self.last_resync, **hold}
