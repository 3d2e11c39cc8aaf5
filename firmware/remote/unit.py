"""One virtual remote unit: receive journal -> mirror image, with point-in-time history.

Write path (the link's `WriteSink`):

1. `apply(records)` appends the records to the receive journal and syncs it; that
   sync is what makes a seq durable (and what the link acknowledges).
2. Records are moved to the mirror in seq order once due (at once, or `commit
   delay` after their timestamp): the before-images of the blocks they overwrite
   go to the history journal, which is synced *before* the mirror is written,
   then the mirror is written and synced.
3. Now and then a checkpoint saves the state file (last applied seq, history
   floor...) and deletes journal segments nothing needs any more.

Recovery: after a crash the history journal's tail says which seqs had their
before-images made durable beyond the last checkpoint; those writes may have
reached the mirror partly, so they are written again from the receive journal
(idempotent: the same data in the same order).  Records whose before-images
never became durable never touched the mirror, and a torn journal tail is cut
off by its CRC, so nothing torn is ever applied.

Point in time: every history entry has an *after point* (seq, ts): the state
of the mirror right after it.  Walking the history newest-first from the
current mirror and undoing entries whose point lies after the target gives the
image at the target; `PointInTimeDevice` does this lazily over the mirror
(an overlay index block -> before-image), never modifying the mirror.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2

from firmware import cbor_strict
from firmware.blockdev import NotReady
from firmware.cbq.format import BARRIER_IN_RESYNC, split_barrier_flags
from firmware.fsutil import write_conflict_image
from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.link.digests import sparse_chunk_digests
from firmware.link.frames import WriteRecord, skip_record
from firmware.remote.dirtymap import DirtyMap
from firmware.remote.errors import (
    AlreadyApplied,
    GeometryMismatch,
    InvalidRecord,
    InvalidUnitId,
    JournalCorruption,
    NotRestorable,
    OutsideRetention,
    Promoted,
    PromoteRefused,
    SeqGap,
    StoreUsageError,
    UnitBusy,
)
from firmware.remote.fileio import FileHandle, FileOps, OsFileOps, lock_holder
from firmware.remote.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    HISTORY_SEGMENT_MAGIC,
    RECEIVE_SEGMENT_MAGIC,
    RecordKind,
    crc32c,
)
from firmware.remote.journal import LogEntry, NewRecord, SegmentLog
from firmware.remote.pit import PointInTimeDevice
from firmware.remote.points import Point, PointLog
from firmware.remote.promoted import PromotedDevice
from firmware.remote.relay import RELAY_HOLD_BYTES, RelayHold, chunk_ranges, records_for_relay
from firmware.remote.stateblocks import SketchSettings, StateBlockSketch
from firmware.remote.stateblocks import load as load_sketch
from firmware.remote.stateblocks import save as save_sketch

log = logging.getLogger("mirrorunit.remote")

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: Data moved to the mirror per history sync + mirror sync.
APPLY_BATCH_BYTES = 8 * 1024 * 1024
#: Applied bytes after which a checkpoint bounds the redo work of a recovery.
CHECKPOINT_BYTES = 64 * 1024 * 1024
#: Entries of the unit's event log kept in the state file.
MAX_EVENTS = 256
STATE_NAME = "state.cbor"
MIRROR_NAME = "mirror.img"
LOCK_NAME = "unit.lock"
NS = 1_000_000_000
#: Generation ids are drawn from the OS's randomness: two copies that fork on their
#: own must never draw the same one.
_RNG = random.SystemRandom()


def _last_seq(e: LogEntry) -> int:
    """The last seq a receive-journal entry accounts for (a SKIP spans a range)."""
    return e.lbn if e.kind is RecordKind.SKIP else e.seq


@dataclass(frozen=True)
class Retention:
    """How much history (before-images) to keep; None means no bound of that kind.
    History beyond either bound is pruned, oldest first."""

    max_bytes: int | None = None
    max_age_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"retention max_bytes must be >= 0, not {self.max_bytes}")
        if self.max_age_s is not None and self.max_age_s < 0:
            raise ValueError(f"retention max_age_s must be >= 0, not {self.max_age_s}")


@dataclass(frozen=True)
class PointInTime:
    """A restorable point: the mirror right after write `seq` (timestamp `ts`)."""

    seq: int
    ts: int


@dataclass(frozen=True)
class ReplayCommand:
    """One recorded command: a write (`data` at byte `offset`) or, with `barrier`, the
    host's barrier after write `seq` (`flags` as the local queue records them)."""

    seq: int
    ts: int
    offset: int = 0
    data: bytes = b""
    barrier: bool = False
    flags: int = 0


def _barrier_command(p: Point) -> ReplayCommand:
    return ReplayCommand(p.seq, p.ts, barrier=True, flags=p.kind)


@dataclass(frozen=True)
class WithoutReport:
    """What `export_without` wrote: the image at `seq` less the writes first..last."""

    seq: int
    ts: int
    first_seq: int
    last_seq: int
    writes_removed: int
    blocks_restored: int
    #: Blocks a removed write changed that a later write covers too (kept as it left
    #: them): block, byte offset, the removed and the later seqs that wrote it.
    conflicts: list[dict[str, Any]]


@dataclass(frozen=True)
class DropReport:
    """What `drop_range()` removed from the receive journal."""

    count: int
    first_seq: int
    last_seq: int
    bytes: int


@dataclass(frozen=True)
class RollbackReport:
    target: PointInTime
    #: History entries undone on the mirror.
    undone: int
    #: Delayed writes dropped because they would have landed on the rewound image.
    dropped_pending: int


@dataclass(frozen=True)
class HandBackPlan:
    """What a failback's local must compare (see `UnitStore.begin_hand_back`)."""

    #: the unit's seq in the local queue's numbering (the fork plus its host writes)
    seq: int
    lineage: Lineage
    #: bitmaps of `chunk_count` bits: chunks written here since the promotion, and
    #: chunks of the local's writes this unit received and dropped at the promotion
    changed: bytes
    dropped: bytes
    chunk_size: int
    chunk_count: int


@dataclass(frozen=True)
class GiveUpReport:
    #: the generation the unit follows again
    generation: int
    writes: int
    chunks: int
    conflict_image: str
    conflict_listing: str


@dataclass(frozen=True)
class UnitStatus:
    unit_id: str
    volume_size: int
    block_size: int
    last_applied_seq: int
    last_durable_seq: int
    #: Durable records not yet on the mirror (commit delay, or a resync running).
    pending_records: int
    pending_bytes: int
    bytes_received: int
    newest_ts_received: int
    #: Recovery point lag: durable seqs not applied, and their span in seconds.
    lag_seqs: int
    lag_seconds: float
    commit_delay_s: float
    #: None, or {"start_seq": S, "started_ns": t} while a resync runs.
    resync: dict[str, int] | None
    oldest_restorable_seq: int
    oldest_restorable_ns: int
    history_bytes: int
    history_records: int
    retention: Retention
    #: False after drop_range() or rollback() until a resync makes them equal again.
    equal_to_local: bool
    dropped_records: int
    events: list[dict[str, Any]]
    #: Seqs the local discarded and this unit skipped, and the latest such ranges.
    skipped_seqs: int = 0
    skipped_ranges: list[list[int]] = field(default_factory=list)
    queue_id: int | None = None
    seq_offset: int = 0
    #: The copy's role and current generation (see firmware.lineage).
    role: str = "secondary"
    generation: str = ""
    #: None, or the promotion: {"seq", "at_ns", "forced", "writes", "dirty_chunks"}.
    promoted: dict[str, Any] | None = None
    #: Consistent points kept (see `UnitStore.points()`), and the newest one.
    points: int = 0
    newest_point: dict[str, int] | None = None


@dataclass(frozen=True)
class PromoteReport:
    #: The unit's seq the promoted image shows (the fork point).
    seq: int
    #: The same point in the seqs of the local queue the unit followed.
    fork_seq: int
    generation: int
    forced: bool
    #: History entries undone to reach an earlier point, and received writes dropped.
    undone: int
    dropped_pending: int


@dataclass
class _State:
    """The state file's contents (CBOR map; field names are the keys)."""

    unit_id: str
    volume_size: int
    block_size: int
    created_ns: int
    #: Mirror synced with every seq <= this applied (or dropped).
    checkpoint_seq: int = 0
    checkpoint_ts: int = 0
    durable_seq: int = 0
    bytes_received: int = 0
    newest_ts: int = 0
    max_bytes: int | None = None
    max_age_s: float | None = None
    commit_delay_ns: int = 0
    #: Oldest restorable point, and the history position of the first entry kept.
    floor_seq: int = 0
    floor_ts: int = 0
    floor_segment: int = 0
    floor_offset: int = 0
    #: Inclusive seq ranges never to be applied.
    dropped: list[list[int]] = field(default_factory=list)
    dropped_total: int = 0
    equal_to_local: bool = True
    events: list[dict[str, Any]] = field(default_factory=list)
    #: {"start_seq", "started_ns"} while a resync runs.
    resync: dict[str, int] | None = None
    #: Completed resyncs whose chunk before-images are still in history: [start, end, end_ts].
    resyncs: list[list[int]] = field(default_factory=list)
    #: Seq ranges (lo, hi] whose images a rollback removed from the timeline.
    rolled_back: list[list[int]] = field(default_factory=list)
    #: A rollback in progress: target_seq, target_ts, segment, offset, from_seq.
    rollback: dict[str, int] | None = None
    #: Recent seq ranges the local discarded and told this unit to skip (newest last).
    skipped: list[list[int]] = field(default_factory=list)
    skipped_total: int = 0
    #: Identity of the local queue whose seqs this unit follows (None: not known).
    queue_id: int | None = None
    #: This unit's seq = the local queue's seq + seq_offset.  Nonzero once a
    #: re-created local queue restarted its seqs: the unit's own seqs never go back,
    #: so history, journals and points in time stay in one order.
    seq_offset: int = 0
    #: Set once the unit was promoted: {"seq" (unit seq of the fork), "at_ns",
    #: "forced", "writes" (host writes since)}.  Its mirror is then written in place
    #: by its own host, the chunks it touched in `dirty.map`.
    promoted: dict[str, Any] | None = None
    #: The number the next consistent point gets (points.log holds the points).
    points_next: int = 1
    #: This unit is forwarded to a further remote: {"name", "acked", "full", "dirty"}
    #: (firmware/remote/relay.py); None when it is not.
    relay: dict[str, Any] | None = None

    def encode(self) -> bytes:
        body = cbor2.dumps(dataclasses.asdict(self))
        return cbor2.dumps({"format": FORMAT_VERSION, "crc": crc32c(body), "body": body})

    @classmethod
    def decode(cls, raw: bytes, path: str) -> _State:
        try:
            outer = cbor_strict.loads(raw, floats=True)
            body = outer["body"]
            if outer.get("format") != FORMAT_VERSION:
                raise JournalCorruption(f"unsupported state format {outer.get('format')!r}", path)
            if crc32c(body) != outer["crc"]:
                raise JournalCorruption("state CRC mismatch", path)
            fields = cbor_strict.loads(body, floats=True)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in fields.items() if k in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalCorruption(f"unreadable state file: {exc}", path) from exc


