"""SCSI sense: failures of a command are values, never exceptions.

`CheckCondition` is the (sense key, ASC, ASCQ) triple a command ends with when its
status is CHECK CONDITION.  It renders itself as fixed-format (response code 0x70,
18 bytes) or descriptor-format (0x72) sense data, as REQUEST SENSE asks (SPC-4 4.5).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


#: Fixed-format sense data (SPC-4 4.5.3): response code, obsolete, flags|key,
#: INFORMATION, additional length, command-specific information, ASC, ASCQ, FRU code,
#: sense-key-specific (3 bytes).
FIXED_SENSE = struct.Struct(">BBBIBIBBB3s")
assert FIXED_SENSE.size == 18
FIXED_SENSE_ADDITIONAL_LENGTH = FIXED_SENSE.size - 8

#: Descriptor-format sense header (SPC-4 4.5.2): response code, key, ASC, ASCQ,
#: reserved(3), additional length.
DESCRIPTOR_SENSE_HEADER = struct.Struct(">BBBB3xB")
assert DESCRIPTOR_SENSE_HEADER.size == 8

#: Information sense data descriptor (type 0x00): type, additional length 0x0A,
#: VALID, reserved, 8-byte INFORMATION.
INFORMATION_DESCRIPTOR = struct.Struct(">BBBxQ")
assert INFORMATION_DESCRIPTOR.size == 12

RESPONSE_CODE_FIXED_CURRENT = 0x70
RESPONSE_CODE_DESCRIPTOR_CURRENT = 0x72
_VALID = 0x80


@dataclass(frozen=True)
class CheckCondition:
    """Sense of a failed command.  `information` is the INFORMATION field when it
    is meaningful (e.g. the offset of the first miscomparing byte for VERIFY)."""

    key: int
    asc: int
    ascq: int
    information: int | None = None

    def fixed_format(self) -> bytes:
        info = self.information
        valid = 0
        if info is not None and 0 <= info <= 0xFFFFFFFF:
            valid = _VALID
        else:
            info = 0
        return FIXED_SENSE.pack(
            RESPONSE_CODE_FIXED_CURRENT | valid,
            0,
            self.key & 0x0F,
            info,
            FIXED_SENSE_ADDITIONAL_LENGTH,
            0,
            self.asc,
            self.ascq,
            0,
            b"\0\0\0",
        )

    def descriptor_format(self) -> bytes:
        descriptors = b""
        if self.information is not None and 0 <= self.information < 1 << 64:
            descriptors = INFORMATION_DESCRIPTOR.pack(0x00, 0x0A, _VALID, self.information)
        header = DESCRIPTOR_SENSE_HEADER.pack(
            RESPONSE_CODE_DESCRIPTOR_CURRENT,
            self.key & 0x0F,
            self.asc,
            self.ascq,
            len(descriptors),
        )
        return header + descriptors

    def sense_data(self, descriptor: bool = False) -> bytes:
        return self.descriptor_format() if descriptor else self.fixed_format()

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"{self.key:#x}"
        return f"{key} {self.asc:02X}/{self.ascq:02X}"


NO_SENSE = CheckCondition(SenseKey.NO_SENSE, 0x00, 0x00)

# NOT READY
NOT_READY_CAUSE_NOT_REPORTABLE = CheckCondition(SenseKey.NOT_READY, 0x04, 0x00)
NOT_READY_MANUAL_INTERVENTION = CheckCondition(SenseKey.NOT_READY, 0x04, 0x03)
NOT_READY_STANDBY = CheckCondition(SenseKey.NOT_READY, 0x04, 0x0B)
MEDIUM_NOT_PRESENT = CheckCondition(SenseKey.NOT_READY, 0x3A, 0x00)

# MEDIUM ERROR
WRITE_ERROR = CheckCondition(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
UNRECOVERED_READ_ERROR = CheckCondition(SenseKey.MEDIUM_ERROR, 0x11, 0x00)

# HARDWARE ERROR
INTERNAL_TARGET_FAILURE = CheckCondition(SenseKey.HARDWARE_ERROR, 0x44, 0x00)

# ILLEGAL REQUEST
PARAMETER_LIST_LENGTH_ERROR = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)

# UNIT ATTENTION
NOT_READY_TO_READY_CHANGE = CheckCondition(SenseKey.UNIT_ATTENTION, 0x28, 0x00)
POWER_ON_RESET = CheckCondition(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
CAPACITY_DATA_HAS_CHANGED = CheckCondition(SenseKey.UNIT_ATTENTION, 0x2A, 0x09)

# DATA PROTECT
WRITE_PROTECTED = CheckCondition(SenseKey.DATA_PROTECT, 0x27, 0x00)

# MISCOMPARE
MISCOMPARE_DURING_VERIFY = CheckCondition(SenseKey.MISCOMPARE, 0x1D, 0x00)

# ABORTED COMMAND
DATA_PHASE_ERROR = CheckCondition(SenseKey.ABORTED_COMMAND, 0x4B, 0x00)
