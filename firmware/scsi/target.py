"""SCSI block target (SBC-3/SPC-4 subset) over `BlockDevice`s, without I/O of its own.

A `ScsiTarget` holds one or more `LogicalUnit`s.  Every command goes through
`ScsiTarget.start(lun, cdb)`, which returns a `Command`: its `direction` and `length`
(the device's intention, "Di"/"Do" in the Bulk-Only Transport's terms) are known
before any data moves, so a transport can compare them with the host's expectation.
The transport then pulls data-in with `Command.read()` or pushes data-out with
`Command.write()` in chunks of its choice, and ends with `Command.finish()`, which
gives the status and sense.  `ScsiTarget.execute()` does all of this in one call.

The target notices device state and size changes by comparing on every command (no
threads, no callbacks): STANDBY/OFFLINE -> READY raises UNIT ATTENTION 28/00, a size
change raises 2A/09.  Pending unit attentions are reported once, to the first command
other than INQUIRY, REPORT LUNS and REQUEST SENSE (SAM-5 5.14; one I_T nexus, as a USB
host is the only initiator).

Transport has no autosense: the sense of a CHECK CONDITION is kept until the next
command, so a following REQUEST SENSE returns it.

Device states map to NOT READY sense for medium-access commands (TEST UNIT READY,
READ, WRITE, VERIFY, SYNCHRONIZE CACHE, UNMAP): STANDBY -> 02/04/0B (target port in
standby state), OFFLINE -> 02/04/03 (manual intervention required).  INQUIRY, MODE
SENSE, READ CAPACITY and REPORT LUNS keep answering with the true size in any state.
"""

from __future__ import annotations

from collections.abc import Sequence

from firmware.blockdev import BlockDeviceError, FrontEnd, HostCommand, flush_for
from firmware.scsi import sense as S
from firmware.scsi.cdb import DataDirection, ParsedCommand, _decode
from firmware.scsi.commands import (
    Command,
    CommandResult,
    Status,
    _DataInCommand,
    _ParameterListCommand,
    _ReadBlocks,
    _VerifyCompare,
    _WriteBlocks,
)
from firmware.scsi.opcodes import (
    CDB_LENGTH,
    INQUIRY,
    MEDIUM_ACCESS,
    MODE_SELECT_6,
    MODE_SELECT_10,
    MODE_SENSE_6,
    MODE_SENSE_10,
    PREVENT_ALLOW_MEDIUM_REMOVAL,
    READ_6,
    READ_10,
    READ_12,
    READ_16,
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
    SYNCHRONIZE_CACHE_16,
    TEST_UNIT_READY,
    UNIT_ATTENTION_EXEMPT,
    UNMAP,
    VERIFY_10,
    VERIFY_12,
    VERIFY_16,
    VERIFY_OPCODES,
    WRITE_6,
    WRITE_10,
    WRITE_12,
    WRITE_16,
    WRITE_OPCODES,
)
from firmware.scsi.pages import (
    BLOCK_LIMITS,
    DESIGNATOR_HEADER,
    FORMAT_CAPACITIES,
    LONG_BLOCK_DESCRIPTOR,
    MODE_HEADER_6,
    MODE_HEADER_10,
    PAGE_ALL,
    PAGE_CACHING,
    PAGE_CONTROL,
    READ_CAPACITY_10_DATA,
    READ_CAPACITY_16_DATA,
    REPORT_LUNS_HEADER,
    SHORT_BLOCK_DESCRIPTOR,
    STANDARD_INQUIRY,
    SUBPAGE_ALL,
    UNMAP_DESCRIPTOR,
    UNMAP_HEADER,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_BLOCK_LIMITS,
    VPD_DEVICE_IDENTIFICATION,
    VPD_HEADER,
    VPD_LOGICAL_BLOCK_PROVISIONING,
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL_NUMBER,
    _mode_select,
    _mode_sense,
    _no_unit_inquiry,
    _report_luns,
    _standard_inquiry,
    _unmap,
    _vpd_pages,
)
from firmware.scsi.sense import CheckCondition
from firmware.scsi.unit import LogicalUnit, _SenseSlot

