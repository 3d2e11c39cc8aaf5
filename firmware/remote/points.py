"""A remote unit's consistent points: the barriers its local sent, kept durably.

    <unit>/points.log   fixed POINT records back to back, oldest first

A barrier is an instant at which the host declared every write so far durable (a
FLUSH, a SYNCHRONIZE CACHE, a completed FUA write): the image right after its seq is
what a crash-consistent file system or database recovers from.  Each record holds the
point's number (never reused, so `--point N` names one instant for good), the seq it
covers, the host's time, the bytes written since the previous point, the barrier's
flags (kind, front end, opcode), its connection, and whether the instant lies inside a
resync (then no consistent image exists there until the resync completes).

Records are appended and synced with the receive journal's batch; a torn tail fails
its CRC and is cut off at open.  Pruning (with the history's retention) rewrites the
file to a temporary name and renames it over, so a crash leaves the old or the new one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from firmware.record import HeaderFormat, IntegrityError
from firmware.remote.errors import JournalCorruption
from firmware.remote.fileio import FileHandle, FileOps

POINTS_NAME = "points.log"
POINT_MAGIC = b"MUPT"
POINT_VERSION = 1
# magic, version, flags, front end, opcode, status, number, seq, ts_ns, bytes since the
# previous point, connection, cum_blocks, crc
POINT = HeaderFormat("point", struct.Struct("<4sHHBBHQQQQQQI"), POINT_MAGIC, POINT_VERSION)
assert POINT.size == 64

#: Status bits of a point.
POINT_IN_RESYNC = 0x1

#: Points kept at most (oldest dropped first), whatever the history's retention.
MAX_POINTS = 100_000


@dataclass(frozen=True)
class Point:
    """One consistent point: the image right after write `seq`."""

    number: int
    seq: int
    ts: int
    #: Bytes the host wrote between the previous point and this one.
    bytes_since: int
    #: The local queue's barrier kind bits (FLUSH 0x1, FUA 0x2).
    kind: int
    front_end: int
    opcode: int
    connection: int
    cum_blocks: int
    in_resync: bool

    def encode(self) -> bytes:
        raw, _ = POINT.pack(self.kind, self.front_end, self.opcode,
                            POINT_IN_RESYNC if self.in_resync else 0, self.number, self.seq,
                            self.ts, self.bytes_since, self.connection, self.cum_blocks)
        return raw

    @classmethod
    def decode(cls, raw: bytes, path: str, offset: int) -> Point:
        (kind, front, opcode, status, number, seq, ts, since, conn,
         cum, _crc) = POINT.verify(raw, path=path, offset=offset)
        return cls(number, seq, ts, since, kind, front, opcode, conn, cum,
                   bool(status & POINT_IN_RESYNC))


class PointLog:
    """The points of one unit, in memory and in `points.log`.  Not thread-safe: the
    unit store calls it under its lock."""

    def __init__(self, ops: FileOps, directory: str) -> None:
        self._ops = ops
        self.directory = directory
        self.path = os.path.join(directory, POINTS_NAME)
        self.points: list[Point] = []
        self._file: FileHandle | None = None
        self._end = 0
        self.next_number = 1

    def open(self, next_number: int = 1) -> int:
        """Read the log; a torn tail is cut off.  Returns how many points it holds."""
        ops = self._ops
        h = ops.open(self.path, create=True)
        size = h.size()
        raw = h.pread(0, size) if size else b""
        points: list[Point] = []
        off = 0
        while off + POINT.size <= len(raw):
            try:
                p = Point.decode(raw[off:off + POINT.size], self.path, off)
            except IntegrityError:
                break  # a torn append: nothing after it was acknowledged as a point
            if points and (p.number <= points[-1].number or p.seq < points[-1].seq):
                raise JournalCorruption(f"point {p.number} at seq {p.seq} out of order",
                                        self.path)
            points.append(p)
            off += POINT.size
        if off != size:
            h.truncate(off)
            h.sync()
        self._file, self._end, self.points = h, off, points
        self.next_number = max(next_number, points[-1].number + 1 if points else 1)
        return len(points)

    @property
    def last(self) -> Point | None:
        return self.points[-1] if self.points else None

    def add(self, seq: int, ts: int, kind: int, front_end: int, opcode: int,
            connection: int, cum_blocks: int, block_size: int,
            in_resync: bool) -> Point | None:
        """Note a barrier (durable at the next `sync`); None when the last point is at
        this seq or later already (a barrier resent after a reconnect, or a second
        flush with no write between: the same instant of the image)."""
        last = self.last
        if last is not None and seq <= last.seq:
            return None
        prev_cum = last.cum_blocks if last is not None else 0
        since = max(0, cum_blocks - prev_cum) * block_size
        p = Point(self.next_number, seq, ts, since, kind, front_end, opcode, connection,
                  cum_blocks, in_resync)
        assert self._file is not None
        self._file.pwrite(self._end, p.encode())
        self._end += POINT.size
        self.points.append(p)
        self.next_number += 1
        return p

    def sync(self) -> None:
        assert self._file is not None
        self._file.sync()

    def prune(self, floor_seq: int) -> int:
        """Drop points older than `floor_seq` (no longer restorable) and beyond
        MAX_POINTS; returns how many went."""
        keep = [p for p in self.points if p.seq >= floor_seq][-MAX_POINTS:]
        dropped = len(self.points) - len(keep)
        if not dropped:
            return 0
        tmp = self.path + ".tmp"
        h = self._ops.open(tmp, create=True)
        try:
            h.truncate(0)
            h.pwrite(0, b"".join(p.encode() for p in keep))
            h.sync()
        finally:
            h.close()
        assert self._file is not None
        self._file.close()
        self._ops.rename(tmp, self.path)
        self._ops.fsync_dir(self.directory)
        self._file = self._ops.open(self.path)
        self._end = len(keep) * POINT.size
        self.points = keep
        return dropped

    def between(self, lo_ns: int | None = None, hi_ns: int | None = None) -> list[Point]:
        return [p for p in self.points
                if (lo_ns is None or p.ts >= lo_ns) and (hi_ns is None or p.ts <= hi_ns)]

    def find(self, number: int) -> Point | None:
        lo, hi = 0, len(self.points)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.points[mid].number < number:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.points) and self.points[lo].number == number:
            return self.points[lo]
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
