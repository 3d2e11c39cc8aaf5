"""Byte-addressed nonvolatile storage under the CBQ and the local mirror.

The data path never calls os.* directly; it goes through a Storage so tests can
swap in `CrashSimStorage`, a fault-injecting filter that models a disk with a
volatile write cache: writes since the last sync() may be lost, reordered at
sector granularity, or torn inside a sector when power is cut.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from firmware.fsutil import data_extents


class Storage(Protocol):
    """What the CBQ and the volume's mirror need of the medium under them."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def sync(self) -> None:
        """Everything written so far is durable (fdatasync); raises OSError if not."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class VectoredStorage(Storage, Protocol):
    """Optional: one call writes several buffers back to back (a CBQ group commit)."""

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None: ...


@runtime_checkable
class ReadIntoStorage(Storage, Protocol):
    """Optional: fills the caller's buffer, so the volume reads without a fresh object."""

    def preadinto(self, offset: int, buf: memoryview) -> None: ...


@runtime_checkable
class SparseStorage(Storage, Protocol):
    """Optional: tells which parts of a range may hold data; the rest reads as zeroes
    (None: it cannot tell, read everything)."""

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None: ...


class FileStorage:
    """A regular file or a block device node."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None,
                 create: bool = False, read_only: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        self.path = os.fspath(path)
        self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        actual = os.lseek(self._fd, 0, os.SEEK_END)
        if size is not None and actual < size:
            if read_only:
                os.close(self._fd)
                raise OSError(f"{self.path}: {actual} bytes, need {size}")
            os.ftruncate(self._fd, size)
            actual = size
        self._size = actual if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Where [offset, offset + length) may hold data (fsutil.data_extents)."""
        return data_extents(self._fd, offset, length)

    def will_need(self, offset: int, length: int) -> None:
        """Start reading [offset, offset + length) into the page cache, not waiting."""
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def preadinto(self, offset: int, buf: memoryview) -> None:
        n = os.preadv(self._fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        # IOV_MAX bounds one call; a short write continues where it stopped.
        views = [memoryview(b) for b in buffers if len(b)]
        while views:
            batch = views[:1024]
            n = os.pwritev(self._fd, batch, offset)
            offset += n
            while n and views:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PowerCut(Exception):
    """Raised by CrashSimStorage at the injected cut point; the device is gone."""


@dataclass
class _PendingWrite:
    offset: int
    data: bytes


@dataclass
class PowerRail:
    """Write boundaries shared by several CrashSimStorage devices on one power supply."""

    cut_after_writes: int | None = None
    ops: int = 0
    dead: bool = False

    def boundary(self) -> None:
        if self.dead:
            raise PowerCut("storage lost power")
        if self.cut_after_writes is not None and self.ops >= self.cut_after_writes:
            self.dead = True
            raise PowerCut(f"power cut at write boundary {self.ops}")
        self.ops += 1


@dataclass
class CrashSimStorage:
    """In-memory storage with a volatile write cache and power-cut injection.

    `durable` holds what survived the last sync(); writes since then are kept in
    order in `pending`.  A PowerRail with `cut_after_writes=N` raises PowerCut
    on the (N+1)-th pwrite or sync call (a "write boundary") of any device on
    that rail, so a test can cut at every boundary of a workload.
    `crash_image(rng)` returns what a disk could hold after the cut: every
    pending write is split into sectors, and each sector is independently
    kept, dropped or torn (a prefix of it kept).
    """

    size_: int
    sector: int = 512
    rail: PowerRail = field(default_factory=PowerRail)
    durable: bytearray = field(init=False)
    pending: list[_PendingWrite] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.durable = bytearray(self.size_)

    @classmethod
    def from_image(cls, image: bytes, sector: int = 512) -> CrashSimStorage:
        s = cls(len(image), sector)
        s.durable[:] = image
        return s

    @property
    def size(self) -> int:
        return self.size_

    def _boundary(self) -> None:
        self.rail.boundary()

    def pread(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self.rail.dead:
                raise PowerCut("storage lost power")
            if offset + length > self.size_:
                raise OSError(f"read past end: {offset}+{length} > {self.size_}")
            data = bytearray(self.durable[offset:offset + length])
            for w in self.pending:
                lo, hi = max(offset, w.offset), min(offset + length, w.offset + len(w.data))
                if lo < hi:
                    data[lo - offset:hi - offset] = w.data[lo - w.offset:hi - w.offset]
            return bytes(data)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            if offset + len(data) > self.size_:
                raise OSError(f"write past end: {offset}+{len(data)} > {self.size_}")
            self._boundary()
            self.pending.append(_PendingWrite(offset, bytes(data)))

    def sync(self) -> None:
        with self._lock:
            self._boundary()
            for w in self.pending:
                self.durable[w.offset:w.offset + len(w.data)] = w.data
            self.pending.clear()

    def close(self) -> None:
        pass

    def crash_image(self, rng: random.Random | None = None, tear: bool = True) -> bytearray:
        """What the medium may hold after power is cut now."""
        image = bytearray(self.durable)
        if rng is None:
            return image
        sectors: dict[int, bytes] = {}
        for w in self.pending:
            # Later writes to a sector replace earlier ones in the cache.
            pos = w.offset
            end = w.offset + len(w.data)
            while pos < end:
                s = pos - pos % self.sector
                s_end = min(s + self.sector, self.size_)
                cur = bytearray(sectors.get(s, bytes(self.durable[s:s_end])))
                lo, hi = pos, min(end, s_end)
                cur[lo - s:hi - s] = w.data[lo - w.offset:hi - w.offset]
                sectors[s] = bytes(cur)
                pos = hi
        for s, new in sectors.items():
            roll = rng.random()
            if roll < 0.4:
                continue  # never reached the medium
            if tear and roll < 0.55:
                cut = rng.randrange(1, len(new))
                image[s:s + cut] = new[:cut]
            else:
                image[s:s + len(new)] = new
        return image