__all__ = [
    "BLOCK_LIMITS",
    "CDB_LENGTH",
    "Command",
    "CommandResult",
    "DESIGNATOR_HEADER",
    "DataDirection",
    "FORMAT_CAPACITIES",
    "INQUIRY",
    "LONG_BLOCK_DESCRIPTOR",
    "LogicalUnit",
    "MEDIUM_ACCESS",
    "MODE_HEADER_10",
    "MODE_HEADER_6",
    "MODE_SELECT_10",
    "MODE_SELECT_6",
    "MODE_SENSE_10",
    "MODE_SENSE_6",
    "PAGE_ALL",
    "PAGE_CACHING",
    "PAGE_CONTROL",
    "PREVENT_ALLOW_MEDIUM_REMOVAL",
    "ParsedCommand",
    "READ_10",
    "READ_12",
    "READ_16",
    "READ_6",
    "READ_CAPACITY_10",
    "READ_CAPACITY_10_DATA",
    "READ_CAPACITY_16_DATA",
    "READ_FORMAT_CAPACITIES",
    "READ_OPCODES",
    "REPORT_LUNS",
    "REPORT_LUNS_HEADER",
    "REQUEST_SENSE",
    "SAI_READ_CAPACITY_16",
    "SERVICE_ACTION_IN_16",
    "SHORT_BLOCK_DESCRIPTOR",
    "STANDARD_INQUIRY",
    "START_STOP_UNIT",
    "SUBPAGE_ALL",
    "SYNCHRONIZE_CACHE_10",
    "SYNCHRONIZE_CACHE_16",
    "SYNC_OPCODES",
    "ScsiTarget",
    "Status",
    "TEST_UNIT_READY",
    "UNIT_ATTENTION_EXEMPT",
    "UNMAP",
    "UNMAP_DESCRIPTOR",
    "UNMAP_HEADER",
    "VERIFY_10",
    "VERIFY_12",
    "VERIFY_16",
    "VERIFY_OPCODES",
    "VPD_BLOCK_DEVICE_CHARACTERISTICS",
    "VPD_BLOCK_LIMITS",
    "VPD_DEVICE_IDENTIFICATION",
    "VPD_HEADER",
    "VPD_LOGICAL_BLOCK_PROVISIONING",
    "VPD_SUPPORTED_PAGES",
    "VPD_UNIT_SERIAL_NUMBER",
    "WRITE_10",
    "WRITE_12",
    "WRITE_16",
    "WRITE_6",
    "WRITE_OPCODES",
]

#: internal piece size for work with no transport in between (VERIFY, execute())
_PIECE = 1 << 20


