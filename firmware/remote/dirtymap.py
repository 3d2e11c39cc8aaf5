"""The chunks a promoted unit's host wrote: one bit per resync chunk, kept durable.

A promoted unit's mirror is written in place by its new host.  The map says which chunks
changed since the promotion, so a failback sends only those (with the old primary's own
writes after the fork).  A chunk's bit is made durable before the write that first
touches it reaches the mirror, so a set bit may overstate what changed after a power cut
but a clear bit never hides a write.

Layout::

    HEADER  magic, format version, header size, chunk count, set bits, CRC32C over the
            header (crc field zero) and the bitmap
    bitmap  ceil(chunks / 8) bytes, chunk i is bit i % 8 of byte i // 8

The file is replaced atomically through the unit's file layer.
"""

from __future__ import annotations

import os
import struct

from firmware.remote.errors import JournalCorruption
from firmware.remote.fileio import FileOps
from firmware.remote.format import crc32c

MAGIC = b"MUDIRTY1"
FORMAT_VERSION = 1
#: magic, format version, header size, chunk count, set bits, crc32c
HEADER = struct.Struct("<8sHHQQI4x")
assert HEADER.size == 36
_CRC_OFFSET = 28
FILE_NAME = "dirty.map"


class DirtyMap:
    def __init__(self, ops: FileOps, directory: str, chunks: int) -> None:
        self._ops = ops
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self.chunks = chunks
        self._bits = bytearray((chunks + 7) // 8)

    @classmethod
    def load(cls, ops: FileOps, directory: str, chunks: int) -> DirtyMap | None:
        """The map in `directory`, or None if there is none (the unit is not promoted)."""
        m = cls(ops, directory, chunks)
        if not ops.exists(m.path):
            return None
        h = ops.open(m.path)
        try:
            raw = h.pread(0, h.size())
        finally:
            h.close()
        if len(raw) < HEADER.size:
            raise JournalCorruption(f"dirty map of {len(raw)} bytes (torn)", m.path, 0)
        magic, version, hsize, count, _set, crc = HEADER.unpack_from(raw)
        if magic != MAGIC or version != FORMAT_VERSION or hsize != HEADER.size:
            raise JournalCorruption("not a dirty map of this format", m.path, 0)
        if count != chunks:
            raise JournalCorruption(f"dirty map for {count} chunks, the unit has {chunks}",
                                    m.path, 20)
        body = raw[HEADER.size:]
        if len(body) != len(m._bits):
            raise JournalCorruption(f"dirty map bitmap of {len(body)} bytes, expected "
                                    f"{len(m._bits)}", m.path, HEADER.size)
        if _crc(raw[:HEADER.size], body) != crc:
            raise JournalCorruption("dirty map CRC mismatch", m.path, _CRC_OFFSET)
        m._bits[:] = body
        return m

    def __contains__(self, chunk: object) -> bool:
        return isinstance(chunk, int) and bool(self._bits[chunk >> 3] & (1 << (chunk & 7)))

    @property
    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def dirty_chunks(self) -> list[int]:
        return [c for c in range(self.chunks) if c in self]

    @property
    def bitmap(self) -> bytes:
        """The map's bits: chunk c in byte c // 8, bit c % 8."""
        return bytes(self._bits)

    def set(self, chunk: int) -> None:
        """Set one chunk in memory (durable at the next `save`)."""
        self._bits[chunk >> 3] |= 1 << (chunk & 7)

    def remove(self) -> None:
        """Delete the map (the unit is no longer promoted)."""
        if self._ops.exists(self.path):
            self._ops.unlink(self.path)
            self._ops.fsync_dir(self.directory)

    def mark(self, first: int, last: int) -> bool:
        """Set chunks first..last; durable when this returns.  True if any was new."""
        new = False
        for c in range(first, last + 1):
            if c not in self:
                self._bits[c >> 3] |= 1 << (c & 7)
                new = True
        if new:
            self.save()
        return new

    def save(self) -> None:
        body = bytes(self._bits)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, self.chunks, self.count, 0)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, self.chunks, self.count,
                             _crc(header, body))
        tmp = self.path + ".tmp"
        h = self._ops.open(tmp, create=True)
        try:
            h.truncate(0)
            h.pwrite(0, header + body)
            h.sync()
        finally:
            h.close()
        self._ops.rename(tmp, self.path)
        self._ops.fsync_dir(self.directory)


def _crc(header: bytes, body: bytes) -> int:
    zeroed = header[:_CRC_OFFSET] + b"\0\0\0\0" + header[_CRC_OFFSET + 4:]
    return crc32c(zeroed + body)
