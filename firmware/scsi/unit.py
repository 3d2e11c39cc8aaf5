"""A logical unit: one BlockDevice as a SCSI direct-access block device, with its
identity, its pending unit attentions and the sense kept for REQUEST SENSE."""

from __future__ import annotations

import hashlib
import threading

from firmware.blockdev import BlockDevice, DeviceState, MediumError
from firmware.blockdev import MediumNotPresent as DeviceMediumNotPresent
from firmware.blockdev import NotReady as DeviceNotReady
from firmware.blockdev import OutOfRange as DeviceOutOfRange
from firmware.blockdev import WriteProtected as DeviceWriteProtected
from firmware.scsi import sense as S
from firmware.scsi.sense import CheckCondition


class _SenseSlot:
    """Where a finished command leaves its sense for the next REQUEST SENSE."""

    def __init__(self) -> None:
        self.stored_sense: CheckCondition | None = None


def _ascii_field(name: str, value: str, width: int) -> bytes:
    raw = value.encode("ascii", errors="replace")
    if not value.isascii() or len(raw) > width or any(c < 0x20 or c > 0x7E for c in raw):
        raise ValueError(f"{name} must be at most {width} printable ASCII characters: {value!r}")
    return raw.ljust(width, b" ")


#: READ buffers a unit keeps for later commands, and their smallest size (a
#: transport's usual data piece, so that one buffer serves every READ)
_KEPT_BUFFERS = 2
_READ_BUFFER = 256 * 1024


class LogicalUnit:
    """One BlockDevice presented as a SCSI direct-access block device.

    vendor (8), product (16) and revision (4) are ASCII, space-padded or refused when
    too long; `serial` feeds VPD 0x80 and the EUI-64 designator of VPD 0x83, so it
    must be unique per unit.  `read_only` adds to the device's own read_only.
    """

    def __init__(
        self,
        device: BlockDevice,
        *,
        serial: str,
        vendor: str = "MirrorUn",
        product: str = "MirrorUnit Disk",
        revision: str = "0001",
        read_only: bool = False,
        removable: bool = False,
    ) -> None:
        self._device = device
        self.vendor = _ascii_field("vendor", vendor, 8)
        self.product = _ascii_field("product", product, 16)
        self.revision = _ascii_field("revision", revision, 4)
        if not serial:
            raise ValueError("serial must not be empty")
        self.serial = _ascii_field("serial", serial, 64).rstrip(b" ")
        self.read_only = read_only
        self.removable = removable
        # EUI-64 with the U/L bit set: locally administered, no IEEE company id needed.
        eui = bytearray(hashlib.blake2b(self.vendor + self.serial, digest_size=8).digest())
        eui[0] = (eui[0] | 0x02) & ~0x01
        self.eui64 = bytes(eui)
        self._slot = _SenseSlot()
        self._pending_ua: list[CheckCondition] = []
        self._last_state = device.state
        self._last_size = device.size
        #: READ buffers kept between commands (see take_buffer)
        self._buffers: list[bytearray] = []
        self._buffers_lock = threading.Lock()

    @property
    def device(self) -> BlockDevice:
        return self._device

    def take_buffer(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes for a READ's pieces, reused from an
        earlier command when one is free: the data path then touches no fresh
        memory.  Commands running at once get different buffers."""
        with self._buffers_lock:
            for i, buffer in enumerate(self._buffers):
                if len(buffer) >= size:
                    return self._buffers.pop(i)
        return bytearray(max(size, _READ_BUFFER))

    def give_buffer(self, buffer: bytearray) -> None:
        """Return a buffer from take_buffer once nothing refers to its bytes; the
        largest ones are kept, so a small READ does not crowd out a large one."""
        with self._buffers_lock:
            self._buffers.append(buffer)
            if len(self._buffers) > _KEPT_BUFFERS:
                self._buffers.remove(min(self._buffers, key=len))

    @property
    def block_size(self) -> int:
        return self._device.block_size

    @property
    def block_count(self) -> int:
        return self._device.size // self._device.block_size

    @property
    def write_protected(self) -> bool:
        return self.read_only or self._device.read_only

    def _raise_unit_attention(self, sense: CheckCondition) -> None:
        if sense not in self._pending_ua:
            self._pending_ua.append(sense)

    def _reset(self) -> None:
        # A reset supersedes whatever was pending (SAM-5 5.14).
        self._pending_ua = [S.POWER_ON_RESET]
        self._slot.stored_sense = None

    def _observe(self) -> None:
        state, size = self._device.state, self._device.size
        if state is DeviceState.READY and self._last_state is not DeviceState.READY:
            self._raise_unit_attention(S.NOT_READY_TO_READY_CHANGE)
        if size != self._last_size:
            self._raise_unit_attention(S.CAPACITY_DATA_HAS_CHANGED)
        self._last_state, self._last_size = state, size

    def not_ready_sense(self) -> CheckCondition | None:
        state = self._device.state
        if state is DeviceState.STANDBY:
            return S.NOT_READY_STANDBY
        if state is DeviceState.OFFLINE:
            # The disk under the volume unplugged, as a drive with no medium says it.
            if not getattr(self._device, "medium_present", True):
                return S.MEDIUM_NOT_PRESENT
            return S.NOT_READY_MANUAL_INTERVENTION
        return None

    def sense_for(self, error: BaseException, *, reading: bool) -> CheckCondition:
        """The sense a BlockDevice error becomes."""
        if isinstance(error, DeviceOutOfRange):
            return S.LBA_OUT_OF_RANGE
        if isinstance(error, DeviceWriteProtected):
            return S.WRITE_PROTECTED
        if isinstance(error, DeviceMediumNotPresent):
            return S.MEDIUM_NOT_PRESENT
        if isinstance(error, DeviceNotReady):
            return self.not_ready_sense() or S.NOT_READY_CAUSE_NOT_REPORTABLE
        if isinstance(error, MediumError | OSError):
            return S.UNRECOVERED_READ_ERROR if reading else S.WRITE_ERROR
        return S.INTERNAL_TARGET_FAILURE
