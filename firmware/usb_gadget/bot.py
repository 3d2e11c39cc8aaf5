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

from firmware.scsi import ScsiTarget

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


class BotUsageError(Exception):
    """The shell called the machine out of turn (a bug in the shell, never host input)."""


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
        raise NotImplementedError

    @property
    def state(self) -> BotState:
        raise NotImplementedError

    def start(self) -> list[Action]:
        """Begin (or resume after bus_reset): returns [ReceiveCBW()]."""
        raise NotImplementedError

    def bulk_out_received(self, data: bytes | memoryview) -> list[Action]:
        """The single transfer asked for by the last ReceiveCBW/ReceiveData arrived."""
        raise NotImplementedError

    def bulk_in_complete(self) -> list[Action]:
        """The last SendData/SendCSW was handed over to bulk-in."""
        raise NotImplementedError

    def control_request(
        self, bmRequestType: int, bRequest: int, wValue: int, wIndex: int, wLength: int
    ) -> list[Action]:
        """A class request on ep0; returns [ControlReply] or [ControlStall], plus the
        bulk actions a Bulk-Only Mass Storage Reset implies."""
        raise NotImplementedError

    def clear_halt(self, endpoint: Endpoint) -> list[Action]:
        """The host cleared a halt; before reset recovery the halt is re-applied."""
        raise NotImplementedError

    def bus_reset(self) -> list[Action]:
        """USB reset, disable or re-enable: drop the command in flight, tell the
        target (UNIT ATTENTION 29/00), go back to waiting for a CBW."""
        raise NotImplementedError
