"""An append-only log kept as numbered segment files (receive and history journals).

The log knows records, not their meaning: the unit store decides what a seq gap
or a kind means.  Durability is explicit: `append()` only writes; `sync()` makes
everything appended so far durable.  A new segment's header is synced and its
directory entry fsynced before any record goes into it, so after a power cut an
invalid segment header can only belong to an empty last segment.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from firmware.record import IntegrityError
from firmware.remote.errors import JournalCorruption
from firmware.remote.fileio import FileHandle, FileOps
from firmware.remote.format import (
    RECORD,
    RECORD_HEADER,
    SEGMENT_HEADER,
    RecordHeader,
    RecordKind,
    decode_record_header,
    decode_segment_header,
    encode_record,
    encode_segment_header,
)

log = logging.getLogger("mirrorunit.remote")

#: Bytes read at a time while scanning a segment at open.
_SCAN_READ = 1 << 20


@dataclass(frozen=True)
class LogEntry:
    """Where a record lives, and its header (the payload stays on disk)."""

    kind: RecordKind
    seq: int
    ts: int
    lbn: int
    nblocks: int
    payload_len: int
    segment: int
    offset: int

    @property
    def position(self) -> tuple[int, int]:
        return (self.segment, self.offset)

    @property
    def payload_offset(self) -> int:
        return self.offset + RECORD_HEADER.size

    @property
    def length(self) -> int:
        return RECORD_HEADER.size + self.payload_len


@dataclass(frozen=True)
class NewRecord:
    kind: RecordKind
    seq: int
    ts: int
    lbn: int
    nblocks: int
    payload: bytes | bytearray | memoryview


class SegmentLog:
    def __init__(
        self,
        ops: FileOps,
        directory: str,
        prefix: str,
        magic: bytes,
        segment_bytes: int,
        clock: Callable[[], int],
    ) -> None:
        self._ops = ops
        self.directory = directory
        self._prefix = prefix
        self._magic = magic
        self.segment_bytes = segment_bytes
        self._clock = clock
        self._handles: dict[int, FileHandle] = {}
        self._salts: dict[int, int] = {}
        self._active = 0  # segment number appended to; 0 = none yet
        self._end = 0  # append offset in the active segment
        self._dirty: set[int] = set()
        # Segment numbers only grow, so a position (segment, offset) is never reused.
        self._highest = 0

    # ------------------------------------------------------------------ naming

    def _name(self, number: int) -> str:
        return f"{self._prefix}-{number:016d}.seg"

    def path(self, number: int) -> str:
        return os.path.join(self.directory, self._name(number))

    def _segment_numbers(self) -> list[int]:
        out = []
        for name in self._ops.listdir(self.directory):
            if not (name.startswith(self._prefix + "-") and name.endswith(".seg")):
                continue
            digits = name[len(self._prefix) + 1 : -4]
            if digits.isdigit():
                out.append(int(digits))
        return sorted(out)

    def _handle(self, number: int) -> FileHandle:
        h = self._handles.get(number)
        if h is None:
            h = self._ops.open(self.path(number))
            self._handles[number] = h
        return h

    @property
    def segments(self) -> list[int]:
        return sorted(self._handles)

    @property
    def end_position(self) -> tuple[int, int]:
        """Where the next record will go (segment 0 when the log is empty)."""
        return (self._active, self._end)

    # ------------------------------------------------------------------ open / scan

    def open(self) -> list[LogEntry]:
        """Scan every segment and return its records in order.  A torn tail of the
        last segment is cut off; a bad record anywhere else is corruption."""
        self._ops.makedirs(self.directory)
        numbers = self._segment_numbers()
        self._highest = max(numbers, default=0)
        entries: list[LogEntry] = []
        for i, number in enumerate(numbers):
            last = i == len(numbers) - 1
            path = self.path(number)
            h = self._ops.open(path)
            try:
                header = decode_segment_header(h.pread(0, SEGMENT_HEADER.size), self._magic,
                                               path=path)
                if header.number != number:
                    raise IntegrityError(path, 0, f"header of segment {header.number}")
            except IntegrityError as e:
                h.close()
                if not last:
                    raise JournalCorruption(f"bad segment header ({e.reason})", path, 0) from e
                # Torn while being created: it cannot hold a durable record yet.
                log.warning("%s: removing segment with a torn header", path)
                self._ops.unlink(path)
                self._ops.fsync_dir(self.directory)
                continue
            self._handles[number] = h
            self._salts[number] = header.salt
            self._highest = max(self._highest, number)
            end = self._scan(number, h, header.salt, last, entries)
            self._active, self._end = number, end
        return entries

    def _scan(
        self, number: int, h: FileHandle, salt: int, last: bool, out: list[LogEntry]
    ) -> int:
        path = self.path(number)
        size = h.size()
        pos = SEGMENT_HEADER.size
        while pos < size:
            raw = h.pread(pos, min(RECORD_HEADER.size, size - pos))
            try:
                rh, _crc = decode_record_header(raw, path=path, offset=pos)
                if rh.salt != salt:
                    raise IntegrityError(path, pos, "record from another segment (salt)")
                if pos + rh.length > size:
                    raise IntegrityError(path, pos, "record runs past the end of the segment")
                payload = h.pread(pos + RECORD_HEADER.size, rh.payload_len)
                RECORD.check(raw, payload, path=path, offset=pos)
            except IntegrityError as e:
                if not last:
                    raise JournalCorruption(e.reason, path, pos) from e
                log.warning("%s; truncating the torn tail", e)
                h.truncate(pos)
                h.sync()
                return pos
            out.append(
                LogEntry(rh.kind, rh.seq, rh.ts, rh.lbn, rh.nblocks, rh.payload_len, number, pos)
            )
            pos += rh.length
        return pos

    # ------------------------------------------------------------------ append

    def _new_segment(self) -> None:
        number = self._highest + 1
        self._highest = number
        salt = secrets.randbits(32)
        path = self.path(number)
        h = self._ops.open(path, create=True)
        h.truncate(0)
        h.pwrite(0, encode_segment_header(self._magic, salt, number, self._clock()))
        h.sync()
        self._ops.fsync_dir(self.directory)
        self._handles[number] = h
        self._salts[number] = salt
        self._active, self._end = number, SEGMENT_HEADER.size

    def append(self, records: Sequence[NewRecord]) -> list[LogEntry]:
        """Write records after the last one (not durable until `sync()`)."""
        out: list[LogEntry] = []
        buf = bytearray()
        start = self._end
        for r in records:
            length = RECORD_HEADER.size + len(r.payload)
            if self._active == 0 or (
                self._end + len(buf) + length > self.segment_bytes
                and self._end + len(buf) > SEGMENT_HEADER.size
            ):
                if buf:
                    self._handles[self._active].pwrite(start, buf)
                    self._dirty.add(self._active)
                    self._end = start + len(buf)
                    buf = bytearray()
                # Only the last segment may end torn: finish this one before the next
                # one exists.
                self.sync()
                self._new_segment()
                start = self._end
            salt = self._salts[self._active]
            header = RecordHeader(r.kind, salt, r.seq, r.ts, r.lbn, r.nblocks, len(r.payload))
            out.append(
                LogEntry(r.kind, r.seq, r.ts, r.lbn, r.nblocks, len(r.payload), self._active,
                         start + len(buf))
            )
            buf += encode_record(header, r.payload)
        if buf:
            self._handles[self._active].pwrite(start, buf)
            self._dirty.add(self._active)
            self._end = start + len(buf)
        return out

    def sync(self) -> None:
        for number in sorted(self._dirty):
            self._handles[number].sync()
        self._dirty.clear()

    # ------------------------------------------------------------------ read

    def read(self, segment: int, offset: int, length: int) -> bytes:
        return self._handle(segment).pread(offset, length)

    def read_payload(self, entry: LogEntry) -> bytes:
        """The payload of an indexed record, checked again before anyone uses it.

        Apply, redo and rollback write what this returns to the mirror, and the medium
        may have changed since the scan at open: the header is read back, must still be
        the indexed record of this segment, and its CRC must cover the payload.
        """
        path = self.path(entry.segment)
        handle = self._handle(entry.segment)
        raw = handle.pread(entry.offset, RECORD_HEADER.size)
        payload = handle.pread(entry.payload_offset, entry.payload_len)
        try:
            rh, _crc = decode_record_header(raw, path=path, offset=entry.offset)
            if ((rh.kind, rh.seq, rh.ts, rh.lbn, rh.nblocks, rh.payload_len)
                    != (entry.kind, entry.seq, entry.ts, entry.lbn, entry.nblocks,
                        entry.payload_len)
                    or rh.salt != self._salts.get(entry.segment)):
                raise IntegrityError(path, entry.offset, "record is not the one indexed here")
            RECORD.check(raw, payload, path=path, offset=entry.offset)
        except IntegrityError as e:
            raise JournalCorruption(e.reason, path, entry.offset) from e
        return payload

    # ------------------------------------------------------------------ trimming

    def drop_segments_before(self, number: int) -> int:
        """Delete every segment numbered below `number` (never the active one)."""
        doomed = [n for n in self.segments if n < number and n != self._active]
        for n in doomed:
            self._handles.pop(n).close()
            self._salts.pop(n, None)
            self._dirty.discard(n)
            self._ops.unlink(self.path(n))
        if doomed:
            self._ops.fsync_dir(self.directory)
        return len(doomed)

    def truncate_at(self, segment: int, offset: int) -> None:
        """Remove every record from (segment, offset) on, newest segment first, so an
        interruption leaves a prefix of the log."""
        for n in sorted(self.segments, reverse=True):
            if n <= segment:
                break
            self._handles.pop(n).close()
            self._salts.pop(n, None)
            self._dirty.discard(n)
            self._ops.unlink(self.path(n))
        self._ops.fsync_dir(self.directory)
        if segment in self._handles:
            h = self._handles[segment]
            h.truncate(offset)
            h.sync()
            self._dirty.discard(segment)
            self._active, self._end = segment, offset
        else:
            self._active, self._end = 0, 0

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()
