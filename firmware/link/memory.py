"""In-memory `WriteSource` and `WriteSink`, for tests and demos of the link alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from firmware.link.errors import SourceGap
from firmware.link.frames import WriteRecord


class MemorySource:
    """A write queue in RAM with CBQ semantics: seqs from 1, released on ack."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[WriteRecord] = []  # seqs released+1 .. last_seq
        self._released = 0
        self._cursor = 0
        self.last_seq = 0
        #: Every record ever appended, kept so tests can compare a sink against it.
        self.history: list[WriteRecord] = []

    def append(self, lbn: int, data: bytes, ts: int | None = None) -> int:
        with self._lock:
            self.last_seq += 1
            rec = WriteRecord(
                seq=self.last_seq, lbn=lbn, data=bytes(data),
                ts=time.time_ns() if ts is None else ts,
            )
            self._records.append(rec)
            self.history.append(rec)
            return rec.seq

    @property
    def acked_seq(self) -> int:
        with self._lock:
            return self._released

    def next_batch(self, max_bytes: int) -> list[WriteRecord]:
        with self._lock:
            start = self._cursor - self._released  # index of the record after the cursor
            out: list[WriteRecord] = []
            total = 0
            for rec in self._records[start:]:
                if out and total + len(rec.data) > max_bytes:
                    break
                out.append(rec)
                total += len(rec.data)
            if out:
                self._cursor = out[-1].seq
            return out

    def ack(self, seq: int) -> None:
        with self._lock:
            seq = min(seq, self.last_seq)
            if seq > self._released:
                del self._records[: seq - self._released]
                self._released = seq
                self._cursor = max(self._cursor, seq)

    def rewind_to(self, seq: int) -> None:
        with self._lock:
            if seq < self._released:
                raise SourceGap(f"seqs up to {self._released} are already released")
            self._cursor = min(seq, self.last_seq)


class MemorySink:
    """A volume image in RAM; durable at once unless `defer_durability` is set."""

    def __init__(self, volume_size: int, block_size: int, defer_durability: bool = False) -> None:
        self.volume_size = volume_size
        self.block_size = block_size
        self.image = bytearray(volume_size)
        self.defer_durability = defer_durability
        self._lock = threading.Lock()
        self._durable = 0
        self._applied = 0
        #: Seqs in the order apply() received them, duplicates included.
        self.applied_log: list[int] = []

    def apply(self, records: Sequence[WriteRecord]) -> int:
        with self._lock:
            for r in records:
                off = r.lbn * self.block_size
                self.image[off : off + len(r.data)] = r.data
                self.applied_log.append(r.seq)
                self._applied = max(self._applied, r.seq)
            if not self.defer_durability:
                self._durable = self._applied
            return self._durable

    def make_durable(self) -> None:
        with self._lock:
            self._durable = self._applied

    def last_durable_seq(self) -> int:
        with self._lock:
            return self._durable

    def check_queue(self, queue_id: int | None) -> bool:
        return False  # an image in RAM follows whichever queue feeds it
