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

import enum
import hashlib
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from firmware.blockdev import BlockDevice, BlockDeviceError, DeviceState, MediumError
from firmware.blockdev import NotReady as DeviceNotReady
from firmware.blockdev import OutOfRange as DeviceOutOfRange
from firmware.blockdev import WriteProtected as DeviceWriteProtected
from firmware.scsi import sense as S
from firmware.scsi.sense import CheckCondition

# -- operation codes (SPC-4, SBC-3) -----------------------------------------------------

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_FORMAT_CAPACITIES = 0x23
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA
VERIFY_12 = 0xAF

#: CDB length of every supported operation code (a longer CDB is accepted: Windows
#: pads 6- and 10-byte CDBs to 12 bytes)
CDB_LENGTH: dict[int, int] = {
    TEST_UNIT_READY: 6,
    REQUEST_SENSE: 6,
    READ_6: 6,
    WRITE_6: 6,
    INQUIRY: 6,
    MODE_SELECT_6: 6,
    MODE_SENSE_6: 6,
    START_STOP_UNIT: 6,
    PREVENT_ALLOW_MEDIUM_REMOVAL: 6,
    READ_FORMAT_CAPACITIES: 10,
    READ_CAPACITY_10: 10,
    READ_10: 10,
    WRITE_10: 10,
    VERIFY_10: 10,
    SYNCHRONIZE_CACHE_10: 10,
    UNMAP: 10,
    MODE_SELECT_10: 10,
    MODE_SENSE_10: 10,
    READ_16: 16,
    WRITE_16: 16,
    VERIFY_16: 16,
    SYNCHRONIZE_CACHE_16: 16,
    SERVICE_ACTION_IN_16: 16,
    REPORT_LUNS: 12,
    READ_12: 12,
    WRITE_12: 12,
    VERIFY_12: 12,
}

READ_OPCODES = frozenset({READ_6, READ_10, READ_12, READ_16})
WRITE_OPCODES = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_16})
VERIFY_OPCODES = frozenset({VERIFY_10, VERIFY_12, VERIFY_16})
SYNC_OPCODES = frozenset({SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16})
#: commands a pending unit attention does not block (SAM-5 5.14)
UNIT_ATTENTION_EXEMPT = frozenset({INQUIRY, REPORT_LUNS, REQUEST_SENSE})
#: commands that touch the medium and so need a READY device
MEDIUM_ACCESS = (
    READ_OPCODES
    | WRITE_OPCODES
    | VERIFY_OPCODES
    | SYNC_OPCODES
    | frozenset({TEST_UNIT_READY, UNMAP})
)

_CONTROL_NACA = 0x04
_CONTROL_LINK = 0x01
#: internal piece size for work with no transport in between (VERIFY, execute())
_PIECE = 1 << 20

# -- parameter data layouts ---------------------------------------------------------------

#: standard INQUIRY data (SPC-4 6.6.2): peripheral, RMB, version, response format,
#: additional length, flags(3), vendor, product, revision
STANDARD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s")
assert STANDARD_INQUIRY.size == 36
#: VPD page header: peripheral, page code, page length
VPD_HEADER = struct.Struct(">BBH")
assert VPD_HEADER.size == 4
#: designation descriptor header: protocol/code set, PIV/association/type, reserved, length
DESIGNATOR_HEADER = struct.Struct(">BBxB")
assert DESIGNATOR_HEADER.size == 4
#: block limits VPD 0xB0 body after the header (SBC-3 6.5.3), 60 bytes
BLOCK_LIMITS = struct.Struct(">BBHIIIIIII Q20x".replace(" ", ""))
assert BLOCK_LIMITS.size == 0x3C
#: READ CAPACITY(10) data: returned LBA, block length
READ_CAPACITY_10_DATA = struct.Struct(">II")
assert READ_CAPACITY_10_DATA.size == 8
#: READ CAPACITY(16) data: returned LBA, block length, protection, exponents, LBPME|LBPRZ|LALBA
READ_CAPACITY_16_DATA = struct.Struct(">QIBBH16x")
assert READ_CAPACITY_16_DATA.size == 32
#: READ FORMAT CAPACITIES (MMC/UFI): list header then one current capacity descriptor
FORMAT_CAPACITIES = struct.Struct(">3xBIB3s")
assert FORMAT_CAPACITIES.size == 12
MODE_HEADER_6 = struct.Struct(">BBBB")
assert MODE_HEADER_6.size == 4
MODE_HEADER_10 = struct.Struct(">HBBBxH")
assert MODE_HEADER_10.size == 8
SHORT_BLOCK_DESCRIPTOR = struct.Struct(">Ix3s")
assert SHORT_BLOCK_DESCRIPTOR.size == 8
LONG_BLOCK_DESCRIPTOR = struct.Struct(">Q4xI")
assert LONG_BLOCK_DESCRIPTOR.size == 16
REPORT_LUNS_HEADER = struct.Struct(">I4x")
assert REPORT_LUNS_HEADER.size == 8
#: UNMAP parameter list header and block descriptor (SBC-3 5.28.2)
UNMAP_HEADER = struct.Struct(">HH4x")
assert UNMAP_HEADER.size == 8
UNMAP_DESCRIPTOR = struct.Struct(">QI4x")
assert UNMAP_DESCRIPTOR.size == 16

PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
SUBPAGE_ALL = 0xFF
_MODE_WP = 0x80
_MODE_DPOFUA = 0x10
_CACHING_WCE = 0x04
_LONGLBA = 0x01

VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2


class DataDirection(enum.Enum):
    NONE = "none"
    #: device to host (Di)
    IN = "in"
    #: host to device (Do)
    OUT = "out"


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


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


@dataclass(frozen=True)
class CommandResult:
    status: Status
    #: data-in of the command (filled by `ScsiTarget.execute`; empty otherwise)
    data_in: bytes | memoryview = b""
    sense: CheckCondition | None = None

    @property
    def good(self) -> bool:
        return self.status is Status.GOOD


class _SenseSlot:
    """Where a finished command leaves its sense for the next REQUEST SENSE."""

    def __init__(self) -> None:
        self.stored_sense: CheckCondition | None = None


# -- commands in flight -------------------------------------------------------------------


class Command:
    """One command in flight on one logical unit.

    `direction` and `length` are final when the command is returned by
    `ScsiTarget.start`: `length` is the exact number of bytes the device intends to
    transfer (0 with direction NONE, which is also the case for a command that
    already failed, e.g. an invalid CDB).
    """

    def __init__(
        self,
        slot: _SenseSlot,
        direction: DataDirection = DataDirection.NONE,
        length: int = 0,
        sense: CheckCondition | None = None,
    ) -> None:
        self.direction = direction
        self.length = length
        self._slot = slot
        self._sense = sense
        self._result: CommandResult | None = None
        #: data-out bytes taken so far
        self._received = 0

    @property
    def failed(self) -> bool:
        """True once the command has a CHECK CONDITION (further data is discarded)."""
        return self._sense is not None

    @property
    def sense(self) -> CheckCondition | None:
        return self._sense

    def _fail(self, sense: CheckCondition) -> None:
        if self._sense is None:
            self._sense = sense

    def read(self, max_length: int) -> bytes | memoryview:
        """Next piece of data-in, at most `max_length` bytes; empty when all of
        `length` has been returned or the command failed part-way (e.g. a medium
        error).  The transport treats a premature empty piece as a short transfer.
        A piece may be a view of a buffer the command reuses: it is valid until the
        next read() or finish(), so the transport sends (or copies) it before."""
        return b""

    def write(self, data: bytes | memoryview) -> None:
        """Consume the next piece of data-out (any size; the total never exceeds
        `length`).  After a failure further data is discarded."""
        n = len(data)
        if self.direction is not DataDirection.OUT or self._received + n > self.length:
            raise ValueError("more data-out than the command asked for")
        self._received += n
        if self._sense is None:
            self._consume(data)

    def _consume(self, data: bytes | memoryview) -> None:
        pass

    def _complete(self) -> None:
        """Work that runs once all data-out is in (only when not failed)."""

    def finish(self) -> CommandResult:
        """End the command: run whatever waits for all data-out (MODE SELECT, UNMAP)
        or has no data phase, record sense for REQUEST SENSE, return status."""
        if self._result is None:
            if self._sense is None:
                if self.direction is DataDirection.OUT and self._received < self.length:
                    # The host stopped sending early: what came is not a whole command.
                    self._fail(S.DATA_PHASE_ERROR)
                else:
                    self._complete()
            self._slot.stored_sense = self._sense
            if self._sense is None:
                self._result = CommandResult(Status.GOOD)
            else:
                self._result = CommandResult(Status.CHECK_CONDITION, sense=self._sense)
        return self._result


