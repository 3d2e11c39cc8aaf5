"""A read-only view of a remote unit's mirror at a point in time, served from the
live mirror and the history journal's before-images without copying either."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.blockdev import NotReady, ServedDevice, WriteProtected, check_range

if TYPE_CHECKING:
    from firmware.remote.unit import PointInTime, UnitStore


class PointInTimeDevice(ServedDevice):
    """A read-only BlockDevice showing a unit's mirror at a point in time.

    Nothing is copied: blocks changed after the point are read from their oldest
    before-image newer than the point (an index built for this point), every other
    block from the live mirror.  Writes applied while the device is open append
    before-images first, and the index picks them up before any read, so the
    device keeps showing the same point.  Close it to release the history it pins.
    """

    read_only = True
    write_cache_enabled = False
    _closed_message = "point-in-time view is closed"
    _write_refusal = "a point-in-time image is read-only"

    def __init__(self, unit: UnitStore, point: PointInTime, first_abs: int) -> None:
        super().__init__(unit.volume_size, unit.block_size)
        self._unit = unit
        self.point = point
        self._first_abs = first_abs
        self._next_abs = first_abs
        #: block -> (history segment, byte offset of that block's before-image)
        self._overlay: dict[int, tuple[int, int]] = {}
        unit._views[id(self)] = first_abs
        self._refresh()

    def _refresh(self) -> None:
        u = self._unit
        bs = u.block_size
        end = u._hist_base + len(u._hist)
        for e in u._hist[self._next_abs - u._hist_base:]:
            base = e.payload_offset
            for k in range(e.nblocks):
                self._overlay.setdefault(e.lbn + k, (e.segment, base + k * bs))
        self._next_abs = end

    @property
    def changed_blocks(self) -> int:
        """Blocks that differ in source from the live mirror (served from history)."""
        return len(self._overlay)

    def sources(self) -> dict[int, tuple[int, int]]:
        """Where each block that differs from the live mirror is read from (its
        before-image in history), brought up to the mirror as it is now."""
        with self._unit._lock:
            self._refresh()
            return dict(self._overlay)

    def pread(self, offset: int, length: int) -> bytes:
        self._check()
        check_range(self, offset, length)
        u = self._unit
        bs = u.block_size
        with u._lock:
            if u._closed:
                raise NotReady(f"unit {u.unit_id!r} is closed")
            self._refresh()
            assert u._mirror is not None and u._hj is not None
            if not self._overlay:
                return u._mirror.pread(offset, length)
            first, last = offset // bs, (offset + length - 1) // bs if length else offset // bs
            out = bytearray()
            b = first
            while b <= last and length:
                src = self._overlay.get(b)
                run = 1
                if src is None:
                    while b + run <= last and (b + run) not in self._overlay:
                        run += 1
                    out += u._mirror.pread(b * bs, run * bs)
                else:
                    seg, off = src
                    while b + run <= last and self._overlay.get(b + run) == (seg, off + run * bs):
                        run += 1
                    out += u._hj.read(seg, off, run * bs)
                b += run
            skip = offset - first * bs
            return bytes(out[skip:skip + length])

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        raise WriteProtected(self._write_refusal)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._unit._lock:
                self._unit._views.pop(id(self), None)

    def __enter__(self) -> PointInTimeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
