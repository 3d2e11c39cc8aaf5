"""Writing the CBQ's ring: records are gathered into a commit group, then written with
one vectored write per contiguous stretch and made durable by one sync (group commit).

A group keeps references to the caller's buffers instead of copying payloads, and it
answers reads of records not on the medium yet, so a consumer may read what is queued
while it is being written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Segment:
    """Contiguous bytes of the ring held as a list of buffers (no copy of payloads)."""

    __slots__ = ("start", "buffers", "length")

    def __init__(self, start: int) -> None:
        self.start = start
        self.buffers: list[bytes | bytearray | memoryview] = []
        self.length = 0

    def read(self, lin: int, n: int) -> bytes:
        return b"".join(self.buffers)[lin - self.start:lin - self.start + n]


@dataclass
class CommitGroup:
    """A commit group being filled: contiguous segments of the ring."""

    segments: list[Segment] = field(default_factory=list)

    def add(self, lin: int, data: bytes | bytearray | memoryview) -> None:
        if not self.segments or self.segments[-1].start + self.segments[-1].length != lin:
            self.segments.append(Segment(lin))
        seg = self.segments[-1]
        seg.buffers.append(data)
        seg.length += len(data)

    def read(self, lin: int, n: int) -> bytes | None:
        for seg in self.segments:
            if seg.start <= lin and lin + n <= seg.start + seg.length:
                return seg.read(lin, n)
        return None


def write_buffers(storage: Any, offset: int,
                  buffers: list[bytes | bytearray | memoryview]) -> None:
    """One vectored write where the storage offers it (a group is one syscall)."""
    if hasattr(storage, "pwritev"):
        storage.pwritev(offset, buffers)
    else:
        storage.pwrite(offset, b"".join(buffers))