class _DataInCommand(Command):
    """Parameter data computed up front (INQUIRY, MODE SENSE, ...)."""

    def __init__(self, slot: _SenseSlot, data: bytes) -> None:
        super().__init__(slot, DataDirection.IN if data else DataDirection.NONE, len(data))
        self._data = memoryview(data)

    def read(self, max_length: int) -> bytes | memoryview:
        piece = self._data[:max_length]
        self._data = self._data[len(piece) :]
        return piece


class _ReadBlocks(Command):
    """READ: pulls whole blocks from the device, as large as the transport asks."""

    def __init__(self, slot: _SenseSlot, unit: LogicalUnit, offset: int, length: int) -> None:
        super().__init__(slot, DataDirection.IN, length)
        self._unit = unit
        self._offset = offset
        self._remaining = length
        self._leftover = memoryview(b"")
        #: the device's pread_into (blockdev.ReadInto) and the unit's buffer it fills
        self._read_into = getattr(unit.device, "pread_into", None)
        self._buffer: bytearray | None = None

    def read(self, max_length: int) -> bytes | memoryview:
        if self._sense is not None or max_length <= 0:
            return b""
        if not self._leftover:
            if not self._remaining:
                return b""
            bs = self._unit.block_size
            n = min(self._remaining, max(max_length - max_length % bs, bs))
            try:
                data: bytes | memoryview
                if self._read_into is None:
                    data = self._unit.device.pread(self._offset, n)
                else:
                    if self._buffer is None or len(self._buffer) < n:
                        self._buffer = self._unit.take_buffer(n)
                    data = memoryview(self._buffer)[:n]
                    self._read_into(self._offset, data)
            except (BlockDeviceError, OSError) as e:
                self._fail(self._unit.sense_for(e, reading=True))
                return b""
            if len(data) != n:
                self._fail(S.UNRECOVERED_READ_ERROR)
                return b""
            self._offset += n
            self._remaining -= n
            if n <= max_length:
                return data
            self._leftover = memoryview(data)
        piece = self._leftover[:max_length]
        self._leftover = self._leftover[len(piece) :]
        return piece

    def finish(self) -> CommandResult:
        buffer, self._buffer = self._buffer, None
        self._leftover = memoryview(b"")
        if buffer is not None:
            self._unit.give_buffer(buffer)
        return super().finish()


class _BlockAligner:
    """Regroups data-out pieces of any size into whole blocks at their device offset,
    without copying pieces that are already aligned."""

    def __init__(self, block_size: int, offset: int) -> None:
        self._bs = block_size
        self.offset = offset
        self._pending = bytearray()

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes | memoryview]]:
        out: list[tuple[int, bytes | memoryview]] = []
        view = memoryview(data).cast("B")
        if self._pending:
            need = self._bs - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) < self._bs:
                return out
            out.append((self.offset, bytes(self._pending)))
            self.offset += self._bs
            self._pending.clear()
        whole = len(view) - len(view) % self._bs
        if whole:
            out.append((self.offset, view[:whole]))
            self.offset += whole
        self._pending += view[whole:]
        return out


class _WriteBlocks(Command):
    """WRITE: each arriving piece goes to pwrite as soon as it holds whole blocks."""

    def __init__(
        self, slot: _SenseSlot, unit: LogicalUnit, offset: int, length: int, fua: bool
    ) -> None:
        super().__init__(slot, DataDirection.OUT, length)
        self._unit = unit
        self._fua = fua
        self._aligner = _BlockAligner(unit.block_size, offset)

    def _consume(self, data: bytes | memoryview) -> None:
        for offset, piece in self._aligner.feed(data):
            try:
                self._unit.device.pwrite(offset, piece, self._fua)
            except (BlockDeviceError, OSError) as e:
                self._fail(self._unit.sense_for(e, reading=False))
                return


