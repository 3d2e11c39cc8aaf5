"""Commands in flight: the data phase of each kind of command, in pieces of the
transport's choice, and the status and sense it ends with."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from firmware.blockdev import BlockDeviceError, FrontEnd, HostCommand, pwrite_for
from firmware.scsi import sense as S
from firmware.scsi.cdb import DataDirection
from firmware.scsi.sense import CheckCondition
from firmware.scsi.unit import LogicalUnit, _SenseSlot


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


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
    """WRITE: each arriving piece goes to pwrite as soon as it holds whole blocks.

    With FUA, the piece that completes the command carries the barrier: the host's
    declaration covers the whole command, not the pieces before its last."""

    def __init__(
        self, slot: _SenseSlot, unit: LogicalUnit, offset: int, length: int, fua: bool,
        opcode: int = 0,
    ) -> None:
        super().__init__(slot, DataDirection.OUT, length)
        self._unit = unit
        self._fua = fua
        self._end = offset + length
        self._barrier = HostCommand(FrontEnd.SCSI, opcode, True) if fua else None
        self._aligner = _BlockAligner(unit.block_size, offset)

    def _consume(self, data: bytes | memoryview) -> None:
        for offset, piece in self._aligner.feed(data):
            last = offset + len(piece) == self._end
            try:
                pwrite_for(self._unit.device, offset, piece, self._fua,
                           self._barrier if last else None)
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