class ScsiTarget:
    """A SCSI target with LUNs 0..max_lun.  Not thread-safe: one command at a time,
    which is what the Bulk-Only Transport guarantees."""

    def __init__(
        self,
        units: Sequence[LogicalUnit],
        *,
        power_on_unit_attention: bool = True,
        max_unmap_blocks: int = 0xFFFFFFFF,
        max_unmap_descriptors: int = 256,
    ) -> None:
        if not 1 <= len(units) <= 16:
            raise ValueError("a target has 1 to 16 logical units")
        self._units = tuple(units)
        self._no_unit_slot = _SenseSlot()
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        if power_on_unit_attention:
            for unit in self._units:
                unit._reset()

    @property
    def max_lun(self) -> int:
        return len(self._units) - 1

    @property
    def units(self) -> Sequence[LogicalUnit]:
        return self._units

    def _unit(self, lun: int) -> LogicalUnit | None:
        return self._units[lun] if 0 <= lun < len(self._units) else None

    def parse(self, lun: int, cdb: bytes | memoryview) -> ParsedCommand | CheckCondition:
        """Decode a CDB (length, opcode, fields, LBA range) without side effects."""
        cdb = bytes(cdb)
        if not cdb:
            return S.INVALID_COMMAND_OPERATION_CODE
        return _decode(self._unit(lun), cdb)

    def start(self, lun: int, cdb: bytes | memoryview) -> Command:
        """Begin a command: LUN check, unit attention, readiness, CDB checks.  Never
        raises for any input; a failed command has direction NONE and length 0."""
        cdb = bytes(cdb)
        unit = self._unit(lun)
        if unit is None:
            return self._start_without_unit(cdb)
        slot = unit._slot
        unit._observe()
        opcode = cdb[0] if cdb else -1
        if opcode != REQUEST_SENSE:
            slot.stored_sense = None
        if opcode not in UNIT_ATTENTION_EXEMPT and unit._pending_ua:
            return Command(slot, sense=unit._pending_ua.pop(0))
        parsed = self.parse(lun, cdb)
        if isinstance(parsed, CheckCondition):
            return Command(slot, sense=parsed)
        if opcode in MEDIUM_ACCESS:
            not_ready = unit.not_ready_sense()
            if not_ready is not None:
                return Command(slot, sense=not_ready)
        if (opcode in WRITE_OPCODES or opcode == UNMAP) and unit.write_protected:
            return Command(slot, sense=S.WRITE_PROTECTED)
        try:
            return self._dispatch(unit, cdb, parsed)
        except (BlockDeviceError, OSError) as e:
            return Command(slot, sense=unit.sense_for(e, reading=True))

    def _start_without_unit(self, cdb: bytes) -> Command:
        slot = self._no_unit_slot
        parsed = _decode(None, cdb) if cdb else S.INVALID_COMMAND_OPERATION_CODE
        if isinstance(parsed, CheckCondition):
            return Command(slot, sense=parsed)
        if parsed.opcode == INQUIRY and not cdb[1] & 0x01:
            return _DataInCommand(slot, _no_unit_inquiry()[: parsed.length])
        if parsed.opcode == REQUEST_SENSE:
            data = S.LOGICAL_UNIT_NOT_SUPPORTED.sense_data(descriptor=bool(cdb[1] & 0x01))
            return _DataInCommand(slot, data[: parsed.length])
        if parsed.opcode == REPORT_LUNS:
            return _DataInCommand(slot, _report_luns(len(self._units))[: parsed.length])
        return Command(slot, sense=S.LOGICAL_UNIT_NOT_SUPPORTED)

    def _dispatch(self, unit: LogicalUnit, cdb: bytes, parsed: ParsedCommand) -> Command:
        slot = unit._slot
        op = parsed.opcode
        bs = unit.block_size

        def data_in(data: bytes) -> Command:
            return _DataInCommand(slot, data[: parsed.length])

        if op in (TEST_UNIT_READY, START_STOP_UNIT, PREVENT_ALLOW_MEDIUM_REMOVAL):
            return Command(slot)
        if op == REQUEST_SENSE:
            sense = slot.stored_sense
            slot.stored_sense = None
            if sense is None and unit._pending_ua:
                sense = unit._pending_ua.pop(0)
            if sense is None:
                sense = unit.not_ready_sense() or S.NO_SENSE
            return data_in(sense.sense_data(descriptor=bool(cdb[1] & 0x01)))
        if op == INQUIRY:
            if not cdb[1] & 0x01:
                return data_in(_standard_inquiry(unit))
            pages = _vpd_pages(unit, self.max_unmap_blocks, self.max_unmap_descriptors)
            page = pages.get(cdb[2])
            if page is None:
                return Command(slot, sense=S.INVALID_FIELD_IN_CDB)
            return data_in(page)
        if op == REPORT_LUNS:
            return data_in(_report_luns(len(self._units)))
        if op in (MODE_SENSE_6, MODE_SENSE_10):
            return data_in(_mode_sense(unit, cdb))
        if op in (MODE_SELECT_6, MODE_SELECT_10):
            ten = op == MODE_SELECT_10
            return _ParameterListCommand(
                slot, parsed.length, lambda data: _mode_select(unit, ten, data)
            )
        if op == READ_FORMAT_CAPACITIES:
            blocks = min(unit.block_count, 0xFFFFFFFF)
            # descriptor type 2: formatted media, current capacity
            return data_in(FORMAT_CAPACITIES.pack(8, blocks, 0x02, bs.to_bytes(3, "big")))
        if op == READ_CAPACITY_10:
            last = max(unit.block_count - 1, 0)
            return data_in(READ_CAPACITY_10_DATA.pack(min(last, 0xFFFFFFFF), bs))
        if op == SERVICE_ACTION_IN_16:
            last = max(unit.block_count - 1, 0)
            lbpme = 0x8000 if unit.device.supports_trim else 0
            return data_in(READ_CAPACITY_16_DATA.pack(last, bs, 0, 0, lbpme))
        if op == UNMAP:
            return _ParameterListCommand(
                slot,
                parsed.length,
                lambda data: _unmap(unit, data, self.max_unmap_blocks, self.max_unmap_descriptors),
            )
        if op in SYNC_OPCODES:
            try:
                flush_for(unit.device, HostCommand(FrontEnd.SCSI, op))
            except (BlockDeviceError, OSError) as e:
                return Command(slot, sense=unit.sense_for(e, reading=False))
            return Command(slot)
        offset, length = parsed.lba * bs, parsed.blocks * bs
        if op in READ_OPCODES:
            if not length:
                return Command(slot)
            return _ReadBlocks(slot, unit, offset, length)
        if op in WRITE_OPCODES:
            if not length:
                return Command(slot)
            return _WriteBlocks(slot, unit, offset, length, parsed.fua, op)
        if op in VERIFY_OPCODES:
            if parsed.direction is DataDirection.OUT:
                return _VerifyCompare(slot, unit, offset, length)
            return Command(slot, sense=self._verify_medium(unit, offset, length))
        return Command(slot, sense=S.INVALID_COMMAND_OPERATION_CODE)  # pragma: no cover

    @staticmethod
    def _verify_medium(unit: LogicalUnit, offset: int, length: int) -> CheckCondition | None:
        end = offset + length
        while offset < end:
            n = min(_PIECE, end - offset)
            try:
                if len(unit.device.pread(offset, n)) != n:
                    return S.UNRECOVERED_READ_ERROR
            except (BlockDeviceError, OSError) as e:
                return unit.sense_for(e, reading=True)
            offset += n
        return None

    def execute(
        self, lun: int, cdb: bytes | memoryview, data_out: bytes | memoryview | None = None
    ) -> CommandResult:
        """Run a whole command.  `data_out` is given to a data-out command (missing
        bytes are a short transfer); data-in is returned in the result."""
        command = self.start(lun, cdb)
        data = b""
        if command.direction is DataDirection.IN:
            pieces = []
            while piece := command.read(_PIECE):
                pieces.append(bytes(piece))
            data = b"".join(pieces)
        elif command.direction is DataDirection.OUT and data_out is not None:
            view = memoryview(data_out).cast("B")[: command.length]
            for i in range(0, len(view), _PIECE):
                command.write(view[i : i + _PIECE])
        result = command.finish()
        if data:
            return CommandResult(result.status, data, result.sense)
        return result

    def reset(self) -> None:
        """A reset occurred (USB bus reset, configuration change): every LU gets
        UNIT ATTENTION 29/00 and loses stored sense."""
        for unit in self._units:
            unit._reset()
        self._no_unit_slot.stored_sense = None