class _VerifyCompare(Command):
    """VERIFY with BYTCHK=1: compare data-out with the medium as it arrives."""

    def __init__(self, slot: _SenseSlot, unit: LogicalUnit, offset: int, length: int) -> None:
        super().__init__(slot, DataDirection.OUT, length)
        self._unit = unit
        self._start = offset
        self._aligner = _BlockAligner(unit.block_size, offset)

    def _consume(self, data: bytes | memoryview) -> None:
        for offset, piece in self._aligner.feed(data):
            try:
                medium = self._unit.device.pread(offset, len(piece))
            except (BlockDeviceError, OSError) as e:
                self._fail(self._unit.sense_for(e, reading=True))
                return
            if medium != piece:
                theirs = bytes(piece)
                first = next(i for i in range(len(theirs)) if theirs[i] != medium[i])
                self._fail(
                    CheckCondition(
                        S.MISCOMPARE_DURING_VERIFY.key,
                        S.MISCOMPARE_DURING_VERIFY.asc,
                        S.MISCOMPARE_DURING_VERIFY.ascq,
                        information=offset - self._start + first,
                    )
                )
                return


class _ParameterListCommand(Command):
    """Data-out collected whole, then handled (MODE SELECT, UNMAP)."""

    def __init__(
        self,
        slot: _SenseSlot,
        length: int,
        handler: Callable[[bytes], CheckCondition | None],
    ) -> None:
        super().__init__(slot, DataDirection.OUT if length else DataDirection.NONE, length)
        self._buffer = bytearray()
        self._handler = handler

    def _consume(self, data: bytes | memoryview) -> None:
        self._buffer += data

    def _complete(self) -> None:
        sense = self._handler(bytes(self._buffer))
        if sense is not None:
            self._fail(sense)


# -- logical units ---------------------------------------------------------------------------


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

    @property
    def pending_unit_attentions(self) -> tuple[CheckCondition, ...]:
        return tuple(self._pending_ua)

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
            return S.NOT_READY_MANUAL_INTERVENTION
        return None

    def sense_for(self, error: BaseException, *, reading: bool) -> CheckCondition:
        """The sense a BlockDevice error becomes."""
        if isinstance(error, DeviceOutOfRange):
            return S.LBA_OUT_OF_RANGE
        if isinstance(error, DeviceWriteProtected):
            return S.WRITE_PROTECTED
        if isinstance(error, DeviceNotReady):
            return self.not_ready_sense() or S.NOT_READY_CAUSE_NOT_REPORTABLE
        if isinstance(error, MediumError | OSError):
            return S.UNRECOVERED_READ_ERROR if reading else S.WRITE_ERROR
        return S.INTERNAL_TARGET_FAILURE


# -- CDB decoding ---------------------------------------------------------------------------


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


# -- parameter data ---------------------------------------------------------------------------


def _standard_inquiry(unit: LogicalUnit) -> bytes:
    return STANDARD_INQUIRY.pack(
        0x00,  # connected direct-access block device
        0x80 if unit.removable else 0x00,
        0x06,  # SPC-4
        0x02,  # response data format 2
        STANDARD_INQUIRY.size - 5,
        0,
        0,
        0,
        unit.vendor,
        unit.product,
        unit.revision,
    )


def _no_unit_inquiry() -> bytes:
    # Peripheral qualifier 011b, type 1Fh: no logical unit at this LUN (SPC-4 6.6.2).
    return STANDARD_INQUIRY.pack(
        0x7F, 0, 0x06, 0x02, STANDARD_INQUIRY.size - 5, 0, 0, 0, b" " * 8, b" " * 16, b" " * 4
    )


def _vpd(page: int, body: bytes) -> bytes:
    return VPD_HEADER.pack(0x00, page, len(body)) + body


