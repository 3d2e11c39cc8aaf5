"""USB Mass Storage Class Bulk-Only Transport (BOT, rev 1.0), sans-IO.

`BulkOnlyTransport` is a pure state machine in the style of h11: the I/O shell (the
FunctionFS endpoint loop) tells it what happened on the endpoints and performs the
actions it returns, in order.  It drives a `ScsiTarget` for the commands themselves.

Contract with the shell:

* `start()` returns the first actions (``[ReceiveCBW()]``).
* Every `ReceiveCBW` / `ReceiveData(n)` means: post ONE read on bulk-out (for a CBW a
  read of at least the max packet size, so an over-long CBW shows up as one) and hand
  the bytes of that single transfer to `bulk_out_received()`.  Fewer bytes than asked
  for means the host ended the transfer with a short packet.
* Every `SendData` / `SendCSW` means: write these bytes on bulk-in and call
  `bulk_in_complete()` once the buffer is handed over (after queueing it is enough:
  the payload is immutable, so the shell may pipeline).
* `StallIn` / `StallOut` halt that endpoint.  Actions listed after a stall (the CSW)
  are written anyway: the UDC holds them until the host clears the halt.
* A `Receive*`, `SendData` or `SendCSW` is always the last action of a list; the next
  list comes from the call that reports its completion.
* `control_request()` handles the class requests on ep0 (Bulk-Only Mass Storage
  Reset, Get Max LUN); `clear_halt()` reports CLEAR_FEATURE(ENDPOINT_HALT) when the
  shell sees it; `bus_reset()` a USB reset/disable/re-enable of the function.

Behaviour follows the thirteen cases of BOT section 6.7 the way Linux's
f_mass_storage behaves: data-in shorter than the host expects is sent short and the
bulk-in pipe stalled (or padded with zeroes when stalling is not allowed); surplus
data-out is received and thrown away rather than stalling bulk-out (a stall there
races the host's ACKs); a disagreement in direction or a host length shorter than
the device's is a phase error (bCSWStatus 2), and such a command is not executed
(except for Hi < Di, where the first dCBWDataTransferLength bytes are sent).
An invalid CBW stalls both bulk endpoints until a Bulk-Only Mass Storage Reset.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from firmware.errors import MirrorUnitError
from firmware.scsi import Command, DataDirection, ScsiTarget

# -- wire formats (BOT 5.1, 5.2) -------------------------------------------------------

#: dCBWSignature, dCBWTag, dCBWDataTransferLength, bmCBWFlags, bCBWLUN,
#: bCBWCBLength, CBWCB[16]
CBW = struct.Struct("<IIIBBB16s")
assert CBW.size == 31
CBW_SIZE = CBW.size
CBW_SIGNATURE = 0x43425355  # 'USBC'
CBW_FLAG_DATA_IN = 0x80

#: dCSWSignature, dCSWTag, dCSWDataResidue, bCSWStatus
CSW = struct.Struct("<IIIB")
assert CSW.size == 13
CSW_SIZE = CSW.size
CSW_SIGNATURE = 0x53425355  # 'USBS'


class CswStatus(enum.IntEnum):
    COMMAND_PASSED = 0x00
    COMMAND_FAILED = 0x01
    PHASE_ERROR = 0x02


# -- class-specific requests (BOT 3.1, 3.2) -------------------------------------------

BULK_ONLY_MASS_STORAGE_RESET = 0xFF
GET_MAX_LUN = 0xFE
#: bmRequestType: class, interface, host-to-device / device-to-host
REQUEST_TYPE_CLASS_INTERFACE_OUT = 0x21
REQUEST_TYPE_CLASS_INTERFACE_IN = 0xA1

#: default data phase piece: large enough that per-piece Python overhead vanishes
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class CommandBlockWrapper:
    dCBWSignature: int
    dCBWTag: int
    dCBWDataTransferLength: int
    bmCBWFlags: int
    bCBWLUN: int
    bCBWCBLength: int
    CBWCB: bytes

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> CommandBlockWrapper:
        """Decode exactly CBW_SIZE bytes (checking validity is the caller's job)."""
        return cls(*CBW.unpack(data))

    def pack(self) -> bytes:
        return CBW.pack(
            self.dCBWSignature,
            self.dCBWTag,
            self.dCBWDataTransferLength,
            self.bmCBWFlags,
            self.bCBWLUN,
            self.bCBWCBLength,
            self.CBWCB,
        )

    @property
    def cdb(self) -> bytes:
        return self.CBWCB[: self.bCBWCBLength]

    @property
    def data_in(self) -> bool:
        return bool(self.bmCBWFlags & CBW_FLAG_DATA_IN)


@dataclass(frozen=True)
class CommandStatusWrapper:
    dCSWSignature: int
    dCSWTag: int
    dCSWDataResidue: int
    bCSWStatus: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> CommandStatusWrapper:
        return cls(*CSW.unpack(data))

    def pack(self) -> bytes:
        return CSW.pack(self.dCSWSignature, self.dCSWTag, self.dCSWDataResidue, self.bCSWStatus)


def make_cbw(
    tag: int,
    length: int,
    data_in: bool,
    cdb: bytes,
    lun: int = 0,
) -> bytes:
    """A valid CBW (for tests and host-side tools)."""
    return CBW.pack(
        CBW_SIGNATURE,
        tag,
        length,
        CBW_FLAG_DATA_IN if data_in else 0,
        lun,
        len(cdb),
        cdb.ljust(16, b"\0"),
    )


# -- actions for the shell --------------------------------------------------------------


class Endpoint(enum.Enum):
    BULK_IN = "bulk-in"
    BULK_OUT = "bulk-out"


@dataclass(frozen=True)
class ReceiveCBW:
    """Post a read on bulk-out for the next CBW (buffer >= max packet size)."""

    length: int = CBW_SIZE


@dataclass(frozen=True)
class ReceiveData:
    """Post a read of exactly `length` bytes of data-out on bulk-out."""

    length: int


@dataclass(frozen=True)
class SendData:
    """Write data-in on bulk-in."""

    data: bytes | memoryview


@dataclass(frozen=True)
class StallIn:
    pass


@dataclass(frozen=True)
class StallOut:
    pass


@dataclass(frozen=True)
class SendCSW:
    """Write the 13-byte CSW on bulk-in; `csw` is the decoded form for logging."""

    data: bytes
    csw: CommandStatusWrapper


@dataclass(frozen=True)
class CancelTransfers:
    """Drop any transfer still queued on the bulk endpoints (after a reset)."""


@dataclass(frozen=True)
class ControlReply:
    """Complete the control request on ep0 with this data stage (empty: status only)."""

    data: bytes


@dataclass(frozen=True)
class ControlStall:
    """Stall ep0: the request is not supported or malformed."""


Action = (
    ReceiveCBW
    | ReceiveData
    | SendData
    | StallIn
    | StallOut
    | SendCSW
    | CancelTransfers
    | ControlReply
    | ControlStall
)


class BotState(enum.Enum):
    #: no actions issued yet (before start() / after bus_reset() until start())
    IDLE = "idle"
    EXPECT_CBW = "expect-cbw"
    DATA_IN = "data-in"
    DATA_OUT = "data-out"
    #: CSW handed to the shell, waiting for bulk_in_complete()
    SEND_CSW = "send-csw"
    #: after an invalid CBW: bulk endpoints stalled until Bulk-Only Mass Storage Reset
    NEEDS_RESET = "needs-reset"


class BotUsageError(MirrorUnitError):
    """The shell called the machine out of turn (a bug in the shell, never host input)."""


@dataclass
class _Transaction:
    """Bookkeeping of the command between its CBW and its CSW."""

    cbw: CommandBlockWrapper
    host_direction: DataDirection
    host_length: int
    #: None when the command is not executed (phase error on a direction/length clash)
    command: Command | None
    phase_error: bool = False
    #: bytes of real data the data phase moves between host and command
    to_transfer: int = 0
    #: bytes moved on the bus so far (data, padding and discarded data-out)
    moved: int = 0
    #: bytes the command produced or consumed (what the residue is measured against)
    processed: int = 0
    #: data-in only: zero padding still to send (when stalling is not allowed)
    padding: int = 0
    stall_in: bool = False
    #: data-out only: size of the read posted last
    requested: int = 0


class BulkOnlyTransport:
    """Bulk-Only Transport state machine for one interface."""

    def __init__(
        self,
        target: ScsiTarget,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        can_stall: bool = True,
        interface_number: int = 0,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._target = target
        self._chunk = chunk_size
        self._can_stall = can_stall
        self._interface = interface_number
        self._state = BotState.IDLE
        self._tx: _Transaction | None = None
        self._zeros = memoryview(bytes(min(chunk_size, DEFAULT_CHUNK_SIZE)))

    @property
    def state(self) -> BotState:
        return self._state

    @property
    def target(self) -> ScsiTarget:
        return self._target

    def start(self) -> list[Action]:
        """Begin (or resume after bus_reset): returns [ReceiveCBW()]."""
        if self._state is not BotState.IDLE:
            raise BotUsageError(f"start() in state {self._state.value}")
        return self._expect_cbw()

    def _expect_cbw(self) -> list[Action]:
        self._state = BotState.EXPECT_CBW
        self._tx = None
        return [ReceiveCBW()]

    # -- bulk-out -----------------------------------------------------------------------

    def bulk_out_received(self, data: bytes | memoryview) -> list[Action]:
        """The single transfer asked for by the last ReceiveCBW/ReceiveData arrived."""
        if self._state is BotState.EXPECT_CBW:
            return self._cbw_received(data)
        if self._state is BotState.DATA_OUT:
            return self._data_out_received(data)
        raise BotUsageError(f"bulk-out data in state {self._state.value}")

    def _cbw_received(self, data: bytes | memoryview) -> list[Action]:
        if len(data) != CBW_SIZE:
            return self._invalid_cbw()
        cbw = CommandBlockWrapper.unpack(data)
        if cbw.dCBWSignature != CBW_SIGNATURE:
            return self._invalid_cbw()
        # Not meaningful (BOT 6.2.2): reserved bits, unknown LUN, impossible CB length.
        if (
            cbw.bmCBWFlags & ~CBW_FLAG_DATA_IN
            or cbw.bCBWLUN > self._target.max_lun
            or not 1 <= cbw.bCBWCBLength <= 16
        ):
            return self._invalid_cbw()

        host_length = cbw.dCBWDataTransferLength
        if host_length == 0:
            host_direction = DataDirection.NONE
        elif cbw.data_in:
            host_direction = DataDirection.IN
        else:
            host_direction = DataDirection.OUT
        command = self._target.start(cbw.bCBWLUN, cbw.cdb)
        device_direction, device_length = command.direction, command.length
        tx = _Transaction(cbw, host_direction, host_length, command)
        self._tx = tx

        if device_direction is not DataDirection.NONE and (
            host_direction is not device_direction
            or (device_direction is DataDirection.OUT and host_length < device_length)
        ):
            # Cases 2, 3, 8, 10, 13: the command is not run; the host's data phase
            # still happens (nothing / stall / drained) and a phase error follows.
            tx.command = None
            tx.phase_error = True
        elif device_direction is DataDirection.IN and host_length < device_length:
            tx.phase_error = True  # case 7: send what fits, then phase error

        if host_direction is DataDirection.NONE:
            return self._send_csw()  # cases 1, 2, 3
        if host_direction is DataDirection.IN:
            if tx.command is not None:
                tx.to_transfer = min(host_length, device_length)
            self._state = BotState.DATA_IN
            return self._next_data_in()
        if tx.command is not None:
            tx.to_transfer = min(host_length, device_length)
        self._state = BotState.DATA_OUT
        return self._next_data_out()

    def _invalid_cbw(self) -> list[Action]:
        self._state = BotState.NEEDS_RESET
        self._tx = None
        return [StallIn(), StallOut()]

    def _next_data_out(self) -> list[Action]:
        tx = self._tx
        assert tx is not None
        remaining = tx.host_length - tx.moved
        if remaining <= 0:
            return self._send_csw()
        # Do not let one read straddle the end of the command's data: keeps the
        # command's pieces and the discarded tail apart.
        if tx.moved < tx.to_transfer:
            remaining = tx.to_transfer - tx.moved
        tx.requested = min(self._chunk, remaining)
        return [ReceiveData(tx.requested)]

    def data_out_plan(self) -> list[int]:
        """In DATA_OUT: the lengths of the ReceiveData reads still to come if every
        one arrives in full, starting with the one asked for last.  A shell that
        pipelines may post these reads ahead; a short read ends the data phase,
        and reads posted beyond it must then be cancelled (the host sends nothing
        more before the CSW)."""
        tx = self._tx
        if self._state is not BotState.DATA_OUT or tx is None:
            return []
        lengths = [tx.requested]
        moved = tx.moved + tx.requested
        while moved < tx.host_length:
            remaining = tx.host_length - moved
            if moved < tx.to_transfer:
                remaining = tx.to_transfer - moved
            lengths.append(min(self._chunk, remaining))
            moved += lengths[-1]
        return lengths

    def _data_out_received(self, data: bytes | memoryview) -> list[Action]:
        tx = self._tx
        assert tx is not None
        n = len(data)
        if n > tx.requested:
            raise BotUsageError(f"{n} bytes received for a read of {tx.requested}")
        if tx.moved < tx.to_transfer and tx.command is not None and n:
            tx.command.write(data)
            tx.processed += n
        tx.moved += n
        if n < tx.requested:
            # Short packet: the host ended its data phase early.
            if tx.moved < tx.to_transfer:
                tx.phase_error = True
            return self._send_csw()
        return self._next_data_out()

    # -- bulk-in ------------------------------------------------------------------------

    def bulk_in_complete(self) -> list[Action]:
        """The last SendData/SendCSW was handed over to bulk-in."""
        if self._state is BotState.DATA_IN:
            return self._next_data_in()
        if self._state is BotState.SEND_CSW:
            return self._expect_cbw()
        raise BotUsageError(f"bulk-in completion in state {self._state.value}")

    def _next_data_in(self) -> list[Action]:
        tx = self._tx
        assert tx is not None
        if tx.processed < tx.to_transfer and tx.command is not None:
            piece = tx.command.read(min(self._chunk, tx.to_transfer - tx.processed))
            if piece:
                tx.processed += len(piece)
                tx.moved += len(piece)
                return [SendData(piece)]
            tx.to_transfer = tx.processed  # the command ended early (e.g. medium error)
        if tx.moved < tx.host_length:
            # Short data-in: mark its end with a stall, as f_mass_storage does, so a
            # length that happens to be a multiple of the packet size is unambiguous.
            if self._can_stall:
                tx.stall_in = True
            else:
                n = min(len(self._zeros), tx.host_length - tx.moved)
                tx.moved += n
                return [SendData(self._zeros[:n])]
        return self._send_csw()

    # -- status -------------------------------------------------------------------------

    def _send_csw(self) -> list[Action]:
        tx = self._tx
        assert tx is not None
        status = CswStatus.COMMAND_PASSED
        if tx.command is not None:
            result = tx.command.finish()
            if not result.good:
                status = CswStatus.COMMAND_FAILED
        if tx.phase_error:
            status = CswStatus.PHASE_ERROR
        csw = CommandStatusWrapper(
            CSW_SIGNATURE,
            tx.cbw.dCBWTag,
            max(tx.host_length - tx.processed, 0),
            status,
        )
        actions: list[Action] = [StallIn()] if tx.stall_in else []
        actions.append(SendCSW(csw.pack(), csw))
        self._state = BotState.SEND_CSW
        return actions

    # -- ep0 and resets -----------------------------------------------------------------

    def control_request(
        self, bmRequestType: int, bRequest: int, wValue: int, wIndex: int, wLength: int
    ) -> list[Action]:
        """A class request on ep0; returns [ControlReply] or [ControlStall], plus the
        bulk actions a Bulk-Only Mass Storage Reset implies."""
        if wIndex != self._interface or wValue != 0:
            return [ControlStall()]
        if (
            bRequest == GET_MAX_LUN
            and bmRequestType == REQUEST_TYPE_CLASS_INTERFACE_IN
            and wLength == 1
        ):
            return [ControlReply(bytes([self._target.max_lun]))]
        if (
            bRequest == BULK_ONLY_MASS_STORAGE_RESET
            and bmRequestType == REQUEST_TYPE_CLASS_INTERFACE_OUT
            and wLength == 0
        ):
            return [ControlReply(b""), *self._protocol_reset()]
        return [ControlStall()]

    def _protocol_reset(self) -> list[Action]:
        state = self._state
        if state in (BotState.IDLE, BotState.EXPECT_CBW):
            return []  # nothing in flight; the CBW read already posted stays valid
        if state is BotState.NEEDS_RESET:
            return self._expect_cbw()
        return [CancelTransfers(), *self._expect_cbw()]

    def clear_halt(self, endpoint: Endpoint) -> list[Action]:
        """The host cleared a halt; before reset recovery the halt is re-applied."""
        if self._state is BotState.NEEDS_RESET:
            return [StallIn() if endpoint is Endpoint.BULK_IN else StallOut()]
        return []

    def bus_reset(self) -> list[Action]:
        """USB reset, disable or re-enable: drop the command in flight, tell the
        target (UNIT ATTENTION 29/00) and go IDLE; call start() once the endpoints
        are enabled again."""
        self._target.reset()
        self._state = BotState.IDLE
        self._tx = None
        return [CancelTransfers()]
