"""A promoted unit's mirror as the writable disk of its new host."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.blockdev import DeviceState, NotReady, WriteProtected, check_range

if TYPE_CHECKING:
    from firmware.remote.unit import UnitStore


class PromotedDevice:
    """A promoted unit's mirror as a writable BlockDevice: writes land on the mirror in
    place, each chunk they touch recorded in the unit's dirty map first."""

    def __init__(self, unit: UnitStore) -> None:
        self._unit = unit
        self._closed = False

    @property
    def size(self) -> int:
        return self._unit.volume_size

    @property
    def block_size(self) -> int:
        return self._unit.block_size

    @property
    def state(self) -> DeviceState:
        return DeviceState.OFFLINE if self._closed else DeviceState.READY

    @property
    def read_only(self) -> bool:
        return False

    @property
    def write_cache_enabled(self) -> bool:
        # Writes sit in the page cache of the mirror file until a flush or FUA.
        return True

    @property
    def supports_trim(self) -> bool:
        return False

    def _check(self) -> None:
        if self._closed:
            raise NotReady("the promoted unit's device is closed")

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

    def trim(self, offset: int, length: int) -> None:
        raise WriteProtected("this device does not support trim")

    def close(self) -> None:
        self._closed = True