def _vpd_pages(unit: LogicalUnit, max_unmap_blocks: int, max_descriptors: int) -> dict[int, bytes]:
    t10 = unit.vendor + unit.serial
    identification = (
        DESIGNATOR_HEADER.pack(0x02, 0x01, len(t10))  # ASCII, LU, T10 vendor id
        + t10
        + DESIGNATOR_HEADER.pack(0x01, 0x02, len(unit.eui64))  # binary, LU, EUI-64
        + unit.eui64
    )
    trim = unit.device.supports_trim
    limits = BLOCK_LIMITS.pack(
        0,  # WSNZ
        0,  # maximum compare and write length
        0,  # optimal transfer length granularity: not reported
        0,  # maximum transfer length: no limit
        0,  # optimal transfer length
        0,  # maximum prefetch length
        min(max_unmap_blocks, 0xFFFFFFFF) if trim else 0,
        max_descriptors if trim else 0,
        1 if trim else 0,  # optimal unmap granularity
        0,  # unmap granularity alignment not valid
        0,  # maximum write same length
    )
    characteristics = struct.pack(">HBB", 0x0001, 0, 0).ljust(0x3C, b"\0")  # non-rotating
    pages = {
        VPD_UNIT_SERIAL_NUMBER: _vpd(VPD_UNIT_SERIAL_NUMBER, unit.serial),
        VPD_DEVICE_IDENTIFICATION: _vpd(VPD_DEVICE_IDENTIFICATION, identification),
        VPD_BLOCK_LIMITS: _vpd(VPD_BLOCK_LIMITS, limits),
        VPD_BLOCK_DEVICE_CHARACTERISTICS: _vpd(VPD_BLOCK_DEVICE_CHARACTERISTICS, characteristics),
    }
    if trim:
        # LBPU: UNMAP supported; provisioning type 2: thin.
        pages[VPD_LOGICAL_BLOCK_PROVISIONING] = _vpd(
            VPD_LOGICAL_BLOCK_PROVISIONING, bytes([0, 0x80, 0x02, 0])
        )
    supported = bytes(sorted([VPD_SUPPORTED_PAGES, *pages]))
    pages[VPD_SUPPORTED_PAGES] = _vpd(VPD_SUPPORTED_PAGES, supported)
    return pages


def _caching_page(unit: LogicalUnit) -> bytes:
    page = bytearray(20)
    page[0], page[1] = PAGE_CACHING, len(page) - 2
    if unit.device.write_cache_enabled:
        page[2] |= _CACHING_WCE
    return bytes(page)


def _control_page(unit: LogicalUnit) -> bytes:
    page = bytearray(12)
    page[0], page[1] = PAGE_CONTROL, len(page) - 2
    page[2] = 0x02  # GLTSD: no log parameters are saved
    return bytes(page)


def _mode_pages(unit: LogicalUnit, page: int, changeable: bool) -> bytes:
    pages = []
    for code, build in ((PAGE_CACHING, _caching_page), (PAGE_CONTROL, _control_page)):
        if page in (code, PAGE_ALL):
            data = build(unit)
            if changeable:  # nothing can be changed: an all-zero mask
                data = data[:2] + bytes(len(data) - 2)
            pages.append(data)
    return b"".join(pages)


def _mode_sense(unit: LogicalUnit, cdb: bytes) -> bytes:
    ten = cdb[0] == MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pages = _mode_pages(unit, cdb[2] & 0x3F, changeable=cdb[2] >> 6 == 1)
    specific = (_MODE_WP if unit.write_protected else 0) | _MODE_DPOFUA
    descriptor = b""
    if not dbd:
        if llbaa:
            descriptor = LONG_BLOCK_DESCRIPTOR.pack(unit.block_count, unit.block_size)
        else:
            descriptor = SHORT_BLOCK_DESCRIPTOR.pack(
                min(unit.block_count, 0xFFFFFFFF), unit.block_size.to_bytes(3, "big")
            )
    if ten:
        body_len = MODE_HEADER_10.size + len(descriptor) + len(pages)
        header = MODE_HEADER_10.pack(
            body_len - 2, 0, specific, _LONGLBA if llbaa and descriptor else 0, len(descriptor)
        )
    else:
        body_len = MODE_HEADER_6.size + len(descriptor) + len(pages)
        header = MODE_HEADER_6.pack(min(body_len - 1, 0xFF), 0, specific, len(descriptor))
    return header + descriptor + pages


