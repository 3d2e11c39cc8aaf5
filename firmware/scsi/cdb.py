"""CDB decoding: what a command asks for, checked against the unit's size and
features, without touching the device or any unit state."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from firmware.scsi import sense as S
from firmware.scsi.opcodes import (
    CDB_LENGTH,
    INQUIRY,
    MODE_SELECT_6,
    MODE_SELECT_10,
    MODE_SENSE_6,
    MODE_SENSE_10,
    PREVENT_ALLOW_MEDIUM_REMOVAL,
    READ_6,
    READ_10,
    READ_12,
    READ_CAPACITY_10,
    READ_FORMAT_CAPACITIES,
    READ_OPCODES,
    REPORT_LUNS,
    REQUEST_SENSE,
    SAI_READ_CAPACITY_16,
    SERVICE_ACTION_IN_16,
    START_STOP_UNIT,
    SYNC_OPCODES,
    SYNCHRONIZE_CACHE_10,
    TEST_UNIT_READY,
    UNMAP,
    VERIFY_10,
    VERIFY_12,
    VERIFY_OPCODES,
    WRITE_6,
    WRITE_10,
    WRITE_12,
    WRITE_OPCODES,
)
from firmware.scsi.pages import (
    PAGE_ALL,
    PAGE_CACHING,
    PAGE_CONTROL,
    READ_CAPACITY_10_DATA,
    SUBPAGE_ALL,
)
from firmware.scsi.sense import CheckCondition
from firmware.scsi.unit import LogicalUnit

_CONTROL_NACA = 0x04
_CONTROL_LINK = 0x01


class DataDirection(enum.Enum):
    NONE = "none"
    #: device to host (Di)
    IN = "in"
    #: host to device (Do)
    OUT = "out"


@dataclass(frozen=True)
class ParsedCommand:
    """What a CDB asks for, decoded without touching the device or LU state.

    `length` is the number of bytes the device expects to move in `direction`: the
    allocation length for data-in commands that return parameter data (the actual
    reply may be shorter, see `Command.length`), the transfer length in bytes for
    READ/WRITE/VERIFY, the parameter list length for MODE SELECT/UNMAP.
    """

    opcode: int
    direction: DataDirection
    length: int
    #: first logical block and number of blocks, for block commands
    lba: int = 0
    blocks: int = 0
    fua: bool = False


def _u16(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 2], "big")


def _u32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "big")


def _u64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 8], "big")


def _block_address(cdb: bytes) -> tuple[int, int, int]:
    """(lba, blocks, flags byte) of a READ/WRITE/VERIFY/SYNCHRONIZE CACHE CDB."""
    op = cdb[0]
    if op in (READ_6, WRITE_6):
        lba = ((cdb[1] & 0x1F) << 16) | _u16(cdb, 2)
        return lba, cdb[4] or 256, 0
    if op in (READ_10, WRITE_10, VERIFY_10, SYNCHRONIZE_CACHE_10):
        return _u32(cdb, 2), _u16(cdb, 7), cdb[1]
    if op in (READ_12, WRITE_12, VERIFY_12):
        return _u32(cdb, 2), _u32(cdb, 6), cdb[1]
    return _u64(cdb, 2), _u32(cdb, 10), cdb[1]


def _out_of_range(unit: LogicalUnit, lba: int, blocks: int) -> bool:
    count = unit.block_count
    return lba + blocks > count or (blocks == 0 and lba >= count)


def _decode(unit: LogicalUnit | None, cdb: bytes) -> ParsedCommand | CheckCondition:
    op = cdb[0]
    need = CDB_LENGTH.get(op)
    if need is None:
        return S.INVALID_COMMAND_OPERATION_CODE
    if op == SERVICE_ACTION_IN_16 and (len(cdb) < need or cdb[1] & 0x1F != SAI_READ_CAPACITY_16):
        return S.INVALID_COMMAND_OPERATION_CODE
    if op == UNMAP and unit is not None and not unit.device.supports_trim:
        return S.INVALID_COMMAND_OPERATION_CODE
    if len(cdb) < need:
        return S.INVALID_FIELD_IN_CDB
    if cdb[need - 1] & (_CONTROL_NACA | _CONTROL_LINK):
        return S.INVALID_FIELD_IN_CDB
    none = DataDirection.NONE
    din = DataDirection.IN
    dout = DataDirection.OUT

    if op in (TEST_UNIT_READY, START_STOP_UNIT, PREVENT_ALLOW_MEDIUM_REMOVAL):
        return ParsedCommand(op, none, 0)
    if op == REQUEST_SENSE:
        return ParsedCommand(op, din, cdb[4])
    if op == INQUIRY:
        evpd, page = cdb[1] & 0x01, cdb[2]
        # Bits 7:5 of byte 1 may carry a SCSI-2 LUN (Linux sets them while scanning).
        if cdb[1] & 0x02 or (not evpd and page):
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, din, _u16(cdb, 3))
    if op == REPORT_LUNS:
        if cdb[2] > 0x02 or _u32(cdb, 6) < 16:
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, din, _u32(cdb, 6))
    if unit is None:
        return S.LOGICAL_UNIT_NOT_SUPPORTED
    bs = unit.block_size

    if op in (MODE_SENSE_6, MODE_SENSE_10):
        if cdb[2] >> 6 == 3:
            return S.SAVING_PARAMETERS_NOT_SUPPORTED
        page, subpage = cdb[2] & 0x3F, cdb[3]
        if page not in (PAGE_CACHING, PAGE_CONTROL, PAGE_ALL) or subpage not in (0, SUBPAGE_ALL):
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, din, cdb[4] if op == MODE_SENSE_6 else _u16(cdb, 7))
    if op in (MODE_SELECT_6, MODE_SELECT_10):
        if cdb[1] & 0x01:  # SP: no savable pages
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, dout, cdb[4] if op == MODE_SELECT_6 else _u16(cdb, 7))
    if op == READ_FORMAT_CAPACITIES:
        return ParsedCommand(op, din, _u16(cdb, 7))
    if op == READ_CAPACITY_10:
        # PMI is obsolete (SBC-3); a LOGICAL BLOCK ADDRESS without it is invalid.
        if not cdb[8] & 0x01 and _u32(cdb, 2):
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, din, READ_CAPACITY_10_DATA.size)
    if op == SERVICE_ACTION_IN_16:
        return ParsedCommand(op, din, _u32(cdb, 10))
    if op == UNMAP:
        if cdb[1] & 0x01:  # ANCHOR: no anchored state here
            return S.INVALID_FIELD_IN_CDB
        return ParsedCommand(op, dout, _u16(cdb, 7))
    if op in READ_OPCODES | WRITE_OPCODES | VERIFY_OPCODES | SYNC_OPCODES:
        lba, blocks, flags = _block_address(cdb)
        if op in SYNC_OPCODES:
            if _out_of_range(unit, lba, blocks) and not (blocks == 0 and lba < unit.block_count):
                return S.LBA_OUT_OF_RANGE
            return ParsedCommand(op, none, 0, lba=lba, blocks=blocks)
        if flags >> 5:  # RDPROTECT/WRPROTECT/VRPROTECT: no protection information
            return S.INVALID_FIELD_IN_CDB
        direction = din if op in READ_OPCODES else dout
        if op in VERIFY_OPCODES:
            bytchk = (flags >> 1) & 0x03
            if bytchk > 1:
                return S.INVALID_FIELD_IN_CDB
            direction = dout if bytchk else none
        if _out_of_range(unit, lba, blocks):
            return S.LBA_OUT_OF_RANGE
        length = blocks * bs if direction is not none else 0
        if not blocks:
            direction = none
        return ParsedCommand(op, direction, length, lba=lba, blocks=blocks, fua=bool(flags & 0x08))
    return S.INVALID_COMMAND_OPERATION_CODE  # pragma: no cover - table and code disagree
