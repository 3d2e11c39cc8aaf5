"""A promoted unit's mirror as the writable disk of its new host."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.blockdev import ServedDevice, check_range

if TYPE_CHECKING:
    from firmware.remote.unit import UnitStore


class PromotedDevice(ServedDevice):
    """A promoted unit's mirror as a writable BlockDevice: writes land on the mirror in
    place, each chunk they touch recorded in the unit's dirty map first.  Writes sit in
    the page cache of the mirror file until a flush or FUA."""

    _closed_message = "the promoted unit's device is closed"

    def __init__(self, unit: UnitStore) -> None:
        super().__init__(unit.volume_size, unit.block_size)
        self._unit = unit

    def pread(self, offset: int, length: int) -> bytes:
        self._check()
        check_range(self, offset, length)
        return self._unit.read_mirror(offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check()
        check_range(self, offset, len(data))
        self._unit._host_write(offset, data, fua)

    def flush(self) -> None:
        self._check()
        self._unit._host_flush()