def _mode_select(unit: LogicalUnit, ten: bool, data: bytes) -> CheckCondition | None:
    """Accept pages equal to the current ones (nothing here is changeable)."""
    if not data:
        return None
    header = MODE_HEADER_10 if ten else MODE_HEADER_6
    if len(data) < header.size:
        return S.PARAMETER_LIST_LENGTH_ERROR
    if ten:
        _, _, _, longlba, bd_len = MODE_HEADER_10.unpack_from(data)
    else:
        _, _, _, bd_len = MODE_HEADER_6.unpack_from(data)
        longlba = 0
    pos = header.size
    if len(data) < pos + bd_len:
        return S.PARAMETER_LIST_LENGTH_ERROR
    descriptor = LONG_BLOCK_DESCRIPTOR if longlba & _LONGLBA else SHORT_BLOCK_DESCRIPTOR
    if bd_len not in (0, descriptor.size):
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    if bd_len:
        if descriptor is LONG_BLOCK_DESCRIPTOR:
            block_length = LONG_BLOCK_DESCRIPTOR.unpack_from(data, pos)[1]
        else:
            block_length = int.from_bytes(SHORT_BLOCK_DESCRIPTOR.unpack_from(data, pos)[1], "big")
        if block_length not in (0, unit.block_size):
            return S.INVALID_FIELD_IN_PARAMETER_LIST
        pos += bd_len
    current = {PAGE_CACHING: _caching_page(unit), PAGE_CONTROL: _control_page(unit)}
    while pos < len(data):
        if len(data) < pos + 2:
            return S.PARAMETER_LIST_LENGTH_ERROR
        code, spf = data[pos] & 0x3F, data[pos] & 0x40
        page_len = data[pos + 1] + 2
        if len(data) < pos + page_len:
            return S.PARAMETER_LIST_LENGTH_ERROR
        page = bytearray(data[pos : pos + page_len])
        page[0] &= 0x7F  # PS is reserved in MODE SELECT
        if spf or code not in current or bytes(page) != current[code]:
            return S.INVALID_FIELD_IN_PARAMETER_LIST
        pos += page_len
    return None


def _unmap(
    unit: LogicalUnit, data: bytes, max_blocks: int, max_descriptors: int
) -> CheckCondition | None:
    if not data:
        return None
    if len(data) < UNMAP_HEADER.size:
        return S.PARAMETER_LIST_LENGTH_ERROR
    _, descriptors_len = UNMAP_HEADER.unpack_from(data)
    # An incomplete last descriptor is ignored (SBC-3 5.28.2).
    count = min(descriptors_len, len(data) - UNMAP_HEADER.size) // UNMAP_DESCRIPTOR.size
    if count > max_descriptors:
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    ranges = [
        UNMAP_DESCRIPTOR.unpack_from(data, UNMAP_HEADER.size + i * UNMAP_DESCRIPTOR.size)
        for i in range(count)
    ]
    total = 0
    for lba, blocks in ranges:
        if lba + blocks > unit.block_count:
            return S.LBA_OUT_OF_RANGE
        total += blocks
    if total > max_blocks:
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    bs = unit.block_size
    for lba, blocks in ranges:
        if blocks:
            try:
                unit.device.trim(lba * bs, blocks * bs)
            except (BlockDeviceError, OSError) as e:
                return unit.sense_for(e, reading=False)
    return None


def _report_luns(count: int) -> bytes:
    entries = b"".join(
        # peripheral device addressing for LUNs < 256, flat space addressing beyond
        (lun.to_bytes(2, "big") if lun < 256 else (0x4000 | lun).to_bytes(2, "big")) + bytes(6)
        for lun in range(count)
    )
    return REPORT_LUNS_HEADER.pack(len(entries)) + entries


# -- the target -----------------------------------------------------------------------------


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
                unit.device.flush()
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
            return _WriteBlocks(slot, unit, offset, length, parsed.fua)
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
