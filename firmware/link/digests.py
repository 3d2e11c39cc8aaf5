"""Chunk digests of a mostly sparse volume, for a checksum resync or a verify.

Both ends digest the same chunks (BLAKE3-256, `frames.chunk_digest`).  A chunk that
lies wholly inside a hole of the file under it reads as zeroes, so its digest is the
digest of a zero chunk, computed once per size: it is neither read nor hashed.  This
is what lets a verify of a 200 GiB volume that holds a few GiB finish in seconds.
A chunk with any data in it, even next to holes, is read and hashed as before.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from functools import lru_cache

from firmware.link.frames import chunk_digest

#: (offset, length) -> the extents of that range that may hold data, or None when the
#: medium cannot tell (then every chunk is read).
ExtentsFn = Callable[[int, int], "list[tuple[int, int]] | None"]
ReadFn = Callable[[int, int], bytes]

#: Chunks looked up with one extents query: bounds the extents list of a dense range.
_SPAN_CHUNKS = 1024
#: Data chunks read with one call (4 MiB of 64 KiB chunks).
_READ_CHUNKS = 64


@lru_cache(maxsize=8)
def zero_chunk_digest(length: int) -> bytes:
    """The digest of `length` zero bytes (what a chunk inside a hole reads as)."""
    return chunk_digest(bytes(length))


class HoleMap:
    """The data extents of one span of a volume, asked once, then per chunk: does this
    chunk touch data?"""

    def __init__(self, extents: list[tuple[int, int]] | None) -> None:
        self.all_data = extents is None
        # Merged, so the one extent starting last before a chunk's end decides.
        starts: list[int] = []
        ends: list[int] = []
        for o, n in sorted(extents or ()):
            if n <= 0:
                continue
            if ends and o <= ends[-1]:
                ends[-1] = max(ends[-1], o + n)
            else:
                starts.append(o)
                ends.append(o + n)
        self._starts = starts
        self._ends = ends

    def data_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The (offset, length) parts of [lo, hi) that hold data."""
        if self.all_data:
            return [(lo, hi - lo)] if hi > lo else []
        out = []
        for s, e in zip(self._starts, self._ends, strict=True):
            s, e = max(s, lo), min(e, hi)
            if s < e:
                out.append((s, e - s))
        return out

    def has_data(self, offset: int, length: int) -> bool:
        if self.all_data:
            return True
        i = bisect.bisect_left(self._starts, offset + length) - 1
        return i >= 0 and self._ends[i] > offset


def sparse_chunk_digests(chunks: Iterable[int], chunk_size: int, volume_size: int,
                         read: ReadFn, extents: ExtentsFn | None,
                         will_need: Callable[[int, int], None] | None = None
                         ) -> dict[int, bytes]:
    """Digests of `chunks` of a volume read by `read(offset, length)`; a chunk with no
    data by `extents` gets the zero digest without being read.  `will_need(offset,
    length)`, if given, is told each span ahead, so the disk reads it while the
    chunks before are hashed."""
    out: dict[int, bytes] = {}
    todo = sorted(set(chunks))
    i = 0
    while i < len(todo):
        # One extents query per run of neighbouring chunks (a DIGEST_REQ is one run).
        j = i + 1
        while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < _SPAN_CHUNKS:
            j += 1
        lo = todo[i] * chunk_size
        hi = min((todo[j - 1] + 1) * chunk_size, volume_size)
        holes = HoleMap(extents(lo, hi - lo) if extents is not None else None)
        if will_need is not None:
            # Only where there is data: reading ahead a hole fills the page cache
            # with zero pages nobody reads.
            for o, n in holes.data_in(lo, hi):
                will_need(o, n)
        k = i
        while k < j:
            off = todo[k] * chunk_size
            n = min(chunk_size, volume_size - off)
            if not holes.has_data(off, n):
                out[todo[k]] = zero_chunk_digest(n)
                k += 1
                continue
            # Neighbouring data chunks in one read: a few large reads keep the disk
            # streaming where one read per chunk waits on it between hashes.
            m = k + 1
            while m < j and m - k < _READ_CHUNKS and holes.has_data(
                    todo[m] * chunk_size, min(chunk_size, volume_size - todo[m] * chunk_size)):
                m += 1
            end = min(todo[m - 1] * chunk_size + chunk_size, volume_size)
            view = memoryview(read(off, end - off))
            for c in todo[k:m]:
                start = c * chunk_size - off
                out[c] = chunk_digest(view[start:start + chunk_size])
            k = m
        i = j
    return out
