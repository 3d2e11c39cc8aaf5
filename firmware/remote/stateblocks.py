"""State-block detection: the blocks a unit's host rewrites far more often than their
neighbours, and around its barriers, found from the write stream alone.

A file system's superblock, journal superblock and commit blocks, a database's header
page and WAL index are rewritten at nearly every transaction, each time close to the
flush that ends it; bulk data is written once in a while.  Nothing here knows any
format: the remote only sees (block, time) for every write and where the barriers fall.

Bounded memory, whatever the volume size:

- an *admission filter*: two rows of `width / 2` u32 counters (a count-min sketch)
  estimating how often each block was written.  A bulk pass over millions of blocks
  only bumps counters;
- a *top-K table* of `capacity` entries (space-saving style: when it is full, a block
  enters only when its estimate beats the smallest count in the table, which it then
  evicts).  Each entry keeps its (decayed) count, the rewrites seen since it entered,
  how many of those fell within `window` writes before or after a barrier, the time of
  its first and last rewrite, and the barriers seen since it entered;
- *decay*: every `half_life` block updates, every counter and count is halved, so
  what the host did long ago fades and a block that stopped being rewritten drops out.

A rewrite is "near a barrier" when it comes at most `window` writes after one, or when a
barrier follows it within `window` writes (the last `window` writes are kept, by block,
until the next barrier decides).

Persisted as `<unit>/state-blocks.bin` at the unit's checkpoints: a versioned header
with a CRC32C over itself and the payload (firmware/record.py), written to a temporary
name and renamed over.  A file that fails its check, or was written with other sizes, is
not trusted: the sketch starts empty and relearns from the stream (it is advice for the
operator and for `find-point`'s ordering, never needed for a restore).
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from firmware.record import HeaderFormat, IntegrityError
from firmware.remote.fileio import FileOps

log = logging.getLogger("mirrorunit.remote")

STATE_BLOCKS_NAME = "state-blocks.bin"
SKETCH_MAGIC = b"MUSB"
SKETCH_VERSION = 1
# magic, version, reserved, capacity, width, window, entries, half_life, writes,
# barriers, updates since the last halving, crc
SKETCH = HeaderFormat("state-block sketch", struct.Struct("<4sHHIIIIQQQQI4x"), SKETCH_MAGIC,
                      SKETCH_VERSION)
assert SKETCH.size == 64
# block, count, seen, near, first_ts, last_ts, barriers when it entered
ENTRY = struct.Struct("<QdddQQQ")
assert ENTRY.size == 56

DEFAULT_CAPACITY = 256
DEFAULT_WIDTH = 1 << 16
DEFAULT_WINDOW = 4
DEFAULT_HALF_LIFE = 1 << 22
#: Blocks are hashed into the filter's rows with these odd multipliers (Fibonacci
#: hashing): cheap, and neighbouring blocks land far apart.
_MUL1 = 0x9E3779B97F4A7C15
_MUL2 = 0xC2B2AE3D27D4EB4F
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SketchSettings:
    """Sizes of the sketch (memory: about 4 * width + 100 * capacity bytes)."""

    capacity: int = DEFAULT_CAPACITY
    width: int = DEFAULT_WIDTH
    window: int = DEFAULT_WINDOW
    half_life: int = DEFAULT_HALF_LIFE

    def __post_init__(self) -> None:
        if not 1 <= self.capacity <= 1 << 16:
            raise ValueError(f"state-block capacity {self.capacity} is not in 1..65536")
        if self.width < 2 or self.width & (self.width - 1) or self.width > 1 << 24:
            raise ValueError(f"state-block filter width {self.width} is not a power of two "
                             "in 2..2^24")
        if not 0 <= self.window <= 1024:
            raise ValueError(f"state-block window {self.window} is not in 0..1024")
        if self.half_life < 1:
            raise ValueError("state-block half-life must be at least one block update")


class _Entry:
    __slots__ = ("block", "count", "seen", "near", "first_ts", "last_ts", "barriers0")

    def __init__(self, block: int, count: float, ts: int, barriers0: int) -> None:
        self.block = block
        self.count = count
        self.seen = 0.0
        self.near = 0.0
        self.first_ts = ts
        self.last_ts = ts
        self.barriers0 = barriers0


@dataclass(frozen=True)
class StateBlock:
    """A run of adjacent blocks the host rewrites together, often and near barriers."""

    block: int
    nblocks: int
    offset: int
    #: Decayed rewrite count (the ranking), and rewrites seen since it was tracked.
    count: float
    rewrites: float
    #: Rewrites per second over the time it was tracked, and per barrier seen.
    per_second: float
    per_barrier: float
    #: Share of its rewrites that fell within `window` writes of a barrier.
    barrier_affinity: float
    #: Its count over the filter's estimate for the blocks just outside the run.
    neighbour_ratio: float


class StateBlockSketch:
    """The sketch of one unit.  Not thread-safe: the unit store calls it under its lock."""

    def __init__(self, settings: SketchSettings | None = None) -> None:
        self.settings = settings or SketchSettings()
        s = self.settings
        self._row = s.width // 2
        self._shift = 64 - (self._row.bit_length() - 1)
        self._filter = array("I", bytes(4 * s.width))
        self._table: dict[int, _Entry] = {}
        self._heap: list[tuple[float, int]] = []
        self.writes = 0
        self.barriers = 0
        self._updates = 0
        self._since_barrier = 1 << 62  # no barrier seen yet
        self._pending: deque[list[int]] = deque(maxlen=max(1, s.window))

    # ------------------------------------------------------------ observing

    def _slots(self, block: int) -> tuple[int, int]:
        return (((block * _MUL1) & _MASK64) >> self._shift,
                self._row + (((block * _MUL2) & _MASK64) >> self._shift))

    def estimate(self, block: int) -> int:
        """The filter's (over-)estimate of the block's decayed write count."""
        if block < 0:
            return 0
        a, b = self._slots(block)
        return min(self._filter[a], self._filter[b])

    def _table_min(self) -> float:
        heap, table = self._heap, self._table
        while heap:
            c, blk = heap[0]
            e = table.get(blk)
            if e is not None and e.count == c:
                return c
            heapq.heappop(heap)
        return 0.0

    def _rebuild_heap(self) -> None:
        self._heap = [(e.count, b) for b, e in self._table.items()]
        heapq.heapify(self._heap)

    def observe_write(self, lbn: int, nblocks: int, ts: int) -> None:
        """One write of `nblocks` blocks at block `lbn`, in the stream's order."""
        s = self.settings
        self.writes += 1
        near_now = self._since_barrier < s.window
        self._since_barrier += 1
        flt, table, heap, cap = self._filter, self._table, self._heap, s.capacity
        row, shift = self._row, self._shift
        waiting: list[int] = []
        for blk in range(lbn, lbn + nblocks):
            a = ((blk * _MUL1) & _MASK64) >> shift
            b = row + (((blk * _MUL2) & _MASK64) >> shift)
            ca = flt[a] + 1
            cb = flt[b] + 1
            if ca < 0xFFFFFFFF:
                flt[a] = ca
            if cb < 0xFFFFFFFF:
                flt[b] = cb
            e = table.get(blk)
            if e is None:
                est = float(min(ca, cb))
                if len(table) >= cap:
                    if est <= self._table_min():
                        continue  # not (yet) a heavy hitter: only the filter counts it
                    _, gone = heapq.heappop(heap)
                    del table[gone]
                e = _Entry(blk, est, ts, self.barriers)
                table[blk] = e
            else:
                e.count += 1.0
            e.seen += 1.0
            e.last_ts = ts
            heapq.heappush(heap, (e.count, blk))
            if near_now:
                e.near += 1.0
            elif s.window:
                waiting.append(blk)
        if len(heap) > 8 * cap + 64:
            self._rebuild_heap()
        if s.window and not near_now:
            self._pending.append(waiting)
        self._updates += nblocks
        if self._updates >= s.half_life:
            self._decay()

    def observe_barrier(self) -> None:
        """A barrier (host flush or FUA write) after the writes observed so far."""
        self.barriers += 1
        table = self._table
        for blocks in self._pending:
            for blk in blocks:
                e = table.get(blk)
                if e is not None:
                    e.near += 1.0
        self._pending.clear()
        self._since_barrier = 0

    def _decay(self) -> None:
        self._updates = 0
        self._filter = array("I", (c >> 1 for c in self._filter))
        for e in self._table.values():
            e.count *= 0.5
            e.seen *= 0.5
            e.near *= 0.5
        self._rebuild_heap()

    # ------------------------------------------------------------ reading

    def top(self, limit: int = 32, min_rewrites: float = 2.0) -> list[StateBlock]:
        """The tracked blocks, adjacent ones with like counts joined into runs, most
        rewritten first; runs seen rewritten fewer than `min_rewrites` times left out."""
        table = self._table
        done: set[int] = set()
        runs: list[StateBlock] = []
        for blk in sorted(table, key=lambda b: -table[b].count):
            if blk in done:
                continue
            head = table[blk]

            def like(b: int, ref: _Entry = head) -> bool:
                e = table.get(b)
                return (e is not None and b not in done
                        and 0.5 * ref.count <= e.count <= 2.0 * ref.count)

            lo = blk
            while like(lo - 1):
                lo -= 1
            hi = blk
            while like(hi + 1):
                hi += 1
            members = [table[b] for b in range(lo, hi + 1)]
            done.update(range(lo, hi + 1))
            seen = max(e.seen for e in members)
            if seen < min_rewrites:
                continue
            near = max(e.near for e in members)
            first = min(e.first_ts for e in members)
            last = max(e.last_ts for e in members)
            span = (last - first) / 1e9
            barriers = self.barriers - min(e.barriers0 for e in members)
            outside = max(self.estimate(lo - 1), self.estimate(hi + 1), 1)
            runs.append(StateBlock(
                block=lo, nblocks=hi - lo + 1, offset=0, count=round(head.count, 2),
                rewrites=round(seen, 2),
                per_second=round(seen / span, 3) if span > 0 else 0.0,
                per_barrier=round(seen / barriers, 3) if barriers > 0 else 0.0,
                barrier_affinity=round(min(1.0, near / seen), 3) if seen else 0.0,
                neighbour_ratio=round(head.count / outside, 2)))
            if len(runs) >= limit:
                break
        return runs

    def snapshot(self, block_size: int, limit: int = 32) -> dict[str, Any]:
        s = self.settings
        entries = [{**vars(r), "offset": r.block * block_size} for r in self.top(limit)]
        return {"writes": self.writes, "barriers": self.barriers, "tracked": len(self._table),
                "capacity": s.capacity, "width": s.width, "window": s.window,
                "half_life": s.half_life, "block_size": block_size, "state_blocks": entries}

    def hot_blocks(self, limit: int = 8, min_affinity: float = 0.5,
                   min_ratio: float = 4.0) -> set[int]:
        """The blocks of the top runs that stand out (for find-point): rewritten near
        barriers, `min_ratio` times more often than their neighbours, and at least a
        quarter as often as the top run."""
        out: set[int] = set()
        runs = self.top(limit)
        if not runs:
            return out
        floor = runs[0].count / 4
        for r in runs:
            if (r.barrier_affinity >= min_affinity and r.neighbour_ratio >= min_ratio
                    and r.count >= floor):
                out.update(range(r.block, r.block + r.nblocks))
        return out

    # ------------------------------------------------------------ persistence

    def encode(self) -> bytes:
        s = self.settings
        payload = self._filter.tobytes() + b"".join(
            ENTRY.pack(e.block, e.count, e.seen, e.near, e.first_ts, e.last_ts, e.barriers0)
            for e in self._table.values())
        head, _ = SKETCH.pack(0, s.capacity, s.width, s.window, len(self._table), s.half_life,
                              self.writes, self.barriers, self._updates, payload=payload)
        return head + payload

    @classmethod
    def decode(cls, raw: bytes, settings: SketchSettings, path: str) -> StateBlockSketch:
        """The sketch saved in `raw`; IntegrityError when it is torn, of another format,
        or was sized otherwise than `settings`."""
        (_, cap, width, window, n, half_life, writes, barriers,
         updates, _crc) = SKETCH.unpack(raw, path=path, offset=0)
        if (cap, width, window, half_life) != (settings.capacity, settings.width,
                                               settings.window, settings.half_life):
            raise IntegrityError(path, 0, "state-block sketch sized with other settings")
        if n > cap:
            raise IntegrityError(path, 0, f"state-block sketch holds {n} of {cap} entries")
        size = SKETCH.size + 4 * width + n * ENTRY.size
        if len(raw) != size:
            raise IntegrityError(path, 0, f"state-block sketch is {len(raw)} bytes, "
                                 f"expected {size}")
        payload = memoryview(raw)[SKETCH.size:]
        SKETCH.check(raw[:SKETCH.size], payload, path=path, offset=0)
        sk = cls(settings)
        sk._filter = array("I")
        sk._filter.frombytes(payload[:4 * width])
        off = 4 * width
        for _ in range(n):
            blk, count, seen, near, first, last, b0 = ENTRY.unpack_from(payload, off)
            off += ENTRY.size
            e = _Entry(blk, count, first, b0)
            e.seen, e.near, e.last_ts = seen, near, last
            sk._table[blk] = e
        sk.writes, sk.barriers, sk._updates = writes, barriers, updates
        sk._rebuild_heap()
        return sk


def load(ops: FileOps, directory: str, settings: SketchSettings) -> StateBlockSketch:
    """The unit's saved sketch, or an empty one when there is none or it is not whole."""
    path = os.path.join(directory, STATE_BLOCKS_NAME)
    if not ops.exists(path):
        return StateBlockSketch(settings)
    h = ops.open(path)
    try:
        raw = h.pread(0, h.size())
    finally:
        h.close()
    try:
        return StateBlockSketch.decode(raw, settings, path)
    except IntegrityError as exc:
        log.warning("state-block sketch not used (%s); it starts over from the write stream",
                    exc)
        return StateBlockSketch(settings)


def save(ops: FileOps, directory: str, sketch: StateBlockSketch) -> None:
    """Write the sketch under a temporary name and rename it over the old one."""
    path = os.path.join(directory, STATE_BLOCKS_NAME)
    tmp = path + ".tmp"
    h = ops.open(tmp, create=True)
    try:
        h.truncate(0)
        h.pwrite(0, sketch.encode())
        h.sync()
    finally:
        h.close()
    ops.rename(tmp, path)