def stored_geometry(unit_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """(volume_size, block_size) of the unit stored in `unit_dir`, from its state file;
    JournalCorruption when the file cannot be read as one."""
    path = os.path.join(unit_dir, STATE_NAME)
    with open(path, "rb") as f:
        state = _State.decode(f.read(), path)
    return state.volume_size, state.block_size


def validate_unit_id(unit_id: str) -> str:
    """Return `unit_id` if it is safe as a directory name, else raise InvalidUnitId."""
    ok = (
        isinstance(unit_id, str)
        and 1 <= len(unit_id) <= 64
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in unit_id)
        and ".." not in unit_id
        and unit_id != "."
    )
    if not ok:
        raise InvalidUnitId(
            f"invalid unit id {unit_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not '.' and without '..'"
        )
    return unit_id


class UnitStore:
    """One virtual remote unit in its own directory; implements the link's WriteSink.

    Opening creates the unit on first use and takes its exclusive lock (UnitBusy if
    another process or another open holds it).  All methods are thread-safe.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        unit_id: str,
        volume_size: int,
        block_size: int = 512,
        *,
        retention: Retention | None = None,
        commit_delay_s: float | None = None,
        clock: Callable[[], int] | None = None,
        ops: FileOps | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_close: Callable[[UnitStore], None] | None = None,
        state_blocks: SketchSettings | None = None,
        relay_hold_bytes: int = RELAY_HOLD_BYTES,
    ) -> None:
        """Open (creating if needed) the unit stored in `directory`.

        `retention` and `commit_delay_s`, when given, replace the stored settings.
        `clock` returns nanoseconds since the epoch (tests pass a fake one); `ops`
        is the file layer (crash tests pass a simulated one)."""
        validate_unit_id(unit_id)
        if block_size <= 0 or block_size & (block_size - 1) or block_size > CHUNK_SIZE:
            raise GeometryMismatch(f"block size {block_size} is not a power of two <= {CHUNK_SIZE}")
        if volume_size <= 0 or volume_size % block_size:
            raise GeometryMismatch(
                f"volume size {volume_size} is not a positive multiple of block size {block_size}"
            )
        self.unit_id = unit_id
        self.directory = os.fspath(directory)
        self.volume_size = volume_size
        self.block_size = block_size
        self._ops: FileOps = ops if ops is not None else OsFileOps()
        self._clock = clock if clock is not None else time.time_ns
        self._segment_bytes = segment_bytes
        self._on_close = on_close
        self._lock = threading.RLock()
        self._closed = False
        self._views: dict[int, int] = {}  # id(view) -> first absolute history index it needs
        #: A failback runs: the promoted unit's host writes are refused until it ends.
        self._handing_back = False
        self._pending: deque[LogEntry] = deque()
        self._hist: list[LogEntry] = []
        self._hist_base = 0  # absolute index of _hist[0]; grows as history is pruned
        self._hist_bytes = 0
        self._applied_since_checkpoint = 0
        self._mirror: FileHandle | None = None
        self._rj: SegmentLog | None = None
        self._hj: SegmentLog | None = None
        self._points: PointLog | None = None
        self._sketch_settings = state_blocks if state_blocks is not None else SketchSettings()
        self._sketch = StateBlockSketch(self._sketch_settings)
        self._relay_hold_bytes = relay_hold_bytes
        #: What a relay to a further remote still needs (None: no relay).
        self._relay: RelayHold | None = None

        self._ops.makedirs(self.directory)
        lock_path = os.path.join(self.directory, LOCK_NAME)
        handle = self._ops.lock(lock_path)
        if handle is None:
            raise UnitBusy(
                f"unit {unit_id!r} is in use by another process (pid {lock_holder(lock_path)}); "
                "a unit accepts one writer at a time"
            )
        self._lock_handle = handle
        try:
            self._open(retention, commit_delay_s)
        except BaseException:
            self._release()
            raise

    # ================================================================== opening

    @property
    def _state_path(self) -> str:
        return os.path.join(self.directory, STATE_NAME)

    def _open(self, retention: Retention | None, commit_delay_s: float | None) -> None:
        ops = self._ops
        mirror_path = os.path.join(self.directory, MIRROR_NAME)
        if ops.exists(self._state_path):
            h = ops.open(self._state_path)
            try:
                st = _State.decode(h.pread(0, h.size()), self._state_path)
            finally:
                h.close()
            if st.unit_id != self.unit_id:
                raise GeometryMismatch(
                    f"{self.directory} holds unit {st.unit_id!r}, not {self.unit_id!r}"
                )
            if (st.volume_size, st.block_size) != (self.volume_size, self.block_size):
                raise GeometryMismatch(
                    f"unit {self.unit_id!r} exists with volume size {st.volume_size} and "
                    f"block size {st.block_size}; refused {self.volume_size}/{self.block_size}"
                )
            self._st = st
            new = False
        else:
            # First use (or a creation cut short before its state file was saved:
            # nothing can have been acknowledged yet, so start over).
            self._st = _State(self.unit_id, self.volume_size, self.block_size, self._clock())
            m = ops.open(mirror_path, create=True)
            m.truncate(0)
            m.truncate(self.volume_size)
            m.sync()
            m.close()
            new = True
        self._mirror = ops.open(mirror_path)
        if self._mirror.size() != self.volume_size:
            raise JournalCorruption(
                f"mirror is {self._mirror.size()} bytes, expected {self.volume_size}", mirror_path
            )
        changed = new
        if retention is not None and (retention.max_bytes, retention.max_age_s) != (
            self._st.max_bytes, self._st.max_age_s
        ):
            self._st.max_bytes, self._st.max_age_s = retention.max_bytes, retention.max_age_s
            changed = True
        if commit_delay_s is not None:
            delay_ns = self._delay_ns(commit_delay_s)
            changed |= delay_ns != self._st.commit_delay_ns
            self._st.commit_delay_ns = delay_ns

        self._rj = SegmentLog(ops, os.path.join(self.directory, "journal"), "rj",
                              RECEIVE_SEGMENT_MAGIC, self._segment_bytes, self._clock)
        self._hj = SegmentLog(ops, os.path.join(self.directory, "history"), "hj",
                              HISTORY_SEGMENT_MAGIC, self._segment_bytes, self._clock)
        self._points = PointLog(ops, self.directory)
        self._points.open(self._st.points_next)
        self._sketch = load_sketch(ops, self.directory, self._sketch_settings)
        received = self._rj.open()
        history = self._hj.open()
        if new:
            # Fresh state: journals left by an aborted creation hold nothing durable.
            self._rj.truncate_at(0, 0)
            self._hj.truncate_at(0, 0)
            received, history = [], []
        self._recover(received, history)
        if self._st.relay is not None:
            self._relay = self._new_relay_hold(self._st.relay)
            self._relay.rebuild(received, self._applied)
        if changed or new:
            self._save_state()
        self._open_lineage()
        self._trim_segments()
        # Complete what the receive journal holds and is due.
        self.apply_due(self._clock())

    @property
    def _lineage_path(self) -> str:
        return os.path.join(self.directory, lineage_store.FILE_NAME)

    def _open_lineage(self) -> None:
        ops, path = self._ops, self._lineage_path
        lineage = None
        if ops.exists(path):
            h = ops.open(path)
            try:
                lineage = lineage_store.decode(h.pread(0, h.size()), path)
            except lineage_store.LineageCorruption as exc:
                # One error tree for the unit's files: the server reports it and carries
                # on with the other units.
                raise JournalCorruption(f"lineage file: {exc.reason}", exc.path,
                                        exc.offset) from exc
            finally:
                h.close()
        if lineage is None:
            # A unit from before lineages (or a new one): whatever its mirror holds
            # belongs to a first generation of its own, received as a secondary.
            lineage = Lineage.first(Role.SECONDARY, self._clock() / NS, _RNG)
            self._write_lineage(lineage)
            log.info("unit %s: first generation %016x", self.unit_id, lineage.generation)
        self._lineage = lineage
        self._dirty: DirtyMap | None = None
        g = lineage.current
        if self._st.promoted is None and lineage.writer and g.role is Role.PRIMARY:
            # A promotion cut short after its lineage was recorded: finish it.
            self._dirty = DirtyMap(ops, self.directory, self.chunk_count)
            self._dirty.save()
            if self._pending:
                self._drop_pending_all()
                self._pending.clear()
            self._st.promoted = {"seq": g.fork_seq + self._st.seq_offset,
                                 "fork_seq": g.fork_seq, "at_ns": g.time_ns,
                                 "forced": g.forced, "writes": 0}
            self._save_state()
            log.warning("unit %s: finished its promotion at seq %d", self.unit_id,
                        g.fork_seq)
        p = self._st.promoted
        if p is not None and not lineage.writer:
            self._dirty = DirtyMap.load(ops, self.directory, self.chunk_count)
            if g.parent == p.get("generation", g.parent):
                # A hand-back cut short after its lineage was recorded: the local holds
                # this unit's image as of the promotion's last write; the unit follows it.
                seq = max(self._durable + 1, g.fork_seq + self._st.seq_offset)
                self._finish_hand_back(seq, seq - g.fork_seq)
                log.warning("unit %s: finished handing its role back at seq %d",
                            self.unit_id, g.fork_seq)
            else:
                # Giving up its writes, cut short after the lineage went back.
                self._finish_give_up()
                log.warning("unit %s: finished giving up its writes", self.unit_id)
        if self._st.promoted is not None:
            self._dirty = DirtyMap.load(ops, self.directory, self.chunk_count)
            if self._dirty is None:
                raise JournalCorruption("the unit is promoted but its dirty map is missing",
                                        os.path.join(self.directory, "dirty.map"))

    def _write_lineage(self, lineage: Lineage) -> None:
        # The lineage store's format, written through this unit's file layer (the
        # same atomic replace as the state file) so crash tests cover it too.
        path = self._lineage_path
        tmp = path + ".tmp"
        h = self._ops.open(tmp, create=True)
        try:
            h.truncate(0)
            h.pwrite(0, lineage_store.encode(lineage))
            h.sync()
        finally:
            h.close()
        self._ops.rename(tmp, path)
        self._ops.fsync_dir(self.directory)

    @property
    def lineage(self) -> Lineage:
        with self._lock:
            return self._lineage

    def set_lineage(self, lineage: Lineage) -> None:
        """Record a new lineage for this copy, durably, before anything relies on it."""
        with self._lock:
            self._check_open()
            self._write_lineage(lineage)
            self._lineage = lineage

    def _recover(self, received: list[LogEntry], history: list[LogEntry]) -> None:
        st = self._st
        assert self._rj is not None and self._hj is not None and self._mirror is not None
        cp = st.checkpoint_seq
        fresh: list[LogEntry] = []
        expect = cp + 1
        for e in received:
            if e.kind not in (RecordKind.WRITE, RecordKind.SKIP):
                raise JournalCorruption(f"{e.kind.name} record in the receive journal",
                                        self._rj.path(e.segment), e.offset)
            last = _last_seq(e)
            if last <= cp:
                continue
            # Only a skip may straddle the checkpoint (it is applied as a whole).
            if e.seq != expect and not (e.kind is RecordKind.SKIP and e.seq < expect):
                raise JournalCorruption(f"seq {e.seq} where {expect} was due",
                                        self._rj.path(e.segment), e.offset)
            fresh.append(e)
            expect = last + 1
        self._durable = expect - 1
        if st.durable_seq > self._durable:
            raise JournalCorruption(
                f"state says seq {st.durable_seq} was durable, the receive journal ends at "
                f"{self._durable}", self._rj.directory)
        self._bytes_received = st.bytes_received + sum(
            e.payload_len for e in fresh if e.seq > st.durable_seq)
        self._newest_ts = max([st.newest_ts] + [e.ts for e in fresh])
        for e in fresh:
            if e.kind is RecordKind.SKIP and e.lbn > st.durable_seq:
                # Received after the last state save: its note was not saved yet.
                self._note_skip(max(e.seq, st.durable_seq + 1), e.lbn)

        floor = (st.floor_segment, st.floor_offset)
        self._hist = [e for e in history if e.position >= floor]
        self._hist_bytes = sum(e.length for e in self._hist)
        self._applied = cp
        self._applied_ts = st.checkpoint_ts

        if st.rollback is not None:
            self._finish_rollback()

        # Writes whose before-images became durable after the checkpoint may have
        # reached the mirror partly: write them again, in order.
        redo = [e for e in self._hist if e.kind is RecordKind.BEFORE and e.seq > cp]
        writes = {e.seq: e for e in fresh if e.kind is RecordKind.WRITE}
        for h in redo:
            r = writes.get(h.seq)
            if r is None or (r.seq, r.lbn, r.nblocks) != (h.seq, h.lbn, h.nblocks):
                raise JournalCorruption(
                    f"history entry for seq {h.seq} has no matching received write",
                    self._hj.path(h.segment), h.offset)
            self._mirror.pwrite(r.lbn * self.block_size, self._rj.read_payload(r))
        if redo:
            self._mirror.sync()
            self._applied, self._applied_ts = redo[-1].seq, redo[-1].ts
            log.info("unit %s: redid %d writes after seq %d", self.unit_id, len(redo), cp)
            self._save_state()
        self._pending = deque(e for e in fresh if _last_seq(e) > self._applied)

    # ================================================================== WriteSink

    def apply(self, records: Sequence[WriteRecord]) -> int:
        """Append records to the receive journal, make them durable, move what is due
        to the mirror; return the last durable seq.

        Seqs <= the last durable one are skipped (a replay after a reconnect is
        harmless); the first new seq must follow the last durable one by exactly 1
        (SeqGap otherwise, and nothing of the batch is kept).  A SKIP record (seqs
        the local discarded) is journaled like a write: its seqs are consumed and
        nothing reaches the mirror."""
        with self._lock:
            self._check_open()
            self._check_not_promoted("takes no replication")
            assert self._rj is not None
            fresh: list[WriteRecord] = []
            barriers: list[WriteRecord] = []
            stream: list[WriteRecord] = []  # new writes and barriers, in the host's order
            expect = self._durable + 1
            for r in records:
                if r.barrier:
                    # It covers the writes before it: none it names may be missing.
                    if r.seq >= expect:
                        raise SeqGap(f"unit {self.unit_id!r}: a barrier at seq {r.seq} "
                                     f"arrived where write {expect} was due")
                    barriers.append(r)
                    stream.append(r)
                    continue
                if r.last_seq < expect:
                    continue
                if r.is_skip and r.seq < expect:
                    r = skip_record(expect, r.skip_last, r.ts)
                if r.seq != expect:
                    raise SeqGap(
                        f"unit {self.unit_id!r}: seq {r.seq} arrived where {expect} was due"
                    )
                if not r.is_skip:
                    self._check_record(r)
                    stream.append(r)
                fresh.append(r)
                expect = r.last_seq + 1
            if fresh:
                bs = self.block_size
                entries = self._rj.append([
                    NewRecord(RecordKind.SKIP, r.seq, r.ts, r.skip_last, 0, b"") if r.is_skip
                    else NewRecord(RecordKind.WRITE, r.seq, r.ts, r.lbn, len(r.data) // bs,
                                   r.data)
                    for r in fresh
                ])
                self._rj.sync()
                self._pending.extend(entries)
                self._durable = fresh[-1].last_seq
                for r in fresh:
                    if r.is_skip:
                        self._note_skip(r.seq, r.skip_last)
                self._bytes_received += sum(len(r.data) for r in fresh)
                self._newest_ts = max(self._newest_ts, max(r.ts for r in fresh))
            new_points: set[int] = set()
            if barriers:
                new_points = self._note_barriers(barriers)
            self._observe(stream, new_points)
            self.apply_due(self._clock())
            return self._durable

    def _observe(self, stream: Sequence[WriteRecord], new_points: set[int]) -> None:
        """Feed the state-block sketch the writes and barriers just made durable (a
        barrier resent after a reconnect is not a new one)."""
        sk, bs = self._sketch, self.block_size
        for r in stream:
            if r.barrier:
                if r.seq in new_points:
                    sk.observe_barrier()
            else:
                sk.observe_write(r.lbn, len(r.data) // bs, r.ts)

    def _note_barriers(self, barriers: Sequence[WriteRecord]) -> set[int]:
        """Record the barriers as consistent points, durably (after the writes they
        cover are: the receive journal was synced first); returns the seqs of the new
        points."""
        assert self._points is not None
        added: set[int] = set()
        for r in barriers:
            kind, front, opcode = split_barrier_flags(r.flags)
            in_resync = bool(r.flags & BARRIER_IN_RESYNC) or self._st.resync is not None
            if self._points.add(r.seq, r.ts, kind & ~BARRIER_IN_RESYNC, front, opcode,
                                r.connection, r.cum_blocks, self.block_size,
                                in_resync) is not None:
                added.add(r.seq)
        if added:
            self._points.sync()
        return added

    def last_durable_seq(self) -> int:
        with self._lock:
            return self._durable

    def _note_skip(self, first: int, last: int) -> None:
        st = self._st
        st.skipped = (st.skipped + [[first, last]])[-MAX_EVENTS:]
        st.skipped_total += last - first + 1
        self._event("skip", first_seq=first, last_seq=last)
        log.warning("unit %s: seqs %d..%d were discarded at the local unit; skipped here",
                    self.unit_id, first, last)

    def _check_record(self, r: WriteRecord) -> None:
        bs = self.block_size
        if not r.data or len(r.data) % bs:
            raise InvalidRecord(f"seq {r.seq}: {len(r.data)} bytes is not a whole number of "
                                f"{bs}-byte blocks")
        if r.lbn < 0 or r.lbn * bs + len(r.data) > self.volume_size:
            raise InvalidRecord(f"seq {r.seq}: lbn {r.lbn} + {len(r.data)} bytes lies outside "
                                f"the {self.volume_size}-byte volume")

    # ================================================================== applying

    @property
    def last_applied_seq(self) -> int:
        with self._lock:
            return self._applied

    def apply_due(self, now_ns: int | None = None) -> int:
        """Move every pending write whose commit delay has passed at `now_ns` to the
        mirror, in seq order (stopping at the first one not yet due); return how many
        were applied.  Dropped writes are skipped.  Does nothing while a resync runs."""
        with self._lock:
            self._check_open()
            now = self._clock() if now_ns is None else now_ns
            if self._st.resync is not None or self._st.promoted is not None:
                return 0
            delay = self._st.commit_delay_ns
            applied = 0
            while self._pending:
                batch: list[LogEntry] = []
                handled = 0  # leading pending entries this round covers (dropped included)
                nbytes = 0
                for e in self._pending:
                    if self._is_dropped(e.seq):
                        handled += 1
                        continue
                    if e.kind is RecordKind.SKIP:
                        # Nothing to write; it still waits its turn behind a delay.
                        if delay and e.ts + delay > now:
                            break
                        handled += 1
                        continue
                    # Without a delay the local's timestamps (another clock) play no part.
                    if (delay and e.ts + delay > now) or nbytes >= APPLY_BATCH_BYTES:
                        break
                    batch.append(e)
                    nbytes += e.payload_len
                    handled += 1
                if handled == 0:
                    break
                if batch:
                    self._apply_batch(batch)
                    applied += len(batch)
                last = self._pending[handled - 1]
                done = [self._pending.popleft() for _ in range(handled)]
                if self._relay is not None:
                    self._relay.applied(done, self._chunks_of_entry)
                self._applied = _last_seq(last)
            self._maybe_checkpoint(now)
            return applied

    def _apply_batch(self, batch: list[LogEntry]) -> None:
        assert self._rj is not None and self._hj is not None and self._mirror is not None
        bs = self.block_size
        datas = [self._rj.read_payload(e) for e in batch]
        # Before-images must reflect earlier writes of this same batch, which are not
        # on the mirror yet (the mirror is only written once history is durable).
        overlay: dict[int, memoryview] = {}
        befores: list[NewRecord] = []
        for i, (e, data) in enumerate(zip(batch, datas, strict=True)):
            before = bytearray(self._mirror.pread(e.lbn * bs, len(data)))
            if overlay:
                for k in range(e.nblocks):
                    blk = overlay.get(e.lbn + k)
                    if blk is not None:
                        before[k * bs:(k + 1) * bs] = blk
            befores.append(NewRecord(RecordKind.BEFORE, e.seq, e.ts, e.lbn, e.nblocks, before))
            if i < len(batch) - 1:
                view = memoryview(data)
                for k in range(e.nblocks):
                    overlay[e.lbn + k] = view[k * bs:(k + 1) * bs]
        entries = self._hj.append(befores)
        self._hj.sync()
        for e, data in zip(batch, datas, strict=True):
            self._mirror.pwrite(e.lbn * bs, data)
        self._mirror.sync()
        self._hist.extend(entries)
        self._hist_bytes += sum(e.length for e in entries)
        self._applied_ts = batch[-1].ts
        self._applied_since_checkpoint += sum(len(d) for d in datas)

    def _is_dropped(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self._st.dropped)

    # ================================================================== checkpoints

    def _save_state(self) -> None:
        st = self._st
        st.checkpoint_seq, st.checkpoint_ts = self._applied, self._applied_ts
        st.durable_seq = self._durable
        st.bytes_received, st.newest_ts = self._bytes_received, self._newest_ts
        if self._points is not None:
            st.points_next = self._points.next_number
        if self._relay is not None:
            st.relay = self._relay.to_state()
        st.events = st.events[-MAX_EVENTS:]
        tmp = self._state_path + ".tmp"
        h = self._ops.open(tmp, create=True)
        try:
            h.truncate(0)
            h.pwrite(0, st.encode())
            h.sync()
        finally:
            h.close()
        self._ops.rename(tmp, self._state_path)
        save_sketch(self._ops, self.directory, self._sketch)
        self._ops.fsync_dir(self.directory)
        self._applied_since_checkpoint = 0

    def _trim_segments(self) -> None:
        """Delete receive segments wholly applied and history segments wholly pruned
        (only ever after the state saying so is durable)."""
        assert self._rj is not None and self._hj is not None
        self._rj.drop_segments_before(self._keep_from())
        self._hj.drop_segments_before(self._st.floor_segment)

    def _keep_from(self) -> int:
        """The oldest receive segment still needed: by a pending write, or by a relay
        (only as far as the saved state says it was acknowledged)."""
        assert self._rj is not None
        keep = self._pending[0].segment if self._pending else self._rj.end_position[0]
        held = self._relay.keep_segment() if self._relay is not None else None
        return keep if held is None else min(keep, held)

    def _maybe_checkpoint(self, now: int) -> None:
        assert self._rj is not None
        need = self._applied_since_checkpoint >= CHECKPOINT_BYTES or self._prune_due(now)
        if not need and self._st.checkpoint_seq != self._applied:
            keep_from = self._keep_from()
            need = any(n < keep_from for n in self._rj.segments)
        if need:
            self._checkpoint(now)

    def _checkpoint(self, now: int, exact: bool = False) -> None:
        self._prune(now, exact)
        self._save_state()
        self._trim_segments()
        if self._points is not None:
            # After the state: its points_next already counts every point dropped here.
            self._points.prune(self._st.floor_seq)

    def checkpoint(self) -> None:
        """Save the state now (bounds the redo work of a recovery) and trim journals."""
        with self._lock:
            self._check_open()
            self._checkpoint(self._clock())

    # ================================================================== retention

    @property
    def retention(self) -> Retention:
        return Retention(self._st.max_bytes, self._st.max_age_s)

    def set_retention(self, retention: Retention) -> None:
        """Change the history bounds; takes effect (pruning) at once."""
        with self._lock:
            self._check_open()
            self._st.max_bytes, self._st.max_age_s = retention.max_bytes, retention.max_age_s
            self._checkpoint(self._clock(), exact=True)

    def prune(self, now_ns: int | None = None) -> int:
        """Drop the history entries beyond the retention bounds at `now_ns`, exactly
        (automatic pruning leaves some slack to avoid saving state on every batch).
        Returns how many entries were dropped."""
        with self._lock:
            self._check_open()
            before = self._hist_base
            self._checkpoint(self._clock() if now_ns is None else now_ns, exact=True)
            return self._hist_base - before

    def _after_point(self, e: LogEntry) -> PointInTime | None:
        """The mirror's point right after entry `e`; None inside a running resync."""
        if e.kind is RecordKind.BEFORE:
            return PointInTime(e.seq, e.ts)
        for start, end, end_ts in self._st.resyncs:
            if start == e.seq:
                return PointInTime(end, end_ts)
        return None

    def _prune_due(self, now: int) -> bool:
        st = self._st
        if not self._hist:
            return False
        if st.max_bytes is not None and self._hist_bytes > st.max_bytes:
            return True
        if st.max_age_s is not None:
            p = self._after_point(self._hist[0])
            # Slack of a tenth of the age so pruning (a state save) is not per batch.
            slack = int(st.max_age_s * NS / 10)
            return p is not None and p.ts <= now - int(st.max_age_s * NS) - slack
        return False

    def _prune(self, now: int, exact: bool) -> None:
        st = self._st
        if st.max_bytes is None and st.max_age_s is None:
            return
        low_water = None
        if st.max_bytes is not None:
            low_water = st.max_bytes if exact else st.max_bytes - st.max_bytes // 16
        cutoff = None if st.max_age_s is None else now - int(st.max_age_s * NS)
        pinned = min(self._views.values(), default=None)
        kept = self._hist_bytes
        n = 0
        last: PointInTime | None = None
        for e in self._hist:
            if pinned is not None and self._hist_base + n >= pinned:
                break
            p = self._after_point(e)
            if p is None or p.seq > self._applied:
                break
            by_bytes = low_water is not None and kept > low_water
            by_age = cutoff is not None and p.ts <= cutoff
            if not (by_bytes or by_age):
                break
            kept -= e.length
            last = p
            n += 1
        if n == 0 or last is None:
            return
        del self._hist[:n]
        self._hist_base += n
        self._hist_bytes = kept
        assert self._hj is not None
        st.floor_seq, st.floor_ts = last.seq, last.ts
        st.floor_segment, st.floor_offset = (
            self._hist[0].position if self._hist else self._hj.end_position
        )
        live_chunks = {e.seq for e in self._hist if e.kind is RecordKind.CHUNK_BEFORE}
        st.resyncs = [r for r in st.resyncs if r[0] in live_chunks]
        st.rolled_back = [r for r in st.rolled_back if r[1] > st.floor_seq]
        log.info("unit %s: history pruned to seq %d (%d entries, %d bytes kept)",
                 self.unit_id, st.floor_seq, len(self._hist), kept)

    @property
    def oldest_restorable(self) -> PointInTime:
        return PointInTime(self._st.floor_seq, self._st.floor_ts)

    # ================================================================== point in time

    def _resolve(self, seq: int | None, t_ns: int | None) -> tuple[PointInTime, int]:
        """The point to rebuild and the index in _hist of the first entry to undo."""
        if (seq is None) == (t_ns is None):
            raise StoreUsageError("give exactly one of a time (ns) or a seq")
        st = self._st
        oldest = self.oldest_restorable
        i = len(self._hist)
        point: PointInTime | None = None
        if seq is not None:
            if seq > self._applied:
                raise NotRestorable(
                    f"seq {seq} has not reached the mirror (last applied {self._applied})")
            if seq < oldest.seq:
                raise OutsideRetention(
                    f"seq {seq} is older than the oldest restorable point, seq {oldest.seq} "
                    f"({_fmt_ns(oldest.ts)})", oldest.seq, oldest.ts)
            for lo, hi in st.rolled_back:
                if lo < seq <= hi:
                    raise NotRestorable(f"seqs {lo + 1}..{hi} were undone by a rollback to {lo}")
            for start, end, _ in st.resyncs:
                if start < seq < end:
                    raise NotRestorable(
                        f"seq {seq} lies inside a resync from seq {start} to {end}; "
                        "no consistent image exists there")
            while i > 0:
                p = self._after_point(self._hist[i - 1])
                if p is not None and p.seq <= seq:
                    point = p
                    break
                i -= 1
        else:
            assert t_ns is not None
            if t_ns < oldest.ts:
                raise OutsideRetention(
                    f"{_fmt_ns(t_ns)} is older than the oldest restorable instant, "
                    f"{_fmt_ns(oldest.ts)} (seq {oldest.seq})", oldest.seq, oldest.ts)
            while i > 0:
                p = self._after_point(self._hist[i - 1])
                if p is not None and p.ts <= t_ns:
                    point = p
                    break
                i -= 1
        return (point if point is not None else oldest), i

    def points(self, lo_ns: int | None = None, hi_ns: int | None = None) -> list[Point]:
        """The consistent points (barriers) still restorable, oldest first, with a time
        in [lo_ns, hi_ns] where given."""
        with self._lock:
            self._check_open()
            assert self._points is not None
            floor = self._st.floor_seq
            return [p for p in self._points.between(lo_ns, hi_ns) if p.seq >= floor]

    def point(self, number: int) -> Point:
        """Consistent point `number`; NotRestorable if it is not (or no longer) kept, or
        lies inside a resync."""
        with self._lock:
            self._check_open()
            assert self._points is not None
            p = self._points.find(number)
            if p is None or p.seq < self._st.floor_seq:
                raise NotRestorable(f"unit {self.unit_id!r} keeps no point {number}")
            if p.in_resync:
                raise NotRestorable(f"point {number} (seq {p.seq}) lies inside a resync: "
                                    "the image there is not consistent")
            return p

    def replay_plan(self, from_seq: int | None = None, to_seq: int | None = None, *,
                    from_ns: int | None = None, to_ns: int | None = None,
                    ) -> tuple[PointInTime, PointInTime, list[ReplayCommand]]:
        """The recorded command stream between two points: (start, end, commands).

        The commands are the writes applied after `start` up to `end`, in seq order with
        their original offsets and times, and the barriers among them; a target holding
        the image at `start` that is given them in order ends equal to the image at
        `end`.  The data of each write is read back from history: walking from the
        image at `end` towards `start`, a write's blocks hold its data until the
        before-image of that write is laid over them.  Refused across a resync (no
        write order exists there)."""
        with self._lock:
            self._check_open()
            self._check_not_promoted("replays nothing from history")
            start, _ = self._resolve(from_seq, from_ns)
            end, i_end = self._resolve(to_seq, to_ns)
            if end.seq < start.seq:
                raise StoreUsageError(f"the end (seq {end.seq}) is before the start "
                                      f"(seq {start.seq})")
            entries = []
            for e in self._hist[:i_end]:
                if e.kind is RecordKind.CHUNK_BEFORE and start.seq <= e.seq < end.seq:
                    raise NotRestorable(f"a resync from seq {e.seq} lies between seq "
                                        f"{start.seq} and {end.seq}: no command order "
                                        "exists across it")
                if e.kind is RecordKind.BEFORE and start.seq < e.seq <= end.seq:
                    entries.append(e)
            assert self._points is not None
            barriers = [p for p in self._points.points if start.seq < p.seq <= end.seq]
            view = PointInTimeDevice(self, end, self._hist_base + i_end)
        bs = self.block_size
        try:
            laid: dict[int, bytes] = {}  # block -> its contents at the write being read
            writes: list[ReplayCommand] = []
            for e in reversed(entries):
                data = bytearray(view.pread(e.lbn * bs, e.nblocks * bs))
                for k in range(e.nblocks):
                    got = laid.get(e.lbn + k)
                    if got is not None:
                        data[k * bs:(k + 1) * bs] = got
                with self._lock:
                    assert self._hj is not None
                    before = self._hj.read_payload(e)
                for k in range(e.nblocks):
                    laid[e.lbn + k] = before[k * bs:(k + 1) * bs]
                writes.append(ReplayCommand(e.seq, e.ts, e.lbn * bs, bytes(data)))
        finally:
            view.close()
        writes.reverse()
        out: list[ReplayCommand] = []
        bi = 0
        for w in writes:
            while bi < len(barriers) and barriers[bi].seq < w.seq:
                out.append(_barrier_command(barriers[bi]))
                bi += 1
            out.append(w)
        out.extend(_barrier_command(b) for b in barriers[bi:])
        return start, end, out

    def resolve(self, at: int | None = None, *, seq: int | None = None) -> PointInTime:
        """The restorable point `image_at(at)` / `image_at_seq(seq)` would give."""
        with self._lock:
            self._check_open()
            return self._resolve(seq, at)[0]

    def image_at(self, t_ns: int) -> PointInTimeDevice:
        """A read-only device showing the mirror right after the last write with
        ts <= t_ns.  Close it when done (it pins the history it reads)."""
        return self._view(None, t_ns)

    def image_at_seq(self, seq: int) -> PointInTimeDevice:
        """A read-only device showing the mirror right after write `seq` was applied."""
        return self._view(seq, None)

    def _view(self, seq: int | None, t_ns: int | None) -> PointInTimeDevice:
        with self._lock:
            self._check_open()
            self._check_not_promoted("serves its image writable, not from history")
            point, i = self._resolve(seq, t_ns)
            return PointInTimeDevice(self, point, self._hist_base + i)

    def export(self, path: str | os.PathLike[str], at: int | None = None, *,
               seq: int | None = None) -> PointInTime:
        """Write the image at instant `at` (ns since the epoch) or right after write
        `seq` to a (sparse) file; return the point it shows."""
        dev = self._view(seq, at)
        step = 1 << 20
        try:
            with open(path, "wb") as f:
                f.truncate(self.volume_size)
                zero = bytes(CHUNK_SIZE)
                for off in range(0, self.volume_size, step):
                    data = memoryview(dev.pread(off, min(step, self.volume_size - off)))
                    # Zero runs stay holes, so an export is as sparse as its image.
                    for sub in range(0, len(data), CHUNK_SIZE):
                        piece = data[sub:sub + CHUNK_SIZE]
                        if piece != zero[:len(piece)]:
                            f.seek(off + sub)
                            f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            return dev.point
        finally:
            dev.close()

    # ================================================================== state blocks

    def state_blocks(self, limit: int = 32) -> dict[str, Any]:
        """The blocks the host rewrites most, near its barriers (firmware/remote/
        stateblocks.py): counts of the stream and the top runs, most rewritten first."""
        with self._lock:
            self._check_open()
            return self._sketch.snapshot(self.block_size, limit)

    def points_after_state_update(self, points: Sequence[Point],
                                  limit: int = 8) -> set[int]:
        """The numbers of those of `points` (oldest first) whose preceding writes, since
        the point before them, touched one of the top state blocks."""
        with self._lock:
            self._check_open()
            hot = sorted(self._sketch.hot_blocks(limit))
            if not hot or not points:
                return set()
            lo_seq = points[0].seq

            def hits(lbn: int, n: int) -> bool:
                i = bisect.bisect_left(hot, lbn)
                return i < len(hot) and hot[i] < lbn + n

            touched = sorted(e.seq for e in self._hist
                             if e.kind is RecordKind.BEFORE and e.seq <= points[-1].seq
                             and hits(e.lbn, e.nblocks))
            prev = list(self._points.points) if self._points is not None else []
        out: set[int] = set()
        # The seq of the point before each candidate (its window starts there).
        before: dict[int, int] = {}
        last = -1
        for p in prev:
            before[p.number] = last
            last = p.seq
        j = 0
        for p in points:
            start = before.get(p.number, lo_seq - 1)
            while j < len(touched) and touched[j] <= start:
                j += 1
            if j < len(touched) and touched[j] <= p.seq:
                out.add(p.number)
        return out

    # ================================================================== undo a range

    def export_without(self, path: str | os.PathLike[str], from_seq: int | None = None,
                       to_seq: int | None = None, *, from_ns: int | None = None,
                       to_ns: int | None = None) -> WithoutReport:
        """Write the image as it is now with the writes of a seq (or time) range taken
        out: each block those writes changed gets back its contents from just before the
        range, unless a later write covers it too; those blocks are kept as the later
        write left them and reported as conflicts."""
        with self._lock:
            self._check_open()
            self._check_not_promoted("serves its image writable, not from history")
            hist = [e for e in self._hist if e.kind is RecordKind.BEFORE]
            if from_seq is None and from_ns is None:
                raise StoreUsageError("give the start of the range (a seq or a time)")
            inside = [e for e in hist
                      if (from_seq is None or e.seq >= from_seq)
                      and (to_seq is None or e.seq <= to_seq)
                      and (from_ns is None or e.ts >= from_ns)
                      and (to_ns is None or e.ts <= to_ns)]
            if not inside:
                raise NotRestorable("no applied write lies inside that range")
            first, last = inside[0].seq, inside[-1].seq
            if any(e.kind is RecordKind.CHUNK_BEFORE and e.seq >= first - 1
                   for e in self._hist):
                raise NotRestorable(f"a resync lies after seq {first - 1}: no write order "
                                    "exists to take writes out of")
            removed: dict[int, list[int]] = {}
            for e in inside:
                for b in range(e.lbn, e.lbn + e.nblocks):
                    removed.setdefault(b, []).append(e.seq)
            later: dict[int, list[int]] = {}
            for e in hist:
                if e.seq > last:
                    for b in range(e.lbn, e.lbn + e.nblocks):
                        if b in removed:
                            later.setdefault(b, []).append(e.seq)
            now = self._applied
        before = self.image_at_seq(first - 1)
        try:
            point = self.export(path, seq=now)
            bs = self.block_size
            restored = 0
            with open(path, "r+b") as f:
                for b in sorted(removed):
                    if b in later:
                        continue
                    f.seek(b * bs)
                    f.write(before.pread(b * bs, bs))
                    restored += 1
                f.flush()
                os.fsync(f.fileno())
        finally:
            before.close()
        conflicts = [{"block": b, "offset": b * self.block_size, "removed_seqs": removed[b],
                      "later_seqs": later[b]} for b in sorted(later)]
        return WithoutReport(point.seq, point.ts, first, last, len(inside), restored,
                             conflicts)

    def read_mirror(self, offset: int, length: int) -> bytes:
        """Bytes of the current mirror image."""
        with self._lock:
            self._check_open()
            assert self._mirror is not None
            if offset < 0 or length < 0 or offset + length > self.volume_size:
                raise StoreUsageError(f"range {offset}+{length} outside the volume")
            return self._mirror.pread(offset, length)

    # ================================================================== rollback

    def rollback(self, to: int | None = None, *, to_seq: int | None = None) -> RollbackReport:
        """Rewind the mirror itself to instant `to` (ns since the epoch) or to right
        after write `to_seq`.

        Writes after the point are undone and leave the timeline; delayed writes not
        yet applied are dropped (they would land on the rewound image).  The unit is
        marked as no longer equal to the local volume.  Refused while a resync runs
        or point-in-time views are open."""
        with self._lock:
            self._check_open()
            self._check_not_promoted("cannot be rolled back")
            st = self._st
            if st.resync is not None:
                raise StoreUsageError("cannot roll back while a resync is running")
            if self._views:
                raise StoreUsageError(
                    f"cannot roll back while {len(self._views)} point-in-time view(s) are open")
            point, i = self._resolve(to_seq, to)
            undo = len(self._hist) - i
            dropped = self._drop_pending_all() if self._pending else 0
            if undo == 0 and dropped == 0:
                return RollbackReport(point, 0, 0)
            assert self._hj is not None
            pos = self._hist[i].position if i < len(self._hist) else self._hj.end_position
            st.rollback = {"target_seq": point.seq, "target_ts": point.ts,
                           "segment": pos[0], "offset": pos[1], "from_seq": self._applied,
                           "dropped": dropped, "undone": undo}
            self._save_state()
            self._finish_rollback()
            return RollbackReport(point, undo, dropped)

    def _drop_pending_all(self) -> int:
        first, last = self._pending[0].seq, _last_seq(self._pending[-1])
        count = sum(1 for e in self._pending
                     if e.kind is RecordKind.WRITE and not self._is_dropped(e.seq))
        self._add_dropped(first, last, count)
        return count

    def _finish_rollback(self) -> None:
        st = self._st
        rb = st.rollback
        assert rb is not None and self._hj is not None and self._mirror is not None
        pos = (rb["segment"], rb["offset"])
        undo = [e for e in self._hist if e.position >= pos]
        # Newest first: each block ends with its oldest undone before-image.  Redoing
        # this after a crash gives the same result, whatever part was done.
        for e in reversed(undo):
            self._mirror.pwrite(e.lbn * self.block_size, self._hj.read_payload(e))
        self._mirror.sync()
        self._hj.truncate_at(*pos)
        self._hist = [e for e in self._hist if e.position < pos]
        self._hist_bytes = sum(e.length for e in self._hist)
        target, source = rb["target_seq"], rb["from_seq"]
        if rb.get("undone", 0) and target < source:
            st.rolled_back.append([target, source])
        live_chunks = {e.seq for e in self._hist if e.kind is RecordKind.CHUNK_BEFORE}
        st.resyncs = [r for r in st.resyncs if r[0] in live_chunks]
        st.rollback = None
        st.equal_to_local = False
        self._applied_ts = rb["target_ts"]
        self._event("rollback", to_seq=target, to_ts=rb["target_ts"], from_seq=source,
                    undone=len(undo), dropped_pending=rb.get("dropped", 0))
        log.warning("unit %s: mirror rolled back from seq %d to seq %d (%d entries undone)",
                    self.unit_id, source, target, len(undo))
        if self._relay is not None:
            self._relay.reset(self._applied)
        elif self._st.relay is not None:
            self._st.relay["full"] = True
        self._save_state()

    # ================================================================== relay

    def _new_relay_hold(self, state: dict[str, Any]) -> RelayHold:
        return RelayHold(state, self._applied, hold_bytes=self._relay_hold_bytes)

    def _chunks_of_entry(self, e: LogEntry) -> Iterator[int]:
        if e.kind is RecordKind.WRITE and not self._is_dropped(e.seq):
            yield from self._chunks_of((e,))

    def relay_enable(self, name: str) -> None:
        """Forward this unit to the further remote `name` (firmware/remote/relay.py).
        A first downstream of a unit that holds data gets it by a checksum resync."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.relay is not None and st.relay["name"] == name:
                return
            st.relay = RelayHold.new_state(name, self._applied > 0 or self._durable > 0)
            self._relay = self._new_relay_hold(st.relay)
            self._event("relay", to=name)
            self._save_state()

    def relay_call(self, fn: Callable[[RelayHold], Any]) -> Any:
        """Run `fn` on the relay hold under the unit's lock."""
        with self._lock:
            self._check_open()
            if self._relay is None:
                raise StoreUsageError(f"unit {self.unit_id!r} has no relay")
            return fn(self._relay)

    def relay_paused(self) -> str | None:
        """Why nothing can be forwarded now (None: it can)."""
        with self._lock:
            if self._closed:
                return "unit closed"
            if self._st.promoted is not None:
                return "the unit is promoted here"
            if self._st.resync is not None:
                return "the unit runs a checksum resync"
            return None

    def relay_records(self, after: int, barrier_after: int,
                      max_bytes: int) -> tuple[list[WriteRecord], int]:
        """Applied records after seq `after` for the relay, with their barriers."""
        with self._lock:
            self._check_open()
            hold = self._relay
            assert hold is not None and self._rj is not None and self._points is not None
            if hold.base > after:
                return [], barrier_after  # let go: the next plan resyncs their chunks
            rj = self._rj
            return records_for_relay(hold.held, self._points.points, after, barrier_after,
                                     max_bytes, rj.read_payload, self._is_dropped)

    # ================================================================== promotion

    @property
    def promoted(self) -> bool:
        return self._st.promoted is not None

    @property
    def serving_host(self) -> bool:
        """Promoted and not handing its role back: its own host may write."""
        return self._st.promoted is not None and not self._handing_back

    @property
    def copy_seq(self) -> int:
        """The seq this copy holds, in the seqs of the queue its lineage counts (the local
        queue's): the last durable one received, or for a promoted unit the fork plus
        one per host write since (its own writes carry no queue seqs)."""
        with self._lock:
            p = self._st.promoted
            if p is not None:
                return int(p["fork_seq"]) + int(p["writes"])
            return max(0, self._durable - self._st.seq_offset)

    def promote(self, at_seq: int | None = None, *, forced: bool = False) -> PromoteReport:
        """Make this copy a primary of its own with the mirror as of right after write
        `at_seq` (the last applied one by default): replication stops for good, a new
        generation forks at that point and is recorded, and the mirror becomes writable
        through `promoted_device()`.

        An earlier point is reached by rolling back through history; a later one that
        was received but held back (commit delay) by applying up to it.  Received writes
        after the point are dropped.  `forced` records that a live, undemoted primary
        was overridden (the caller checks for one)."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.promoted is not None:
                raise PromoteRefused(f"unit {self.unit_id!r} is already promoted (at seq "
                                     f"{st.promoted['seq']})")
            if st.resync is not None:
                raise PromoteRefused("a resync is running: the mirror holds no consistent "
                                     "image until it completes")
            target = self._applied if at_seq is None else at_seq
            undone = dropped = 0
            # Chunks of received writes that leave the timeline here: the local's copy
            # holds them, this image does not, so a failback compares them too.
            lost: set[int] = set(self._chunks_of(
                e for e in self._pending if e.kind is RecordKind.WRITE and e.seq > target))
            if target < self._applied:
                try:
                    _, first_undone = self._resolve(target, None)
                except (NotRestorable, OutsideRetention, StoreUsageError) as exc:
                    raise PromoteRefused(f"cannot promote at seq {target}: {exc}") from None
                lost.update(self._chunks_of(self._hist[first_undone:]))
            if target > self._applied:
                if target > self._durable:
                    raise PromoteRefused(f"seq {target} was never received here (last "
                                         f"durable seq {self._durable})")
                # Roll forward: what was held back up to the point goes to the mirror now.
                later = [e for e in self._pending if e.seq > target]
                if later:
                    count = sum(1 for e in later if e.kind is RecordKind.WRITE
                                and not self._is_dropped(e.seq))
                    self._add_dropped(later[0].seq, _last_seq(later[-1]), count)
                    dropped = count
                self.apply_due((1 << 63) - 1)
            elif target < self._applied:
                try:
                    r = self.rollback(to_seq=target)
                except (NotRestorable, OutsideRetention, StoreUsageError) as exc:
                    raise PromoteRefused(f"cannot promote at seq {target}: {exc}") from None
                target, undone, dropped = r.target.seq, r.undone, r.dropped_pending
            if self._pending:
                dropped += self._drop_pending_all()
                self._pending.clear()
            now = self._clock()
            fork_seq = max(0, target - st.seq_offset)
            lineage = self._lineage.fork(Role.PRIMARY, fork_seq, now / NS, forced, _RNG)
            # The empty map first, then the lineage, then the state that says so: a
            # crash in between leaves a unit that reopens as the secondary it was.
            dirty = DirtyMap(self._ops, self.directory, self.chunk_count)
            for c in lost:
                dirty.set(c)
            dirty.save()
            self._write_lineage(lineage)
            self._lineage, self._dirty = lineage, dirty
            st.promoted = {"seq": target, "fork_seq": fork_seq, "at_ns": now,
                           "forced": forced, "writes": 0,
                           "dropped_chunks": chunk_ranges(lost),
                           "generation": lineage.generation}
            self._event("promote", seq=target, fork_seq=fork_seq, forced=forced,
                        generation=lineage.generation, undone=undone, dropped=dropped)
            self._save_state()
            log.warning("unit %s: %spromoted at seq %d (queue seq %d), generation %016x; "
                        "replication into it has stopped", self.unit_id,
                        "force-" if forced else "", target, fork_seq, lineage.generation)
            return PromoteReport(target, fork_seq, lineage.generation, forced, undone,
                                 dropped)

    def promoted_device(self) -> PromotedDevice:
        """The promoted mirror as a writable device for its new host."""
        with self._lock:
            self._check_open()
            if self._st.promoted is None:
                raise StoreUsageError(f"unit {self.unit_id!r} is not promoted: its mirror "
                                      "is served read-only")
            return PromotedDevice(self)

    def dirty_chunks(self) -> list[int]:
        """Chunks the promoted unit's host wrote since the promotion."""
        with self._lock:
            return [] if self._dirty is None else self._dirty.dirty_chunks()

    def _chunks_of(self, entries: Iterable[LogEntry]) -> Iterator[int]:
        bs = self.block_size
        for e in entries:
            if e.nblocks:
                yield from range(e.lbn * bs // CHUNK_SIZE,
                                 ((e.lbn + e.nblocks) * bs - 1) // CHUNK_SIZE + 1)

    def _host_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        with self._lock:
            self._check_open()
            p = self._st.promoted
            if p is None or self._handing_back:
                raise NotReady(f"unit {self.unit_id!r} is handing its role back to its "
                               "local (failback): its host's writes are stopped")
            assert self._dirty is not None and self._mirror is not None
            first = offset // CHUNK_SIZE
            last = (offset + max(len(data), 1) - 1) // CHUNK_SIZE
            # The bit is durable before the data can reach the disk.
            new = self._dirty.mark(first, last)
            p["writes"] = int(p["writes"]) + 1
            if new and p["writes"] == 1:
                self._save_state()  # "wrote since the fork" must survive a power cut
            self._mirror.pwrite(offset, bytes(data))
            if fua:
                self._mirror.sync()

    # ================================================================== failback

    def begin_hand_back(self) -> HandBackPlan:
        """Stop the promoted unit's host writes for a failback and say what the local
        must compare: the chunks written here since the promotion (and those of the
        local's writes dropped at it).  `end_hand_back` lets the host write again;
        `hand_back` completes it."""
        with self._lock:
            self._check_open()
            p = self._st.promoted
            if p is None or self._dirty is None:
                raise StoreUsageError(f"unit {self.unit_id!r} is not promoted: it has no "
                                      "role to hand back")
            if self._handing_back:
                raise StoreUsageError(f"unit {self.unit_id!r} is already handing its role "
                                      "back")
            assert self._mirror is not None
            self._handing_back = True
            self._mirror.sync()
            dropped = bytearray((self.chunk_count + 7) // 8)
            for lo, hi in p.get("dropped_chunks", []):
                for c in range(lo, hi + 1):
                    dropped[c >> 3] |= 1 << (c & 7)
            return HandBackPlan(seq=int(p["fork_seq"]) + int(p["writes"]),
                                lineage=self._lineage, changed=self._dirty.bitmap,
                                dropped=bytes(dropped), chunk_size=CHUNK_SIZE,
                                chunk_count=self.chunk_count)

    def end_hand_back(self) -> None:
        """The failback did not complete: the unit stays the primary, its host writes."""
        with self._lock:
            if self._handing_back:
                self._handing_back = False
                log.warning("unit %s: failback ended without a commit; the unit stays the "
                            "primary", self.unit_id)

    def hand_back(self, local_seq: int, lineage: Lineage) -> int:
        """The local now holds this unit's image: the unit follows the local again, as
        `lineage` (a generation the local forked off this unit's) from the local's seq
        `local_seq`.  The history before the promotion is dropped (the mirror was written
        in place since, so those images cannot be rebuilt).  Returns the unit's seq."""
        with self._lock:
            self._check_open()
            st = self._st
            p = st.promoted
            if p is None or not self._handing_back:
                raise StoreUsageError(f"unit {self.unit_id!r} is not handing its role back")
            if lineage.current.parent != self._lineage.generation:
                raise StoreUsageError(
                    f"generation {lineage.generation:016x} was not forked off this unit's "
                    f"{self._lineage.generation:016x}")
            assert self._mirror is not None and self._hj is not None
            self._mirror.sync()
            # The lineage first: a crash before the state is saved reopens as a promoted
            # unit whose lineage already follows the local, which _open_lineage finishes.
            self._write_lineage(self._lineage.adopt(lineage))
            self._lineage = self._lineage.adopt(lineage)
            offset = st.seq_offset
            if local_seq + offset <= self._durable:
                offset = self._durable + 1 - local_seq
            seq = local_seq + offset
            self._finish_hand_back(seq, offset)
            log.warning("unit %s: handed its role back; follows the local's generation "
                        "%016x from its seq %d", self.unit_id, lineage.generation, local_seq)
            return seq

    def _finish_hand_back(self, seq: int, offset: int) -> None:
        st = self._st
        assert self._hj is not None
        now = self._clock()
        self._pending.clear()
        self._applied = self._durable = seq
        self._applied_ts = now
        st.seq_offset = offset
        st.dropped = []
        st.promoted = None
        st.equal_to_local = True
        # Nothing before this point can be rebuilt: the history starts here.
        self._hist_base += len(self._hist)
        self._hist = []
        self._hist_bytes = 0
        st.floor_seq, st.floor_ts = seq, now
        st.floor_segment, st.floor_offset = self._hj.end_position
        st.resyncs, st.rolled_back = [], []
        self._event("hand-back", seq=seq, generation=self._lineage.generation)
        self._save_state()
        if self._points is not None:
            self._points.prune(st.floor_seq)
        if self._dirty is not None:
            self._dirty.remove()
            self._dirty = None
        self._handing_back = False
        self._trim_segments()

    def give_up(self) -> GiveUpReport:
        """The promoted unit gives up the writes its own host made (a split brain
        resolved for the other copy): they are kept as a conflict image in the unit's
        directory, the unit follows the generation it was promoted off again, and its
        next session with that local starts with a checksum resync (its mirror was
        written in place, so only digests and differing chunks cross the link)."""
        with self._lock:
            self._check_open()
            st = self._st
            p = st.promoted
            if p is None or self._dirty is None:
                raise StoreUsageError(f"unit {self.unit_id!r} is not promoted: it has no "
                                      "writes of its own to give up")
            if self._handing_back:
                raise StoreUsageError(f"unit {self.unit_id!r} is handing its role back")
            chain = self._lineage.chain
            parents = [i for i, g in enumerate(chain) if g.generation ==
                       self._lineage.current.parent]
            if not parents:
                raise StoreUsageError("the generation this unit was promoted off is not in "
                                      "its lineage")
            assert self._mirror is not None
            self._mirror.sync()
            chunks = self._dirty.dirty_chunks()
            name = f"conflict-{self._lineage.generation:016x}"
            image, listing = (os.path.join(self.directory, name + ext)
                              for ext in (".img", ".json"))
            # The writes first, durably, then the lineage, then the state that says so.
            write_conflict_image(
                self._ops, image, self.volume_size, [self._chunk_range(c) for c in chunks],
                self._mirror.pread, listing,
                json.dumps({"generation": f"{self._lineage.generation:016x}",
                            "chunk_size": CHUNK_SIZE, "chunks": chunk_ranges(chunks),
                            "volume_size": self.volume_size}).encode())
            i = parents[-1]
            back = Lineage(chain[i], chain[:i], writer=False)
            self._write_lineage(back)
            self._lineage = back
            writes = int(p["writes"])
            self._finish_give_up()
            log.warning("unit %s: gave up %d host writes in %d chunks (kept in %s); it "
                        "follows generation %016x again and resyncs by checksum",
                        self.unit_id, writes, len(chunks), image, back.generation)
            return GiveUpReport(back.generation, writes, len(chunks), image, listing)

    def _finish_give_up(self) -> None:
        st = self._st
        assert self._hj is not None
        now = self._clock()
        st.promoted = None
        # The mirror differs from what the seqs say: only a full checksum resync with
        # the local may follow (check_queue asks for one when the queue is not known).
        st.queue_id = None
        st.equal_to_local = False
        self._hist_base += len(self._hist)
        self._hist = []
        self._hist_bytes = 0
        st.floor_seq, st.floor_ts = self._durable, now
        st.floor_segment, st.floor_offset = self._hj.end_position
        st.resyncs, st.rolled_back = [], []
        self._event("give-up", generation=self._lineage.generation)
        self._save_state()
        if self._points is not None:
            self._points.prune(st.floor_seq)
        if self._dirty is not None:
            self._dirty.remove()
            self._dirty = None
        self._trim_segments()

    def _host_flush(self) -> None:
        with self._lock:
            self._check_open()
            assert self._mirror is not None
            self._mirror.sync()

    # ================================================================== undo before commit

    @property
    def commit_delay_s(self) -> float:
        return self._st.commit_delay_ns / NS

    def set_commit_delay(self, seconds: float) -> None:
        """Hold received writes this long (after their timestamp) before applying them."""
        with self._lock:
            self._check_open()
            self._st.commit_delay_ns = self._delay_ns(seconds)
            self._save_state()

    @staticmethod
    def _delay_ns(seconds: float) -> int:
        if seconds < 0:
            raise StoreUsageError(f"commit delay must be >= 0 seconds, not {seconds}")
        return int(seconds * NS)

    def drop_range(
        self,
        t_from: int | None = None,
        t_to: int | None = None,
        *,
        seq_from: int | None = None,
        seq_to: int | None = None,
    ) -> DropReport:
        """Remove pending (delayed) writes from the receive journal before they reach
        the mirror: those with t_from <= ts <= t_to (ns), or seq_from <= seq <= seq_to.

        They are marked dropped in the state, logged, and never applied; the unit is
        then no longer equal to the local volume.  Raises AlreadyApplied if the range
        covers a write that already reached the mirror (use rollback for those)."""
        by_time = t_from is not None or t_to is not None
        by_seq = seq_from is not None or seq_to is not None
        if by_time == by_seq:
            raise StoreUsageError("give a time range (t_from, t_to) or a seq range, not both")
        with self._lock:
            self._check_open()
            if by_seq:
                lo = 1 if seq_from is None else seq_from
                hi = self._durable if seq_to is None else seq_to
                if lo > hi:
                    raise StoreUsageError(f"empty seq range {lo}..{hi}")
                if lo <= self._applied:
                    raise AlreadyApplied(
                        f"seqs {lo}..{min(hi, self._applied)} already reached the mirror "
                        f"(last applied {self._applied}); roll back instead")
                chosen = [e for e in self._pending if lo <= e.seq <= hi]
            else:
                lo_t = 0 if t_from is None else t_from
                hi_t = (1 << 64) - 1 if t_to is None else t_to
                if lo_t > hi_t:
                    raise StoreUsageError(f"empty time range {lo_t}..{hi_t}")
                applied_hit = any(
                    e.kind is RecordKind.BEFORE and lo_t <= e.ts <= hi_t for e in self._hist
                ) or (self._applied > 0 and lo_t <= self._applied_ts <= hi_t)
                if applied_hit or (lo_t < self._st.floor_ts and self._st.floor_seq > 0):
                    raise AlreadyApplied(
                        f"writes between {_fmt_ns(lo_t)} and {_fmt_ns(hi_t)} already reached "
                        f"the mirror (last applied seq {self._applied} at "
                        f"{_fmt_ns(self._applied_ts)}); roll back instead")
                chosen = [e for e in self._pending if lo_t <= e.ts <= hi_t]
            chosen = [e for e in chosen
                      if e.kind is RecordKind.WRITE and not self._is_dropped(e.seq)]
            if not chosen:
                return DropReport(0, 0, 0, 0)
            nbytes = sum(e.payload_len for e in chosen)
            # A time range over non-monotonic timestamps may pick non-adjacent seqs.
            runs: list[list[int]] = []
            for e in chosen:
                if runs and runs[-1][1] + 1 == e.seq:
                    runs[-1][1] = e.seq
                else:
                    runs.append([e.seq, e.seq])
            for a, b in runs:
                self._add_dropped(a, b, 0)
            self._st.dropped_total += len(chosen)
            self._event("drop", first_seq=chosen[0].seq, last_seq=chosen[-1].seq,
                        count=len(chosen), bytes=nbytes,
                        t_from=t_from, t_to=t_to)
            self._st.equal_to_local = False
            self._save_state()
            log.warning("unit %s: dropped %d pending writes (seqs %d..%d, %d bytes); the "
                        "remote no longer equals the local volume", self.unit_id,
                        len(chosen), chosen[0].seq, chosen[-1].seq, nbytes)
            return DropReport(len(chosen), chosen[0].seq, chosen[-1].seq, nbytes)

    def _add_dropped(self, lo: int, hi: int, count: int) -> None:
        ranges = sorted(self._st.dropped + [[lo, hi]])
        merged: list[list[int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._st.dropped = merged
        self._st.dropped_total += count
        self._st.equal_to_local = False

    # ================================================================== resync

    @property
    def chunk_size(self) -> int:
        return CHUNK_SIZE

    @property
    def chunk_count(self) -> int:
        return (self.volume_size + CHUNK_SIZE - 1) // CHUNK_SIZE

    def _chunk_range(self, chunk: int) -> tuple[int, int]:
        if not 0 <= chunk < self.chunk_count:
            raise StoreUsageError(f"chunk {chunk} outside 0..{self.chunk_count - 1}")
        off = chunk * CHUNK_SIZE
        return off, min(CHUNK_SIZE, self.volume_size - off)

    def chunk_digests(self, chunks: Iterable[int] | None = None) -> dict[int, bytes]:
        """BLAKE3-256 digests of 64 KiB chunks of the current mirror (all if None).
        A chunk inside a hole of the mirror file is the zero chunk: not read."""
        with self._lock:
            self._check_open()
            assert self._mirror is not None
            todo = list(range(self.chunk_count) if chunks is None else chunks)
            for c in todo:
                self._chunk_range(c)
            return sparse_chunk_digests(todo, CHUNK_SIZE, self.volume_size,
                                        self._mirror.pread,
                                        getattr(self._mirror, "data_extents", None),
                                        getattr(self._mirror, "will_need", None))

    @property
    def resync_active(self) -> bool:
        return self._st.resync is not None

    def begin_resync(self) -> int:
        """Mark a resync as started at the last applied seq S and return S.  Until
        `resync_complete()`, nothing more is applied and `image_at_seq(S)` keeps the
        last consistent image restorable.  Idempotent (a running resync continues)."""
        with self._lock:
            self._check_open()
            self._check_not_promoted("takes no resync")
            if self._st.resync is None:
                self._st.resync = {"start_seq": self._applied, "started_ns": self._clock()}
                self._event("resync-start", start_seq=self._applied)
                self._save_state()
                log.info("unit %s: resync started at seq %d", self.unit_id, self._applied)
            return int(self._st.resync["start_seq"])

    def write_chunk(self, chunk: int, data: bytes) -> bool:
        """Overwrite one resync chunk of the mirror, first saving its before-image to
        history (durably).  Starts a resync if none runs.  Returns False if the chunk
        already held `data` (nothing written)."""
        with self._lock:
            self._check_open()
            assert self._mirror is not None and self._hj is not None
            off, n = self._chunk_range(chunk)
            if len(data) != n:
                raise StoreUsageError(f"chunk {chunk} is {n} bytes, got {len(data)}")
            start = self.begin_resync()
            before = self._mirror.pread(off, n)
            if before == data:
                return False
            bs = self.block_size
            [entry] = self._hj.append([NewRecord(RecordKind.CHUNK_BEFORE, start, self._clock(),
                                                 off // bs, n // bs, before)])
            self._hj.sync()
            self._mirror.pwrite(off, data)
            self._hist.append(entry)
            self._hist_bytes += entry.length
            if self._relay is not None:
                self._relay.dirty.add(chunk)
            return True

    @property
    def queue_id(self) -> int | None:
        return self._st.queue_id

    @property
    def seq_offset(self) -> int:
        return self._st.seq_offset

    def set_queue_id(self, queue_id: int) -> None:
        """Record the local queue this unit follows (first contact)."""
        with self._lock:
            self._check_open()
            self._st.queue_id = queue_id
            self._save_state()

    def complete_requeue(self, local_seq: int, queue_id: int) -> int:
        """A full resync from a re-created local queue is complete: the mirror equals
        that queue's volume right after its seq `local_seq`.  From now on the unit
        follows `queue_id`, its seqs offset so they stay above every seq it holds
        (the image before the resync stays restorable).  Returns the unit's seq
        for `local_seq`."""
        with self._lock:
            self._check_open()
            offset = max(0, self._durable + 1 - local_seq)
            seq = local_seq + offset
            self._st.queue_id, self._st.seq_offset = queue_id, offset
            self._event("requeue", queue_id=queue_id, local_seq=local_seq, seq=seq,
                        seq_offset=offset)
            log.warning("unit %s: now follows local queue %08x; its seq %d is seq %d here",
                        self.unit_id, queue_id, local_seq, seq)
            self.resync_complete(seq)
            return seq

    def resync_complete(self, seq: int) -> None:
        """The mirror now equals the local volume right after `seq`: that becomes the
        last applied and durable seq; pending writes up to it are discarded."""
        with self._lock:
            self._check_open()
            assert self._mirror is not None
            st = self._st
            if st.resync is None:
                raise StoreUsageError("no resync is running")
            start = int(st.resync["start_seq"])
            if seq < start:
                raise StoreUsageError(f"resync started at seq {start}, cannot complete at {seq}")
            self._mirror.sync()
            now = self._clock()
            while self._pending and self._pending[0].seq <= seq:
                self._pending.popleft()
            if self._relay is not None:
                self._relay.cover(seq, self._chunks_of_entry)
            self._applied, self._applied_ts = seq, now
            self._durable = max(self._durable, seq)
            st.dropped = [r for r in st.dropped if r[1] > seq]
            if any(e.kind is RecordKind.CHUNK_BEFORE and e.seq == start for e in self._hist):
                st.resyncs.append([start, seq, now])
            st.resync = None
            st.equal_to_local = True
            self._event("resync-complete", start_seq=start, seq=seq)
            self._save_state()
            self._trim_segments()
            log.info("unit %s: resync from seq %d complete at seq %d", self.unit_id, start, seq)

    # ================================================================== status / close

    def _event(self, kind: str, **fields: Any) -> None:
        self._st.events.append({"event": kind, "at_ns": self._clock(), **fields})

    def status(self) -> UnitStatus:
        with self._lock:
            st = self._st
            pts = self._points.points if self._points is not None else []
            pending_bytes = sum(e.payload_len for e in self._pending)
            lag = self._durable - self._applied
            lag_s = 0.0
            if lag and self._pending:
                # Measured from the newest write the mirror holds; before the first
                # one, from the oldest write it lacks.
                ref = self._applied_ts if self._applied else self._pending[0].ts
                lag_s = max(0, self._newest_ts - ref) / NS
            return UnitStatus(
                unit_id=self.unit_id,
                volume_size=self.volume_size,
                block_size=self.block_size,
                last_applied_seq=self._applied,
                last_durable_seq=self._durable,
                pending_records=sum(1 for e in self._pending
                                    if e.kind is RecordKind.WRITE and not self._is_dropped(e.seq)),
                pending_bytes=pending_bytes,
                bytes_received=self._bytes_received,
                newest_ts_received=self._newest_ts,
                lag_seqs=lag,
                lag_seconds=lag_s,
                commit_delay_s=st.commit_delay_ns / NS,
                resync=None if st.resync is None else dict(st.resync),
                oldest_restorable_seq=st.floor_seq,
                oldest_restorable_ns=st.floor_ts,
                history_bytes=self._hist_bytes,
                history_records=len(self._hist),
                retention=self.retention,
                equal_to_local=st.equal_to_local,
                dropped_records=st.dropped_total,
                events=[dict(e) for e in st.events],
                skipped_seqs=st.skipped_total,
                skipped_ranges=[list(r) for r in st.skipped[-8:]],
                queue_id=st.queue_id,
                seq_offset=st.seq_offset,
                role=(self._lineage.current.role if self._lineage.writer
                      else Role.SECONDARY).value,
                generation=f"{self._lineage.generation:016x}",
                promoted=None if st.promoted is None else {
                    **st.promoted, "dirty_chunks": self._dirty.count if self._dirty else 0},
                points=sum(1 for p in pts if p.seq >= st.floor_seq),
                newest_point=None if not pts else {
                    "number": pts[-1].number, "seq": pts[-1].seq, "ts": pts[-1].ts},
            )

    def _check_not_promoted(self, what: str) -> None:
        p = self._st.promoted
        if p is not None:
            raise Promoted(f"unit {self.unit_id!r} was promoted at seq {p['seq']}: it {what}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUsageError(f"unit {self.unit_id!r} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Checkpoint, close files and release the unit's lock.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._mirror is not None and self._st.rollback is None:
                    self._save_state()
            finally:
                self._closed = True
                self._release()
        if self._on_close is not None:
            self._on_close(self)

    def _release(self) -> None:
        for j in (self._rj, self._hj):
            if j is not None:
                j.close()
        if self._points is not None:
            self._points.close()
        if self._mirror is not None:
            self._mirror.close()
        self._lock_handle.release()

    def __enter__(self) -> UnitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_ns(ns: int) -> str:
    secs, rem = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rem:09d}Z ({ns} ns)"


__all__ = [
    "DEFAULT_SEGMENT_BYTES", "DropReport", "PointInTime", "PointInTimeDevice", "PromoteReport",
    "PromotedDevice", "Retention",
    "RollbackReport", "UnitStatus", "UnitStore", "validate_unit_id",
]
