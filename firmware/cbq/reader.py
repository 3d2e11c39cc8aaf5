"""Reading the CBQ's ring: every record is checked before a byte of it is trusted.

Like LevelDB's log::Reader, the reader knows records and their checks, not what a
consumer or a mode is.  A record must be whole (its CRC over header and payload), of
this queue (salt) and of the lap the position says, inside the volume and the ring, and
where asked, continue the seq order and the CRC chain.  Walks tell a commit group's
padding, or the remains of a record dropped at recovery, from corruption: the next group
starts on the next `align` boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .errors import CbqCorruption
from .format import (
    RECORD_HEADER,
    WRITE_KINDS,
    RecordHeader,
    RecordKind,
    align_up,
    decode_header,
    record_crc_ok,
)
from .superblock import Geometry

HDR = RECORD_HEADER.size
NO_HEADER = "no record header"

#: Bytes at (linear address, length) that are appended but not on the medium yet, else None.
Unwritten = Callable[[int, int], bytes | None]


class RingReader:
    """The records of one queue's ring, read from its storage or from groups not written yet."""

    def __init__(self, geo: Geometry, storage: Any, unwritten: Unwritten) -> None:
        self.geo = geo
        self.storage = storage
        self._unwritten = unwritten

    def aligned(self, lin: int) -> int:
        a = align_up(lin, self.geo.align)
        if self.geo.ring_size - a % self.geo.ring_size < HDR and a % self.geo.ring_size:
            a = align_up(a, self.geo.ring_size)
        return a

    def next_lin(self, lin: int, h: RecordHeader) -> int:
        if h.kind is RecordKind.WRAP:
            return align_up(lin + 1, self.geo.ring_size)
        nxt = lin + h.length
        if self.geo.ring_size - nxt % self.geo.ring_size < HDR and nxt % self.geo.ring_size:
            nxt = align_up(nxt, self.geo.ring_size)
        return nxt

    def read(self, lin: int, n: int) -> bytes:
        got = self._unwritten(lin, n)
        if got is not None:
            return got
        pos = lin % self.geo.ring_size
        if pos + n > self.geo.ring_size:
            raise CbqCorruption("record crosses the end of the ring", self.offset(lin))
        return self.storage.pread(self.geo.ring_start + pos, n)

    def offset(self, lin: int) -> int:
        """Where linear address `lin` is in the storage (what errors report)."""
        return self.geo.ring_start + lin % self.geo.ring_size

    def parse(self, lin: int, next_seq: int | None, prev_crc: int | None, limit: int,
              with_payload: bool) -> tuple[RecordHeader, bytes] | str:
        """Check the record at `lin`; a reason if it fails.

        `next_seq` and `prev_crc`, when given, are what the record must continue
        (seq order and CRC chain); the CRC over header and payload is always checked.
        """
        g = self.geo
        pos = lin % g.ring_size
        if g.ring_size - pos < HDR:
            return "no room for a header before the end of the ring"
        raw = self.read(lin, HDR)
        h = decode_header(raw)
        if h is None:
            return NO_HEADER
        if h.salt != g.salt:
            return "record of another queue (salt mismatch)"
        if h.lap != (lin // g.ring_size) & 0xFFFFFFFF:
            return f"record of lap {h.lap}, expected {(lin // g.ring_size) & 0xFFFFFFFF}"
        if prev_crc is not None and h.prev_crc != prev_crc:
            return "broken CRC chain (stale record)"
        if next_seq is not None:
            expect_seq = next_seq if h.kind in WRITE_KINDS else next_seq - 1
            if h.seq != expect_seq:
                return f"seq {h.seq}, expected {expect_seq}"
        if h.kind in (RecordKind.DATA, RecordKind.SIDE):
            if h.payload_len != h.nblocks * g.block_size or h.nblocks == 0:
                return "payload length does not match block count"
        elif h.payload_len != 0:
            return "unexpected payload"
        if h.kind is RecordKind.BARRIER:
            if h.lbn != 0 or h.nblocks != 0:
                return "barrier with blocks"
            if pos + h.length > g.ring_size:
                return "record crosses the end of the ring"
        elif h.kind is not RecordKind.WRAP:
            if h.nblocks == 0 or h.lbn + h.nblocks > g.volume_blocks:
                return f"blocks {h.lbn}+{h.nblocks} outside the volume"
            if pos + h.length > g.ring_size:
                return "record crosses the end of the ring"
        end = lin + (h.length if h.kind is not RecordKind.WRAP else g.ring_size - pos)
        if end > limit:
            return "record would overlap the tail"
        payload = self.read(lin + HDR, h.payload_len) if h.payload_len else b""
        if not record_crc_ok(raw, payload):
            return "record CRC mismatch (torn or corrupt)"
        return h, (payload if with_payload else b"")

    def walk_new(self, lin: int, next_seq: int, prev_crc: int,
                 limit: int) -> Iterator[tuple[int, RecordHeader, bytes]]:
        """Records from `lin` on that pass every check: the ones past the checkpointed head,
        which must continue `next_seq` and the CRC chain at `prev_crc` and end before
        `limit` (where the persisted tail's lap ends)."""
        while True:
            got = self.parse(lin, next_seq, prev_crc, limit, with_payload=False)
            if isinstance(got, str):
                # A commit group ends with padding up to the next `align` boundary.
                alt = self.aligned(lin)
                if alt == lin:
                    return
                got = self.parse(alt, next_seq, prev_crc, limit, with_payload=False)
                if isinstance(got, str):
                    return
                lin = alt
            h, payload = got
            yield lin, h, payload
            if h.kind in WRITE_KINDS:
                next_seq = h.seq + 1
            prev_crc = h.crc
            lin = self.next_lin(lin, h)

    def walk(self, start: int, end: int,
              with_payload: bool = False) -> Iterator[tuple[int, RecordHeader, bytes]]:
        """Records in [start, end), a stretch of the log that recovery accepted.

        From the second record on, seq order and the CRC chain are checked too.  A
        commit group may end in padding, or (after a crash) in the remains of a
        record that recovery dropped; the next group starts on the next `align`
        boundary.  Anything else that fails is corruption.
        """
        g = self.geo
        lin = start
        next_seq: int | None = None
        prev_crc: int | None = None
        limit = start + g.ring_size
        while lin < end:
            if g.ring_size - lin % g.ring_size < HDR:
                lin = align_up(lin, g.ring_size)
                continue
            got = self.parse(lin, next_seq, prev_crc, limit, with_payload)
            if isinstance(got, str):
                alt = self.aligned(lin)
                if alt >= end:
                    return
                if alt != lin:
                    again = self.parse(alt, next_seq, prev_crc, limit, with_payload)
                    if not isinstance(again, str) or got == NO_HEADER:
                        # Padding at `lin`: what counts is the record at the boundary.
                        lin, got = alt, again
                if isinstance(got, str):
                    raise CbqCorruption(f"queued record unreadable: {got}", self.offset(lin))
            h, payload = got
            yield lin, h, payload
            next_seq = h.seq + 1
            prev_crc = h.crc
            lin = self.next_lin(lin, h)
