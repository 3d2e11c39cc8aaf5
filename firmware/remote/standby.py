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

from firmware.blockdev import DeviceState, NotReady
from firmware.remote.promoted import PromotedDevice


class MirrorDevice(PromotedDevice):
    """The unit's mirror, STANDBY until the unit is promoted, then READY and writable
    (reads, writes and flushes as the promoted device's)."""

    @property
    def state(self) -> DeviceState:
        if self._closed:
            return DeviceState.OFFLINE
        return DeviceState.READY if self._unit.serving_host else DeviceState.STANDBY

    def _check(self) -> None:
        if self.state is not DeviceState.READY:
            raise NotReady(f"unit {self._unit.unit_id!r} is a standby: promote it first")
