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
from collections.abc import Sequence
from dataclasses import dataclass

from firmware.blockdev import BlockDevice
from firmware.scsi.sense import CheckCondition


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


class Command:
    """One command in flight on one logical unit.

    `direction` and `length` are final when the command is returned by
    `ScsiTarget.start`: `length` is the exact number of bytes the device intends to
    transfer (0 with direction NONE, which is also the case for a command that
    already failed, e.g. an invalid CDB).
    """

    direction: DataDirection
    length: int

    @property
    def failed(self) -> bool:
        """True once the command has a CHECK CONDITION (further data is discarded)."""
        raise NotImplementedError

    def read(self, max_length: int) -> bytes | memoryview:
        """Next piece of data-in, at most `max_length` bytes; empty when all of
        `length` has been returned or the command failed part-way (e.g. a medium
        error).  The transport treats a premature empty piece as a short transfer."""
        raise NotImplementedError

    def write(self, data: bytes | memoryview) -> None:
        """Consume the next piece of data-out (any size; the total never exceeds
        `length`).  After a failure further data is discarded."""
        raise NotImplementedError

    def finish(self) -> CommandResult:
        """End the command: run whatever waits for all data-out (MODE SELECT, UNMAP)
        or has no data phase, record sense for REQUEST SENSE, return status."""
        raise NotImplementedError


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
        raise NotImplementedError

    @property
    def device(self) -> BlockDevice:
        raise NotImplementedError

    @property
    def write_protected(self) -> bool:
        raise NotImplementedError


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
        raise NotImplementedError

    @property
    def max_lun(self) -> int:
        raise NotImplementedError

    @property
    def units(self) -> Sequence[LogicalUnit]:
        raise NotImplementedError

    def parse(self, lun: int, cdb: bytes | memoryview) -> ParsedCommand | CheckCondition:
        """Decode a CDB (length, opcode, fields, LBA range) without side effects."""
        raise NotImplementedError

    def start(self, lun: int, cdb: bytes | memoryview) -> Command:
        """Begin a command: LUN check, unit attention, readiness, CDB checks.  Never
        raises for any input; a failed command has direction NONE and length 0."""
        raise NotImplementedError

    def execute(
        self, lun: int, cdb: bytes | memoryview, data_out: bytes | memoryview | None = None
    ) -> CommandResult:
        """Run a whole command.  `data_out` is given to a data-out command (missing
        bytes are a short transfer); data-in is returned in the result."""
        raise NotImplementedError

    def reset(self) -> None:
        """A reset occurred (USB bus reset, configuration change): every LU gets
        UNIT ATTENTION 29/00 and loses stored sense."""
        raise NotImplementedError
