"""A writable copy-on-write clone of a point in time, for a test failover.

The clone reads through to a point-in-time view of the unit (which keeps its image fixed
while replication goes on applying to the real mirror) and keeps every block written to
it in a scratch file of its own, never in the mirror or its history. The scratch space is
bounded: a write that would need more is refused with a medium error (ENOSPC), and what
was written before stays readable. Closing the clone deletes the scratch file: nothing
written to it reaches the mirror.
"""

from __future__ import annotations

import errno
import os
import threading

from firmware.blockdev import MediumError, ServedDevice, check_range
from firmware.remote.pit import PointInTimeDevice


class CloneDevice(ServedDevice):
    """A writable BlockDevice over `base`, its writes in `scratch` (at most
    `scratch_limit` bytes of blocks)."""

    _closed_message = "the test-failover clone has ended"

    def __init__(self, base: PointInTimeDevice, scratch: str | os.PathLike[str],
                 scratch_limit: int) -> None:
        super().__init__(base.size, base.block_size)
        self.base = base
        self.scratch_path = os.fspath(scratch)
        self.scratch_limit = scratch_limit
        self._fd = os.open(self.scratch_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        #: block number -> its slot in the scratch file
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def point(self) -> object:
        return self.base.point

    @property
    def scratch_used(self) -> int:
        return len(self._slots) * self.block_size

    def pread(self, offset: int, length: int) -> bytes:
        self._check()
        check_range(self, offset, length)
        bs = self.block_size
        with self._lock:
            data = bytearray(self.base.pread(offset, length))
            if not self._slots or not length:
                return bytes(data)
            for b in range(offset // bs, (offset + length - 1) // bs + 1):
                slot = self._slots.get(b)
                if slot is None:
                    continue
                block = os.pread(self._fd, bs, slot * bs)
                lo, hi = max(offset, b * bs), min(offset + length, (b + 1) * bs)
                data[lo - offset:hi - offset] = block[lo - b * bs:hi - b * bs]
            return bytes(data)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check()
        check_range(self, offset, len(data))
        bs = self.block_size
        view = memoryview(data)
        with self._lock:
            first, last = offset // bs, (offset + len(data) - 1) // bs
            new = sum(1 for b in range(first, last + 1) if b not in self._slots)
            if (len(self._slots) + new) * bs > self.scratch_limit:
                raise MediumError(f"the test-failover clone's scratch space of "
                                  f"{self.scratch_limit} bytes is full", errno.ENOSPC)
            for b in range(first, last + 1):
                lo, hi = max(offset, b * bs), min(offset + len(data), (b + 1) * bs)
                slot = self._slots.get(b)
                if lo == b * bs and hi == (b + 1) * bs:
                    block = bytes(view[lo - offset:hi - offset])
                else:
                    old = os.pread(self._fd, bs, slot * bs) if slot is not None \
                        else self.base.pread(b * bs, bs)
                    merged = bytearray(old)
                    merged[lo - b * bs:hi - b * bs] = view[lo - offset:hi - offset]
                    block = bytes(merged)
                if slot is None:
                    slot = self._slots[b] = len(self._slots)
                os.pwrite(self._fd, block, slot * bs)
            if fua:
                os.fsync(self._fd)

    def flush(self) -> None:
        self._check()
        os.fsync(self._fd)

    def close(self) -> None:
        """End the clone: its writes are discarded with the scratch file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
            try:
                os.unlink(self.scratch_path)
            except FileNotFoundError:
                pass
        self.base.close()
