"""A remote unit's mirror as the disk of a standby host (docs/failover.md, "The remote's
mirror served to a standby host").

Until the unit is promoted the device is a hot standby: its size is the volume's, and
the SCSI target answers INQUIRY and READ CAPACITY, but media commands get NOT READY,
02/04/0B, while replication goes on applying to the mirror. Once the unit is promoted it
is the new primary's writable disk (the target raises UNIT ATTENTION at that change, the
host rereads it), its writes going to the mirror in place through the promoted unit's
dirty map. A unit handing its role back (failback) is a standby again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.blockdev import DeviceState, NotReady, WriteProtected, check_range

if TYPE_CHECKING:
    from firmware.remote.unit import UnitStore


class MirrorDevice:
    """The unit's mirror, STANDBY until the unit is promoted, then READY and writable."""

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
        if self._closed:
            return DeviceState.OFFLINE
        return DeviceState.READY if self._unit.serving_host else DeviceState.STANDBY

    @property
    def read_only(self) -> bool:
        return False

    @property
    def write_cache_enabled(self) -> bool:
        return True

    @property
    def supports_trim(self) -> bool:
        return False

    def _check(self) -> None:
        if self.state is not DeviceState.READY:
            raise NotReady(f"unit {self._unit.unit_id!r} is a standby: promote it first")

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
