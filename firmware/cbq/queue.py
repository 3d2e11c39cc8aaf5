"""The circular buffer queue: an ordered, crash-safe log of volume writes.

Positions in the ring are *linear addresses*: ``lin = lap * ring_size + pos``.
They only grow, so "used" is ``head - tail`` and comparisons need no modular
arithmetic; the lap stored in each record is ``lin // ring_size``.

Durability rules the code keeps:
- a record is durable once the commit group holding it has been written and
  synced; consumers only ever see durable records;
- the superblock checkpoint never points past durable records, and space is
  reused only behind a *persisted* tail, so recovery never walks into records
  of a newer lap;
- groups start on `align` boundaries, so a later group never rewrites a
  sector of an earlier, acknowledged one.

Recovery reads the newest valid superblock and walks forward from its head
checkpoint (bounded by `checkpoint_bytes`), checking salt, lap, seq, CRC chain
and CRC; the first record that fails ends the log.

The queue ties together parts kept apart by role: `superblock` (geometry,
formatting, the checkpoint on disk), `reader` (the checked walk over the ring)
and `writer` (commit groups and their vectored writes).  Here live the cursors,
modes and space accounting that decide what is appended, read and reused.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..control.status import CbqStats, ConsumerStats
from .errors import CbqCorruption, CbqError, CbqFormatError, CbqUsageError
from .format import (
    BARRIER_IN_RESYNC,
    DIRTY_MAP_OFFSET,
    RECORD_ALIGN,
    WRITE_KINDS,
    Mode,
    RecordHeader,
    RecordKind,
    align_up,
    decode_header,
    encode_record,
    encode_superblock,
    record_crc_ok,
)
from .reader import HDR, NO_HEADER, RingReader
from .superblock import (
    MIRROR_CONSUMER,
    Geometry,
    create,
    older_format_slots,
    read_superblock,
    slot_offset,
)
from .writer import CommitGroup, write_buffers

__all__ = [
    "HDR", "MAX_DISCARDS", "MIRROR_CONSUMER", "NO_HEADER", "CircularBufferQueue",
    "CurrentReader", "Enqueued", "Geometry", "NeedsReclaim", "QueuedWrite", "create",
    "read_superblock",
]

log = logging.getLogger("mirrorunit.cbq")

#: Discarded seq ranges live in the superblock until every peer is past them.
MAX_DISCARDS = 32

#: Reads the volume's current contents of (lbn, nblocks), as the host would see them.
CurrentReader = Callable[[int, int], bytes]


@dataclass
class QueuedWrite:
    """A write as a consumer receives it."""

    seq: int
    timestamp_ns: int
    lbn: int
    nblocks: int
    data: bytes
    compact: bool
    #: No write but a BARRIER covering every write up to `seq`; `lbn`, `nblocks` are 0
    #: and `data` empty.
    barrier: bool = False
    #: For a barrier: its record's flags (see `format.barrier_flags`) and the front
    #: end's connection id.
    flags: int = 0
    connection: int = 0
    #: Blocks written by every seq up to `seq` (the record's running count).
    cum_blocks: int = 0


@dataclass(frozen=True)
class Enqueued:
    seq: int | None  # None: the write went to the dirty map only
    carries_data: bool


@dataclass
class _Consumer:
    name: str
    acked_seq: int  # every seq <= acked_seq is acknowledged
    acked_lin: int  # where the first unacknowledged record starts
    acked_cum: int
    needs_resync: bool = False
    read_seq: int = 0  # last seq delivered by read()
    read_lin: int = 0
    delivered: deque[tuple[int, int, int]] = field(default_factory=deque)  # seq, end lin, cum
    sent_records: int = 0

    @property
    def internal(self) -> bool:
        return self.name.startswith("@")


class NeedsReclaim(CbqError):
    """The ring is held by the local mirror's checkpoint, not by a peer.

    The volume must make its mirror durable (and ack MIRROR_CONSUMER) and retry;
    no state was changed.
    """


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class CircularBufferQueue:
    """An open CBQ.  Thread-safe; writers and consumers may run in different threads."""

    def __init__(self, storage: Any, *, current_reader: CurrentReader | None = None,
                 checkpoint_bytes: int | None = None, read_only: bool = False) -> None:
        self.storage = storage
        self.read_only = read_only
        #: Reads the volume's current contents (copy-on-overwrite, compact records);
        #: the volume that owns the mirror sets it.
        self.current_reader = current_reader
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._committing = False
        self._pending = CommitGroup()
        self._inflight = CommitGroup()  # the group being written by a commit in progress
        self._gen, state, problems = read_superblock(storage)
        for p in problems:
            log.warning("cbq: %s (using the other slot)", p)
        try:
            self.geo = Geometry(**state["geometry"])
        except TypeError as e:
            raise CbqFormatError(f"bad geometry in superblock: {e}") from e
        g = self.geo
        if g.ring_start + g.ring_size > storage.size:
            raise CbqFormatError(
                f"ring ends at {g.ring_start + g.ring_size}, storage has {storage.size} bytes")
        self._ring = RingReader(g, storage, self._unwritten)
        self.checkpoint_bytes = checkpoint_bytes or max(g.align, min(g.ring_size // 16, 64 << 20))
        self.high_water: float = state["high_water"]
        self.low_water: float = state["low_water"]
        self.mode = Mode(state["mode"])
        self.enqueue_paused: bool = state["paused"]["enqueue"]
        self.dequeue_paused: bool = state["paused"]["dequeue"]
        self.discards: list[tuple[int, int]] = [tuple(r) for r in state["discards"]]  # type: ignore[misc]
        self.dirty_active: bool = state["dirty_active"]
        self.consumers: dict[str, _Consumer] = {}
        for name, c in state["consumers"].items():
            self.consumers[name] = _Consumer(name, c["seq"], c["lin"], c["cum"], c["resync"],
                                             c["seq"], c["lin"])
        h = state["head"]
        self._tail_lin_persisted = state["tail"]["lin"]
        self._tail_seq_persisted = state["tail"]["seq"]
        self._head_lin = h["lin"]
        self._next_seq = h["seq"]
        self._prev_crc = h["prev_crc"]
        self._cum = h["cum"]
        self._compact_from: int | None = state["compact_from"]
        self._dirty = bytearray(storage.pread(DIRTY_MAP_OFFSET, g.dirty_map_bytes))
        self._dirty_pages: set[int] = set()
        # In-memory indexes rebuilt from the log: COMPACT records still queued, blocks whose
        # newest queued write is a COMPACT record not yet copied aside, SIDE records by ref seq.
        self._compact_q: deque[tuple[int, int, int]] = deque()  # seq, lbn, nblocks
        # Where each write record appended by this process ends (seq, end lin, cum blocks),
        # so an acknowledgement of a record nobody read here needs no walk.
        self._ends: deque[tuple[int, int, int]] = deque()
        self._unprotected: dict[int, int] = {}  # lbn -> seq
        self._side: dict[int, list[tuple[int, int, int]]] = {}  # ref seq -> [(lbn, n, lin)]
        self.transitions: list[tuple[int, str, str]] = []
        self._since_checkpoint = 0
        self.stats_appended = 0
        self.stats_barriers = 0
        self.recovered_records = 0
        self.recovery_seconds = 0.0
        self.stats_barriers_unrecorded = 0
        t0 = time.monotonic()
        self._recover(state)
        self.recovery_seconds = time.monotonic() - t0
        if not read_only and older_format_slots(storage):
            # Both slots in this version before a barrier can be appended: firmware that
            # knows no barriers then refuses the queue instead of opening an old slot.
            with self._lock:
                self._checkpoint_locked()
                self._checkpoint_locked()

    def _unwritten(self, lin: int, n: int) -> bytes | None:
        got = self._pending.read(lin, n)
        return got if got is not None else self._inflight.read(lin, n)

    # ------------------------------------------------------------------ recovery

    def _recover(self, state: dict[str, Any]) -> None:
        # Whatever a previous process left in the page cache must be on the medium
        # before we build on it: a power cut later must not un-happen records we replay.
        if not self.read_only:
            self.storage.sync()
        tail_lin = self._tail_lin()
        if self._compact_from is not None:
            for lin, h, _ in self._ring.walk(max(self._compact_from, tail_lin), self._head_lin):
                self._index_record(h, lin)
        lin = self._head_lin
        found = 0
        for lin_, h, _ in self._ring.walk_new(lin, self._next_seq, self._prev_crc,
                                                self._tail_lin_persisted + self.geo.ring_size):
            self._index_record(h, lin_)
            self._prev_crc = h.crc
            if h.kind in WRITE_KINDS:
                self._next_seq = h.seq + 1
                self._cum = h.cum_blocks
            lin = self._ring.next_lin(lin_, h)
            found += 1
        self.recovered_records = found
        # New groups start on a fresh `align` boundary (see module docstring).
        self._head_lin = self._ring.aligned(lin)
        self._durable_lin = self._head_lin
        self._durable_seq = self._next_seq - 1
        if found:
            log.info("cbq: recovered %d records past the checkpoint; head seq %d",
                     found, self._next_seq - 1)
        self._rebuild_tail()
        for c in self.consumers.values():
            c.read_seq, c.read_lin = c.acked_seq, c.acked_lin

    def _index_record(self, h: RecordHeader, lin: int) -> None:
        if h.kind is RecordKind.COMPACT:
            self._compact_q.append((h.seq, h.lbn, h.nblocks))
            for b in range(h.lbn, h.lbn + h.nblocks):
                self._unprotected[b] = h.seq
            if self._compact_from is None:
                self._compact_from = lin
        elif h.kind is RecordKind.SIDE:
            self._side.setdefault(h.ref_seq, []).append((h.lbn, h.nblocks, lin))
            for b in range(h.lbn, h.lbn + h.nblocks):
                if self._unprotected.get(b) == h.ref_seq:
                    del self._unprotected[b]
        elif h.kind is RecordKind.DATA:
            pass

    # ------------------------------------------------------------------ tail and space

    def _peers(self) -> list[_Consumer]:
        return [c for c in self.consumers.values() if not c.internal]

    def _tail_lin(self) -> int:
        return min(c.acked_lin for c in self.consumers.values())

    def _tail_seq(self) -> int:
        return min(c.acked_seq for c in self.consumers.values()) + 1

    def _rebuild_tail(self) -> None:
        tail = self._tail_seq()
        while self._ends and self._ends[0][0] < tail:
            self._ends.popleft()
        self._drop_protection()

    def _drop_protection(self) -> None:
        # Copy-on-overwrite protection is dropped only behind the *persisted* tail: an
        # acknowledgement not yet checkpointed is forgotten by a crash, and the record
        # would then be sent again and must still carry its own data.
        tail_seq = min(self._tail_seq(), self._tail_seq_persisted)
        while self._compact_q and self._compact_q[0][0] < tail_seq:
            seq, lbn, n = self._compact_q.popleft()
            for b in range(lbn, lbn + n):
                if self._unprotected.get(b) == seq:
                    del self._unprotected[b]
        for ref in [r for r in self._side if r < tail_seq]:
            del self._side[ref]
        if not self._compact_q and not self._side:
            self._compact_from = None

    def _used(self) -> int:
        return self._head_lin - self._tail_lin()

    def _placement(self, lengths: list[int]) -> int:
        """Head after placing records of `lengths` (wrap waste included)."""
        g = self.geo
        lin = self._head_lin
        for n in lengths:
            pos = lin % g.ring_size
            if pos + n > g.ring_size:
                lin = align_up(lin + 1, g.ring_size)
            lin += n
            if g.ring_size - lin % g.ring_size < HDR and lin % g.ring_size:
                lin = align_up(lin, g.ring_size)
        return lin

    def _fits(self, lengths: list[int]) -> tuple[bool, bool]:
        """(fits behind the persisted tail, fits behind the in-memory tail)."""
        end = self._placement(lengths) + self.geo.align  # room for the group's padding
        return (end <= self._tail_lin_persisted + self.geo.ring_size,
                end <= self._tail_lin() + self.geo.ring_size)

    def _ensure_space(self, lengths: list[int]) -> bool:
        persisted_ok, mem_ok = self._fits(lengths)
        if persisted_ok:
            return True
        if mem_ok:
            self._checkpoint_locked()
            return True
        return False

    def _mirror_blocks(self) -> bool:
        """True when the local mirror's checkpoint, not a peer, holds the oldest space."""
        mirror = self.consumers[MIRROR_CONSUMER].acked_lin
        return mirror < min((c.acked_lin for c in self._peers()), default=self._durable_lin)

    # ------------------------------------------------------------------ appending

    def _append(self, kind: RecordKind, lbn: int, nblocks: int,
                payload: bytes | bytearray | memoryview = b"", ref_seq: int = 0,
                flags: int = 0) -> int:
        g = self.geo
        length = align_up(HDR + len(payload), RECORD_ALIGN)
        pos = self._head_lin % g.ring_size
        if pos + length > g.ring_size:
            wrap = RecordHeader(RecordKind.WRAP, (self._head_lin // g.ring_size) & 0xFFFFFFFF,
                                g.salt, self._next_seq - 1, time.time_ns(), 0, 0, 0, 0,
                                self._cum, self._prev_crc)
            raw, crc = encode_record(wrap)
            self._pending.add(self._head_lin, raw)
            self._prev_crc = crc
            self._head_lin = align_up(self._head_lin + 1, g.ring_size)
        seq = self._next_seq if kind in WRITE_KINDS else self._next_seq - 1
        cum = self._cum + (nblocks if kind in WRITE_KINDS else 0)
        h = RecordHeader(kind, (self._head_lin // g.ring_size) & 0xFFFFFFFF, g.salt, seq,
                         time.time_ns(), lbn, nblocks, len(payload), ref_seq, cum,
                         self._prev_crc, 0, flags)
        raw, crc = encode_record(h, payload)
        lin = self._head_lin
        self._pending.add(lin, raw)
        if payload:
            self._pending.add(lin + HDR, payload)
        pad = length - HDR - len(payload)
        if pad:
            self._pending.add(lin + HDR + len(payload), bytes(pad))
        self._prev_crc = crc
        self._head_lin = lin + length
        if g.ring_size - self._head_lin % g.ring_size < HDR and self._head_lin % g.ring_size:
            self._head_lin = align_up(self._head_lin, g.ring_size)
        if kind in WRITE_KINDS:
            self._next_seq += 1
            self._cum = cum
            self._ends.append((seq, self._head_lin, cum))
            self.stats_appended += 1
        self._index_record(h, lin)
        self._since_checkpoint += length
        return seq

    def append_write(self, lbn: int, data: bytes | bytearray | memoryview) -> Enqueued:
        """Queue a write of the volume.

        The result says whether the record carries the data.  When it does not (a
        COMPACT record, or the write only marked the dirty map), the caller must make
        the data durable in the local mirror before acknowledging the write.

        Copy-on-overwrite runs first: blocks whose newest queued write is a COMPACT
        record get their current contents copied into SIDE records, so that record
        still sends what was written then.  The caller must not let the new data be
        visible to `current_reader` until this returns.
        """
        g = self.geo
        if len(data) == 0 or len(data) % g.block_size:
            raise CbqUsageError(f"write of {len(data)} bytes is not whole blocks")
        nblocks = len(data) // g.block_size
        # The group holds a reference until it is written: it must not change under us.
        data = data if isinstance(data, bytes) else bytes(data)
        if lbn < 0 or lbn + nblocks > g.volume_blocks:
            raise CbqUsageError(f"write {lbn}+{nblocks} outside volume of {g.volume_blocks}")
        if self.read_only:
            raise CbqUsageError("queue is open read-only")
        with self._lock:
            if self.mode is Mode.OVERFLOW or self.enqueue_paused:
                self._mark_dirty(lbn, nblocks)
                return Enqueued(None, False)
            sides = self._cow_ranges(lbn, nblocks)
            side_lengths = [align_up(HDR + n * g.block_size, RECORD_ALIGN) for _, n, _ in sides]
            data_len = align_up(HDR + len(data), RECORD_ALIGN)
            compact_len = align_up(HDR, RECORD_ALIGN)
            fill_after = (self._used() + data_len) / g.ring_size
            kind: RecordKind | None = None
            if self.mode is Mode.NORMAL and fill_after < self.high_water:
                if self._ensure_space(side_lengths + [data_len]):
                    kind = RecordKind.DATA
                elif self._mirror_blocks():
                    raise NeedsReclaim(MIRROR_CONSUMER)
            if kind is None:
                if self._ensure_space(side_lengths + [compact_len]):
                    kind = RecordKind.COMPACT
                elif self._mirror_blocks():
                    raise NeedsReclaim(MIRROR_CONSUMER)
                else:
                    self._enter_overflow(lbn, nblocks)
                    return Enqueued(None, False)
            if kind is RecordKind.COMPACT and self.mode is Mode.NORMAL:
                why = (f"fill {fill_after:.0%} reached the high-water mark {self.high_water:.0%}"
                       if fill_after >= self.high_water else "no room for a data record")
                self._transition(Mode.COMPACT, why)
            for (s_lbn, s_n, ref) in sides:
                assert self.current_reader is not None
                before = self.current_reader(s_lbn, s_n)
                self._append(RecordKind.SIDE, s_lbn, s_n, before, ref_seq=ref)
            if kind is RecordKind.DATA:
                return Enqueued(self._append(RecordKind.DATA, lbn, nblocks, data), True)
            return Enqueued(self._append(RecordKind.COMPACT, lbn, nblocks), False)

    def append_barrier(self, flags: int, connection: int = 0) -> int | None:
        """Record that the host declared every write so far durable; return the seq covered.

        `flags` is `format.barrier_flags(...)`; `connection` the front end's id of the
        connection the command came on (kept in the record's `ref_seq`).  While a peer
        still needs a checksum resync the record carries BARRIER_IN_RESYNC.

        None when nothing is recorded: no write queued yet, or the queue is in overflow or
        paused (the dirty map, not the log, then holds what peers need, and no instant
        inside it is consistent until the resync completes).
        """
        if self.read_only:
            raise CbqUsageError("queue is open read-only")
        if not 0 <= flags <= 0xFFFF or not 0 <= connection < 1 << 64:
            raise CbqUsageError(f"barrier flags {flags:#x} / connection {connection} out of range")
        with self._lock:
            if self.mode is Mode.OVERFLOW or self.enqueue_paused or self._next_seq <= 1:
                self.stats_barriers_unrecorded += 1
                return None
            if not self._ensure_space([align_up(HDR, RECORD_ALIGN)]):
                self.stats_barriers_unrecorded += 1
                return None
            if self.dirty_active or any(p.needs_resync for p in self._peers()):
                flags |= BARRIER_IN_RESYNC
            self.stats_barriers += 1
            return self._append(RecordKind.BARRIER, 0, 0, ref_seq=connection, flags=flags)

    def barriers(self) -> list[tuple[int, int, int]]:
        """(seq covered, timestamp_ns, flags) of every durable barrier still queued."""
        with self._lock:
            return [(h.seq, h.timestamp_ns, h.flags)
                    for _, h, _ in self._ring.walk(self._tail_lin(), self._durable_lin)
                    if h.kind is RecordKind.BARRIER]

    def _cow_ranges(self, lbn: int, nblocks: int) -> list[tuple[int, int, int]]:
        """Runs of blocks in the range whose newest queued write is an unprotected COMPACT."""
        if not self._unprotected:
            return []
        runs: list[tuple[int, int, int]] = []
        for b in range(lbn, lbn + nblocks):
            ref = self._unprotected.get(b)
            if ref is None:
                continue
            if runs and runs[-1][2] == ref and runs[-1][0] + runs[-1][1] == b:
                s_lbn, s_n, _ = runs[-1]
                runs[-1] = (s_lbn, s_n + 1, ref)
            else:
                runs.append((b, 1, ref))
        if runs and self.current_reader is None:
            raise CbqUsageError("copy-on-overwrite needs a current_reader")
        return runs

    def _transition(self, mode: Mode, why: str) -> None:
        old = self.mode
        self.mode = mode
        self.transitions.append((time.time_ns(), f"{old.value}->{mode.value}", why))
        log.warning("cbq: mode %s -> %s: %s", old.value, mode.value, why)

    # ------------------------------------------------------------------ overflow / dirty map

    def _mark_dirty(self, lbn: int, nblocks: int) -> None:
        g = self.geo
        first = lbn * g.block_size // g.chunk_size
        last = ((lbn + nblocks) * g.block_size - 1) // g.chunk_size
        for chunk in range(first, last + 1):
            byte, bit = divmod(chunk, 8)
            if not self._dirty[byte] & (1 << bit):
                self._dirty[byte] |= 1 << bit
                self._dirty_pages.add(byte // 4096)
        if self.enqueue_paused:
            for peer in self._peers():
                peer.needs_resync = True
        self.dirty_active = True

    def _enter_overflow(self, lbn: int, nblocks: int) -> None:
        """Collapse what peers still need into the dirty map; they will resync by checksum."""
        peers = self._peers()
        start = min((c.acked_lin for c in peers), default=self._head_lin)
        marked = 0
        for _, h, _ in self._ring.walk(start, self._head_lin):
            if h.kind in WRITE_KINDS:
                self._mark_dirty(h.lbn, h.nblocks)
                marked += 1
        self._mark_dirty(lbn, nblocks)
        # The map must be durable before any peer cursor skips what it replaces.
        self._sync_locked()
        for c in peers:
            c.needs_resync = True
            c.acked_seq, c.acked_lin, c.acked_cum = self._next_seq - 1, self._durable_lin, self._cum
            c.read_seq, c.read_lin = c.acked_seq, c.acked_lin
            c.delivered.clear()
        self._transition(Mode.OVERFLOW, f"ring full; {marked} queued writes folded into the "
                                        "dirty map; peers need a checksum resync")
        self._rebuild_tail()
        self._checkpoint_locked()

    def dirty_chunks(self) -> list[int]:
        with self._lock:
            return self._dirty_list()

    def _dirty_list(self) -> list[int]:
        return [i * 8 + b for i, v in enumerate(self._dirty) if v
                for b in range(8) if v & (1 << b) and i * 8 + b < self.geo.chunks]

    def begin_resync(self) -> list[int]:
        """Leave overflow: return the dirty chunks and queue new writes again.

        The map is kept until every peer that needed a resync called resync_done().
        """
        with self._lock:
            chunks = self._dirty_list()
            if self.mode is Mode.OVERFLOW:
                self._transition(Mode.NORMAL, "checksum resync started; queuing resumes")
                self._checkpoint_locked()
            return chunks

    def resync_done(self, name: str) -> None:
        with self._lock:
            c = self._consumer(name)
            c.needs_resync = False
            if self.mode is not Mode.OVERFLOW and not any(p.needs_resync for p in self._peers()):
                self.dirty_active = False
                self._checkpoint_locked()
                self._dirty = bytearray(len(self._dirty))
                self.storage.pwrite(DIRTY_MAP_OFFSET, self._dirty)
                self.storage.sync()
                self._dirty_pages.clear()
            else:
                self._checkpoint_locked()

    # ------------------------------------------------------------------ durability

    def sync(self) -> int:
        """Make every record appended so far durable (group commit); return durable seq."""
        with self._lock:
            return self._sync_locked()

    def _sync_locked(self) -> int:
        target = self._head_lin
        want_dirty = bool(self._dirty_pages)
        while self._durable_lin < target or (want_dirty and self._dirty_pages):
            if self._committing:
                self._cond.wait()
                continue
            self._committing = True
            pending, self._pending = self._pending, CommitGroup()
            self._inflight = pending
            end = self._ring.aligned(self._head_lin)
            if end != self._head_lin and pending.segments:
                pad = end - self._head_lin
                # Padding is written too so the group covers whole sectors.
                if self._head_lin % self.geo.ring_size + pad <= self.geo.ring_size:
                    pending.add(self._head_lin, bytes(pad))
            self._head_lin = end
            pages = sorted(self._dirty_pages)
            self._dirty_pages = set()
            dirty = bytes(self._dirty)
            seq_after = self._next_seq - 1
            self._lock.release()
            try:
                for seg in pending.segments:
                    write_buffers(self.storage, self._ring.offset(seg.start), seg.buffers)
                for p in pages:
                    self.storage.pwrite(DIRTY_MAP_OFFSET + p * 4096, dirty[p * 4096:(p + 1) * 4096])
                self.storage.sync()
            finally:
                self._lock.acquire()
                self._committing = False
                self._inflight = CommitGroup()
                self._cond.notify_all()
            self._durable_lin = max(self._durable_lin, end)
            self._durable_seq = max(self._durable_seq, seq_after)
            # Pending records written above are readable from storage from now on; any
            # group appended meanwhile is in self._pending.
        if self._since_checkpoint >= self.checkpoint_bytes:
            self._checkpoint_locked()
        return self._durable_seq

    @property
    def generation(self) -> int:
        """Generation of the newest superblock checkpoint."""
        return self._gen

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def checkpoint(self) -> None:
        with self._lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        # Only durable state goes into a checkpoint; records past it are found by the walk.
        while self._committing:
            self._cond.wait()
        head_lin, head = self._durable_head_state()
        tail_lin = min(self._tail_lin(), head_lin)
        tail_seq = self._tail_seq()
        state = {
            "geometry": self.geo.to_cbor(),
            "head": head,
            "tail": {"lin": tail_lin, "seq": tail_seq},
            "mode": self.mode.value,
            "high_water": self.high_water,
            "low_water": self.low_water,
            "consumers": {
                c.name: {"seq": c.acked_seq, "lin": c.acked_lin, "cum": c.acked_cum,
                         "resync": c.needs_resync}
                for c in self.consumers.values()
            },
            "compact_from": self._compact_from,
            "discards": [list(r) for r in self.discards],
            "dirty_active": self.dirty_active,
            "paused": {"enqueue": self.enqueue_paused, "dequeue": self.dequeue_paused},
            "time_ns": time.time_ns(),
        }
        self._gen += 1
        self.storage.pwrite(slot_offset(self._gen),
                            encode_superblock(self._gen, cbor2.dumps(state)))
        self.storage.sync()
        self._tail_lin_persisted = tail_lin
        self._tail_seq_persisted = tail_seq
        self._since_checkpoint = 0
        self._rebuild_tail()

    def _durable_head_state(self) -> tuple[int, dict[str, int]]:
        # The durable head: everything before _durable_lin is on the medium.  The chain
        # value and counters at that point are those of the last durable record.
        if self._pending.segments:
            first_lin = self._pending.segments[0].start
            raw = self._pending.read(first_lin, HDR)
            h = decode_header(raw) if raw else None
            if h is not None:
                seq = h.seq if h.kind in WRITE_KINDS else h.seq + 1
                return first_lin, {"lin": first_lin, "seq": seq, "prev_crc": h.prev_crc,
                                   "cum": h.cum_blocks - (h.nblocks if h.kind in WRITE_KINDS
                                                          else 0)}
        return self._head_lin, {"lin": self._head_lin, "seq": self._next_seq,
                                "prev_crc": self._prev_crc, "cum": self._cum}

    # ------------------------------------------------------------------ consumers

    def _consumer(self, name: str) -> _Consumer:
        try:
            return self.consumers[name]
        except KeyError:
            raise CbqUsageError(f"unknown consumer {name!r}") from None

    def add_consumer(self, name: str) -> None:
        """A new peer starts at the current head and needs a full resync to catch up."""
        with self._lock:
            if name in self.consumers:
                raise CbqUsageError(f"consumer {name!r} exists")
            if not name or len(name) > 64:
                raise CbqUsageError("consumer name must be 1..64 characters")
            self._sync_locked()
            self.consumers[name] = _Consumer(name, self._next_seq - 1, self._durable_lin,
                                             self._cum, needs_resync=not name.startswith("@"),
                                             read_seq=self._next_seq - 1,
                                             read_lin=self._durable_lin)
            self._checkpoint_locked()

    def remove_consumer(self, name: str) -> None:
        with self._lock:
            if self._consumer(name).internal:
                raise CbqUsageError(f"consumer {name!r} belongs to the unit itself")
            del self.consumers[name]
            self._rebuild_tail()
            self._checkpoint_locked()

    def _discarded(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self.discards)

    def read(self, name: str, max_records: int = 64,
             max_bytes: int = 8 << 20, *, barriers: bool = False) -> list[QueuedWrite]:
        """Next durable writes for a consumer, in seq order, from its read cursor.

        With `barriers`, the BARRIER records among them too, where they stand in the log
        (a barrier's seq is that of the write before it); a peer's cursor passes a barrier
        once it acknowledges a later seq, so one may be read again after a rewind."""
        with self._lock:
            c = self._consumer(name)
            if self.dequeue_paused and not c.internal:
                return []
            out: list[QueuedWrite] = []
            size = 0
            try:
                for rlin, h, payload in self._ring.walk(c.read_lin, self._durable_lin,
                                                   with_payload=True):
                    if len(out) >= max_records or size >= max_bytes:
                        break
                    lin = self._ring.next_lin(rlin, h)
                    if h.kind is RecordKind.BARRIER and barriers and not c.internal:
                        c.read_lin = lin
                        if not self._discarded(h.seq):
                            out.append(QueuedWrite(h.seq, h.timestamp_ns, 0, 0, b"", False,
                                                   barrier=True, flags=h.flags,
                                                   connection=h.ref_seq,
                                                   cum_blocks=h.cum_blocks))
                        continue
                    if h.kind not in WRITE_KINDS:
                        continue
                    c.read_seq, c.read_lin = h.seq, lin
                    c.delivered.append((h.seq, lin, h.cum_blocks))
                    if not c.internal and self._discarded(h.seq):
                        continue
                    if h.kind is RecordKind.COMPACT and not c.internal:
                        payload = self._compact_data(h)
                    out.append(QueuedWrite(h.seq, h.timestamp_ns, h.lbn, h.nblocks, payload,
                                           h.kind is RecordKind.COMPACT,
                                           cum_blocks=h.cum_blocks))
                    size += len(payload)
            except CbqCorruption as e:
                if c.internal:
                    raise
                self._resync_after_corruption(c, e)
                return []
            c.sent_records += len(out)
            return out

    def _resync_after_corruption(self, c: _Consumer, e: CbqCorruption) -> None:
        """A queued record cannot be read back: this peer catches up by checksum resync.

        Which blocks the bad record held is unknown, so every chunk is marked; the
        resync exchanges digests and sends only chunks that differ.
        """
        log.error("cbq: %s; peer %s will catch up by a full checksum resync", e, c.name)
        full, rest = divmod(self.geo.chunks, 8)
        self._dirty[:full] = b"\xff" * full
        if rest:
            self._dirty[full] |= (1 << rest) - 1
        self._dirty_pages.update(range(-(-len(self._dirty) // 4096)))
        self.dirty_active = True
        self._sync_locked()
        c.needs_resync = True
        c.acked_seq, c.acked_lin, c.acked_cum = self._durable_seq, self._durable_lin, self._cum
        c.read_seq, c.read_lin = c.acked_seq, c.acked_lin
        c.delivered.clear()
        self.transitions.append((time.time_ns(), f"peer {c.name}: resync",
                                 f"unreadable queued record: {e}"))
        self._rebuild_tail()
        self._checkpoint_locked()

    def _compact_data(self, h: RecordHeader) -> bytes:
        """The data a COMPACT record stands for: its SIDE copies, else the current contents."""
        bs = self.geo.block_size
        assert self.current_reader is not None, "compact records need a current_reader"
        buf = bytearray(self.current_reader(h.lbn, h.nblocks))
        for s_lbn, s_n, s_lin in self._side.get(h.seq, []):
            raw = self._ring.read(s_lin, HDR)
            sh = decode_header(raw)
            payload = self._ring.read(s_lin + HDR, s_n * bs)
            if sh is None or not record_crc_ok(raw, payload):
                raise CbqCorruption(f"side copy for seq {h.seq} unreadable",
                                    self._ring.offset(s_lin))
            lo = max(s_lbn, h.lbn)
            hi = min(s_lbn + s_n, h.lbn + h.nblocks)
            if lo < hi:
                buf[(lo - h.lbn) * bs:(hi - h.lbn) * bs] = payload[(lo - s_lbn) * bs:
                                                                   (hi - s_lbn) * bs]
        return bytes(buf)

    def ack(self, name: str, seq: int) -> None:
        """Every seq <= `seq` is durable at the consumer; its space may be reused."""
        with self._lock:
            c = self._consumer(name)
            if seq <= c.acked_seq:
                return
            if seq > self._durable_seq:
                raise CbqUsageError(f"{name}: ack of seq {seq} beyond durable seq "
                                    f"{self._durable_seq}")
            while c.delivered and (c.delivered[0][0] <= seq or (
                    not c.internal and self._discarded(c.delivered[0][0]))):
                # Discarded writes right after the ack were never sent; they go with it.
                s, lin, cum = c.delivered.popleft()
                c.acked_seq, c.acked_lin, c.acked_cum = s, lin, cum
            if c.acked_seq < seq and self._ends and self._ends[0][0] <= c.acked_seq + 1:
                i = bisect.bisect_right(self._ends, (seq, float("inf"), 0)) - 1
                c.acked_seq, c.acked_lin, c.acked_cum = self._ends[i]
            if c.acked_seq < seq:
                # Acknowledged without being read here (a peer that applied it before we
                # restarted): find where it ends.
                for rlin, h, _ in self._ring.walk(c.acked_lin, self._durable_lin):
                    if h.kind in WRITE_KINDS and h.seq <= seq:
                        c.acked_seq, c.acked_lin = h.seq, self._ring.next_lin(rlin, h)
                        c.acked_cum = h.cum_blocks
                    if c.acked_seq >= seq:
                        break
            if c.read_seq < c.acked_seq:
                c.read_seq, c.read_lin = c.acked_seq, c.acked_lin
                c.delivered.clear()
            self._rebuild_tail()
            self.discards = [(lo, hi) for lo, hi in self.discards if hi >= self._tail_seq()]
            if self.mode is Mode.COMPACT and self._used() / self.geo.ring_size < self.low_water:
                self._transition(Mode.NORMAL, f"fill below low-water mark "
                                              f"{self.low_water:.0%}")

    def rewind(self, name: str) -> int:
        """Resend from the first unacknowledged seq; returns the last acked seq."""
        with self._lock:
            c = self._consumer(name)
            c.read_seq, c.read_lin = c.acked_seq, c.acked_lin
            c.delivered.clear()
            return c.acked_seq

    def discard(self, lo: int, hi: int) -> int:
        """Drop queued writes lo..hi (inclusive) from what peers will be sent."""
        with self._lock:
            if lo > hi or lo < 1 or hi > self._next_seq - 1:
                raise CbqUsageError(f"seq range {lo}..{hi} not within 1..{self._next_seq - 1}")
            merged = _merge_ranges([*self.discards, (lo, hi)])
            if len(merged) > MAX_DISCARDS:
                raise CbqUsageError(f"{MAX_DISCARDS} discarded ranges are already pending; "
                                    "wait for peers to pass them")
            self.discards = merged
            self._checkpoint_locked()
            log.warning("cbq: discarded seqs %d..%d from what peers will be sent", lo, hi)
            return hi - lo + 1

    def set_paused(self, *, enqueue: bool | None = None, dequeue: bool | None = None) -> None:
        with self._lock:
            if enqueue is not None and enqueue != self.enqueue_paused:
                self.enqueue_paused = enqueue
                log.warning("cbq: enqueue %s%s", "stopped" if enqueue else "restarted",
                            "; writes are tracked in the dirty map" if enqueue else "")
            if dequeue is not None and dequeue != self.dequeue_paused:
                self.dequeue_paused = dequeue
                log.warning("cbq: dequeue %s", "stopped" if dequeue else "restarted")
            self._sync_locked()
            self._checkpoint_locked()

    def replay(self, name: str) -> Iterator[tuple[int, RecordHeader, bytes]]:
        """Durable records after a consumer's ack, raw (used to redo the local mirror)."""
        with self._lock:
            c = self._consumer(name)
            records = list(self._ring.walk(c.acked_lin, self._durable_lin, with_payload=True))
        return iter(records)

    # ------------------------------------------------------------------ status

    def stats(self) -> CbqStats:
        with self._lock:
            g = self.geo
            tail_lin = self._tail_lin()
            consumers: dict[str, ConsumerStats] = {}
            for c in self.consumers.values():
                oldest = self._timestamp_at(c.acked_lin)
                consumers[c.name] = {
                    "acked_seq": c.acked_seq,
                    "sent_seq": c.read_seq,
                    "sent_records": c.sent_records,
                    "pending_records": self._next_seq - 1 - c.acked_seq,
                    "pending_blocks": self._cum - c.acked_cum,
                    "pending_bytes": (self._cum - c.acked_cum) * g.block_size,
                    "oldest_pending_ns": oldest,
                    "needs_resync": c.needs_resync,
                }
            peers = [v for k, v in consumers.items() if not k.startswith("@")]
            return {
                "mode": self.mode.value,
                "ring_bytes": g.ring_size,
                "used_bytes": self._head_lin - tail_lin,
                "fill": (self._head_lin - tail_lin) / g.ring_size,
                "high_water": self.high_water,
                "low_water": self.low_water,
                "last_seq": self._next_seq - 1,
                "durable_seq": self._durable_seq,
                "queued_records": max((p["pending_records"] for p in peers), default=0),
                "queued_blocks": max((p["pending_blocks"] for p in peers), default=0),
                "queued_bytes": max((p["pending_bytes"] for p in peers), default=0),
                "oldest_queued_ns": min((p["oldest_pending_ns"] for p in peers
                                         if p["oldest_pending_ns"]), default=None),
                "consumers": consumers,
                "enqueue_paused": self.enqueue_paused,
                "dequeue_paused": self.dequeue_paused,
                "dirty_chunks": sum(bin(b).count("1") for b in self._dirty),
                "discards": [list(r) for r in self.discards],
                "transitions": [{"time_ns": t, "change": c, "why": w}
                                for t, c, w in self.transitions[-16:]],
                "recovery_seconds": self.recovery_seconds,
                "barriers": self.stats_barriers,
                "barriers_unrecorded": self.stats_barriers_unrecorded,
            }

    def _timestamp_at(self, lin: int) -> int | None:
        try:
            for _, h, _ in self._ring.walk(lin, self._durable_lin):
                if h.kind in WRITE_KINDS:
                    return h.timestamp_ns
        except OSError:
            pass  # the buffer's disk is gone: statistics still answer, without it
        return None

    def close(self) -> None:
        if self.read_only:
            return
        with self._lock:
            self._sync_locked()
            self._checkpoint_locked()

    def verify(self) -> dict[str, Any]:
        """Check every queued record in full: shape, salt, lap, CRC, seq order and chain.

        Returns a report; `clean` is False when a record between the tail and the head
        fails a check, with the first bad one's offset and reason.
        """
        with self._lock:
            counts = {k.name.lower(): 0 for k in RecordKind}
            report: dict[str, Any] = {"clean": True, "first_bad": None}
            prev: RecordHeader | None = None
            last_seq = None
            try:
                for lin, h, _ in self._ring.walk(self._tail_lin(), self._durable_lin):
                    counts[h.kind.name.lower()] += 1
                    if prev is not None and h.prev_crc != prev.crc:
                        raise CbqCorruption(f"seq {h.seq}: CRC chain broken",
                                            self._ring.offset(lin))
                    if h.kind in WRITE_KINDS:
                        if last_seq is not None and h.seq != last_seq + 1:
                            raise CbqCorruption(f"seq {h.seq} follows {last_seq}",
                                                self._ring.offset(lin))
                        last_seq = h.seq
                    prev = h
                if last_seq is not None and last_seq != self._next_seq - 1:
                    raise CbqCorruption(f"log ends at seq {last_seq}, head says "
                                        f"{self._next_seq - 1}",
                                        self._ring.offset(self._durable_lin))
            except CbqCorruption as e:
                report["clean"] = False
                report["first_bad"] = {"offset": e.offset, "reason": str(e)}
            report["records"] = counts
            report["tail_offset"] = self._ring.offset(self._tail_lin())
            report["head_offset"] = self._ring.offset(self._head_lin)
            report["recovered_past_checkpoint"] = self.recovered_records
            return report
