"""Sans-IO core of the server side of the NBD protocol (fixed newstyle).

The connection object is a pure state machine in the manner of h11: it is fed
the bytes a client sent (``receive_data``) and returns protocol events; it
queues handshake replies for ``data_to_send`` and builds transmission replies
through the ``reply_*`` methods.  It never touches a socket or a device, so the
I/O shell decides how bytes travel and how requests are executed.

Everything a client can get wrong is reported as an event, never raised: a
request the protocol can answer becomes ``InvalidRequest`` carrying the NBD
errno to reply with; a stream the protocol cannot resynchronise on (bad magic,
unknown client flags, an oversized option) becomes ``ProtocolViolation`` and the
connection is closed.  Exceptions (``LocalProtocolError``) are reserved for
misuse by the server code itself.

Write payloads can be received without an intermediate copy: while a payload
is outstanding ``payload_buffer()`` exposes the unfilled part of the buffer the
``WriteRequest`` will carry, the shell ``recv_into``s it and reports the count
with ``payload_received``.

A shell that bounds the memory its clients can pin builds the connection with
``metered_payloads=True``: a write's buffer is then allocated only when the
shell calls ``grant_payload()``, after ``payload_wanted`` told it the length, so
a header announcing 32 MiB costs nothing until the shell has the budget for it.

Constants and layouts follow the NBD protocol document (doc/proto.md of the
NetworkBlockDevice/nbd project).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware.errors import MirrorUnitError

# --- magics ------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", also the INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPTION_REPLY_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

# --- handshake flags (server) and client flags ----------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# --- transmission flags ------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# --- options -----------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# --- option reply types --------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# --- NBD_REP_INFO types ----------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands and command flags ------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

COMMAND_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
    NBD_CMD_RESIZE: "RESIZE",
}

# --- error values (the protocol's own, not the host's errno) -----------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- limits --------------------------------------------------------------------
#: Largest READ/WRITE payload; the spec says anything below 2**25 must be served.
MAX_REQUEST_SIZE = 1 << 25
#: Largest option payload accepted: a 4096-byte name plus a generous info list.
MAX_OPTION_LENGTH = 16 * 1024
#: Options per handshake before the client is considered hostile.
MAX_OPTIONS = 64
MAX_STRING_LENGTH = 4096
ZERO_PAD = bytes(124)

# --- wire layouts (big-endian, sizes asserted) -------------------------------
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
assert SERVER_GREETING.size == 18
CLIENT_FLAGS = struct.Struct(">I")
assert CLIENT_FLAGS.size == 4
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
assert OPTION_HEADER.size == 16
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
assert OPTION_REPLY_HEADER.size == 20
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zeroes)
assert EXPORT_NAME_REPLY.size == 10
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
assert INFO_EXPORT.size == 12
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
assert INFO_BLOCK_SIZE.size == 14
INFO_TYPE = struct.Struct(">H")
assert INFO_TYPE.size == 2
U32 = struct.Struct(">I")
assert U32.size == 4
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
assert REQUEST_HEADER.size == 28
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
assert SIMPLE_REPLY.size == 16

#: Scratch space for payloads that are being discarded; never read back.
_DISCARD_CHUNK = 64 * 1024


class NbdError(MirrorUnitError):
    """Base of errors raised by the NBD package."""


class LocalProtocolError(NbdError):
    """The server code used the connection wrongly (e.g. replied twice)."""


# --- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Option haggling ended with an export chosen; requests follow."""

    export_name: str
    transmission_flags: int
    #: The client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO, so it promised to
    #: honour the advertised minimum block size.
    block_size_negotiated: bool
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class ReadRequest:
    handle: int
    offset: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    handle: int
    offset: int
    data: memoryview = field(repr=False)
    fua: bool


@dataclass(frozen=True, slots=True)
class FlushRequest:
    handle: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    handle: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    handle: int
    offset: int
    length: int
    fua: bool
    no_hole: bool


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A well-framed request the protocol refuses; answer with ``reply_error``."""

    handle: int
    command: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the connection (NBD_CMD_DISC, NBD_OPT_ABORT or EOF)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The stream cannot continue; send ``data_to_send()`` and close."""

    reason: str


Event = (
    HandshakeComplete
    | ReadRequest
    | WriteRequest
    | FlushRequest
    | TrimRequest
    | WriteZeroesRequest
    | InvalidRequest
    | Disconnect
    | ProtocolViolation
)
Request = ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server offers; built by the shell from a BlockDevice."""

    name: str
    size: int
    read_only: bool = False
    can_trim: bool = True
    min_block_size: int = 512
    preferred_block_size: int = 4096
    max_block_size: int = MAX_REQUEST_SIZE
    description: str = ""

    def __post_init__(self) -> None:
        # Fail at construction rather than advertise limits a client must reject.
        def power_of_two(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        if not power_of_two(self.min_block_size) or self.min_block_size > 65536:
            raise ValueError(f"minimum block size {self.min_block_size} is not a power of 2")
        if not power_of_two(self.preferred_block_size) or self.preferred_block_size < max(
            self.min_block_size, 512
        ):
            raise ValueError(f"preferred block size {self.preferred_block_size} is invalid")
        if self.max_block_size % self.min_block_size or self.max_block_size > MAX_REQUEST_SIZE:
            raise ValueError(f"maximum block size {self.max_block_size} is invalid")
        if self.size < 0 or self.size >= 1 << 63:
            raise ValueError(f"export size {self.size} is out of range")
        if len(self.name.encode()) > MAX_STRING_LENGTH or "\0" in self.name:
            raise ValueError("export name is too long or contains NUL")

    @property
    def transmission_flags(self) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
        if self.read_only:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_WRITE_ZEROES
            if self.can_trim:
                flags |= NBD_FLAG_SEND_TRIM
        # NBD_FLAG_CAN_MULTI_CONN stays off: a flush on one connection does not
        # promise anything about writes still being executed by another one.
        return flags


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    AWAIT_OPTION = "await-option"
    AWAIT_OPTION_DATA = "await-option-data"
    AWAIT_REQUEST = "await-request"
    RECEIVING_PAYLOAD = "receiving-payload"
    DISCARDING_PAYLOAD = "discarding-payload"
    CLOSED = "closed"


@dataclass(slots=True)
class _PendingWrite:
    handle: int
    offset: int
    flags: int
    length: int
    #: None until granted (metered connections only).
    buffer: bytearray | None
    filled: int = 0


@dataclass(slots=True)
class _Discard:
    handle: int
    command: int
    error: int
    reason: str
    remaining: int


class NbdServerConnection:
    """Server side of one NBD connection, from greeting to disconnect."""

    def __init__(self, export: ExportInfo, *, metered_payloads: bool = False) -> None:
        self.export = export
        self.metered_payloads = metered_payloads
        self.state = State.AWAIT_CLIENT_FLAGS
        self.client_flags = 0
        self.block_size_negotiated = False
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._option: tuple[int, int] = (0, 0)  # option, length while awaiting its data
        self._options_seen = 0
        self._write: _PendingWrite | None = None
        self._discard: _Discard | None = None
        self._discard_scratch: bytearray | None = None
        self._pending: dict[int, deque[tuple[int, int]]] = {}
        self._outbuf += SERVER_GREETING.pack(
            NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        )

    # --- input ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the client; empty input means the client closed."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        if not data:
            self._on_eof(events)
            return events
        self._inbuf += data
        self._run(events)
        return events

    def payload_buffer(self) -> memoryview | None:
        """Where the next bytes of an outstanding write payload may be received.

        Only offered while no other input is buffered, so bytes received into
        it are, in order, the very next bytes of the stream.
        """
        if self._inbuf:
            return None
        if self.state is State.RECEIVING_PAYLOAD:
            assert self._write is not None
            if self._write.buffer is None:
                return None
            return memoryview(self._write.buffer)[self._write.filled :]
        if self.state is State.DISCARDING_PAYLOAD:
            assert self._discard is not None
            if self._discard_scratch is None:
                self._discard_scratch = bytearray(_DISCARD_CHUNK)
            return memoryview(self._discard_scratch)[: min(self._discard.remaining, _DISCARD_CHUNK)]
        return None

    def payload_received(self, nbytes: int) -> list[Event]:
        """Account ``nbytes`` written into the view ``payload_buffer`` returned."""
        events: list[Event] = []
        if nbytes == 0:
            return self.receive_data(b"")
        if self.state is State.RECEIVING_PAYLOAD and self._write is not None:
            if self._write.buffer is None or nbytes > self._write.length - self._write.filled:
                raise LocalProtocolError("more payload reported than was offered")
            self._write.filled += nbytes
        elif self.state is State.DISCARDING_PAYLOAD and self._discard is not None:
            if nbytes > self._discard.remaining:
                raise LocalProtocolError("more payload reported than was offered")
            self._discard.remaining -= nbytes
        else:
            raise LocalProtocolError("no payload outstanding")
        self._run(events)
        return events

    @property
    def payload_wanted(self) -> int:
        """Length of the write payload whose buffer awaits ``grant_payload()``
        (metered connections; 0 when none does)."""
        write = self._write
        if self.state is State.RECEIVING_PAYLOAD and write is not None and write.buffer is None:
            return write.length
        return 0

    @property
    def buffered_input(self) -> int:
        """Bytes received but not yet consumed (they wait for a grant)."""
        return len(self._inbuf)

    def grant_payload(self) -> list[Event]:
        """Allocate the buffer of the write ``payload_wanted`` announced and go on
        with any input already received."""
        write = self._write
        if not self.payload_wanted or write is None:
            raise LocalProtocolError("no write payload awaits a grant")
        write.buffer = bytearray(write.length)
        events: list[Event] = []
        self._run(events)
        return events

    def data_to_send(self) -> bytes:
        """Handshake bytes queued for the client (the greeting first of all)."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    @property
    def in_transmission(self) -> bool:
        return self.state in (
            State.AWAIT_REQUEST,
            State.RECEIVING_PAYLOAD,
            State.DISCARDING_PAYLOAD,
        )

    # --- replies ---------------------------------------------------------------

    def reply_ok(self, handle: int) -> bytes:
        queue = self._pending.get(handle)
        if queue and queue[0][0] == NBD_CMD_READ:
            raise LocalProtocolError("a successful READ reply needs its data")
        self._take_pending(handle)
        return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read(self, handle: int, data: bytes | memoryview) -> list[bytes | memoryview]:
        """Reply header and data as separate buffers, ready for ``sendmsg``."""
        queue = self._pending.get(handle)
        if not queue:
            raise LocalProtocolError(f"no request pending with handle {handle:#x}")
        cmd, length = queue[0]
        if cmd != NBD_CMD_READ or len(data) != length:
            raise LocalProtocolError(
                f"read reply of {len(data)} bytes for a {COMMAND_NAMES.get(cmd)} of {length}"
            )
        self._take_pending(handle)
        return [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle), data]

    def reply_error(self, handle: int, error: int) -> bytes:
        if not 0 < error < 1 << 32:
            raise LocalProtocolError(f"error reply needs a nonzero errno, got {error}")
        self._take_pending(handle)
        return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)

    @property
    def pending_replies(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def _take_pending(self, handle: int) -> tuple[int, int]:
        queue = self._pending.get(handle)
        if not queue:
            raise LocalProtocolError(f"no request pending with handle {handle:#x}")
        entry = queue.popleft()
        if not queue:
            del self._pending[handle]
        return entry

    def _expect_reply(self, handle: int, command: int, length: int) -> None:
        self._pending.setdefault(handle, deque()).append((command, length))

    # --- the machine -------------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        while self.state is not State.CLOSED and _HANDLERS[self.state](self, events):
            pass

    def _on_eof(self, events: list[Event]) -> None:
        mid_message = bool(self._inbuf) or self.state in (
            State.AWAIT_OPTION_DATA,
            State.RECEIVING_PAYLOAD,
            State.DISCARDING_PAYLOAD,
        )
        if mid_message:
            self._fail(events, f"connection closed mid-message in state {self.state.value}")
        else:
            self.state = State.CLOSED
            events.append(Disconnect("connection closed by client"))

    def _fail(self, events: list[Event], reason: str) -> None:
        self.state = State.CLOSED
        self._inbuf.clear()
        self._write = None
        self._discard = None
        events.append(ProtocolViolation(reason))

    def _take(self, n: int) -> bytes | None:
        if len(self._inbuf) < n:
            return None
        chunk = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return chunk

    # handshake -------------------------------------------------------------------

    def _parse_client_flags(self, events: list[Event]) -> bool:
        raw = self._take(CLIENT_FLAGS.size)
        if raw is None:
            return False
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~KNOWN_CLIENT_FLAGS:
            # The spec obliges the server to drop a client that sets unknown flags.
            self._fail(events, f"unknown client flags {flags:#010x}")
            return False
        self.client_flags = flags
        self.state = State.AWAIT_OPTION
        return True

    def _parse_option_header(self, events: list[Event]) -> bool:
        raw = self._take(OPTION_HEADER.size)
        if raw is None:
            return False
        magic, option, length = OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            self._fail(events, f"bad option magic {magic:#018x}")
            return False
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            self._fail(events, f"more than {MAX_OPTIONS} options during handshake")
            return False
        if length > MAX_OPTION_LENGTH:
            # Skipping gigabytes of option data would be a denial of service;
            # tell the client why, then drop it (the spec allows a hard disconnect).
            if option != NBD_OPT_EXPORT_NAME:
                self._option_reply(option, NBD_REP_ERR_TOO_BIG, b"option data too long")
            self._fail(events, f"option {option} with {length} bytes of data over the limit")
            return False
        self._option = (option, length)
        self.state = State.AWAIT_OPTION_DATA
        return True

    def _parse_option_data(self, events: list[Event]) -> bool:
        option, length = self._option
        data = self._take(length)
        if data is None:
            return False
        self.state = State.AWAIT_OPTION
        self._handle_option(events, option, data)
        return self.state is not State.CLOSED

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._outbuf += OPTION_REPLY_HEADER.pack(
            NBD_OPTION_REPLY_MAGIC, option, reply, len(payload)
        )
        self._outbuf += payload

    def _export_matches(self, name: bytes) -> bool:
        # The empty name selects the default export, which is the only one.
        return name == b"" or name == self.export.name.encode()

    def _handle_option(self, events: list[Event], option: int, data: bytes) -> None:
        if option == NBD_OPT_EXPORT_NAME:
            if not self._export_matches(data):
                # This option cannot carry an error; the spec mandates a disconnect.
                self._fail(events, f"client asked for unknown export {data[:64]!r}")
                return
            self._outbuf += EXPORT_NAME_REPLY.pack(self.export.size, self.export.transmission_flags)
            if not self.client_flags & NBD_FLAG_C_NO_ZEROES:
                self._outbuf += ZERO_PAD
            self._enter_transmission(events, block_size_negotiated=False)
        elif option == NBD_OPT_ABORT:
            self._option_reply(option, NBD_REP_ACK)
            self.state = State.CLOSED
            events.append(Disconnect("client aborted the handshake"))
        elif option == NBD_OPT_LIST:
            if data:
                self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            name = self.export.name.encode()
            self._option_reply(option, NBD_REP_SERVER, U32.pack(len(name)) + name)
            self._option_reply(option, NBD_REP_ACK)
        elif option in (NBD_OPT_INFO, NBD_OPT_GO):
            self._handle_info(events, option, data)
        else:
            # STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers and
            # anything unknown: this server speaks plain simple replies only.
            self._option_reply(option, NBD_REP_ERR_UNSUP)

    def _handle_info(self, events: list[Event], option: int, data: bytes) -> None:
        invalid = NBD_REP_ERR_INVALID
        if len(data) < U32.size + INFO_TYPE.size:
            self._option_reply(option, invalid, b"option data too short")
            return
        (name_len,) = U32.unpack_from(data, 0)
        if name_len > len(data) - U32.size - INFO_TYPE.size:
            self._option_reply(option, invalid, b"export name length exceeds option data")
            return
        name = data[U32.size : U32.size + name_len]
        (count,) = INFO_TYPE.unpack_from(data, U32.size + name_len)
        requests_at = U32.size + name_len + INFO_TYPE.size
        if len(data) != requests_at + count * INFO_TYPE.size:
            self._option_reply(option, invalid, b"information request count mismatch")
            return
        if b"\0" in name or len(name) > MAX_STRING_LENGTH:
            self._option_reply(option, invalid, b"malformed export name")
            return
        if not self._export_matches(name):
            self._option_reply(option, NBD_REP_ERR_UNKNOWN, b"no such export")
            return
        requested = {
            INFO_TYPE.unpack_from(data, requests_at + i * INFO_TYPE.size)[0] for i in range(count)
        }
        exp = self.export
        # NBD_INFO_EXPORT is always sent; block sizes too, since a client that
        # does not ask still benefits from knowing them.
        self._option_reply(
            option,
            NBD_REP_INFO,
            INFO_EXPORT.pack(NBD_INFO_EXPORT, exp.size, exp.transmission_flags),
        )
        if NBD_INFO_NAME in requested:
            self._option_reply(
                option, NBD_REP_INFO, INFO_TYPE.pack(NBD_INFO_NAME) + exp.name.encode()
            )
        if NBD_INFO_DESCRIPTION in requested and exp.description:
            self._option_reply(
                option,
                NBD_REP_INFO,
                INFO_TYPE.pack(NBD_INFO_DESCRIPTION) + exp.description.encode(),
            )
        self._option_reply(
            option,
            NBD_REP_INFO,
            INFO_BLOCK_SIZE.pack(
                NBD_INFO_BLOCK_SIZE,
                exp.min_block_size,
                exp.preferred_block_size,
                exp.max_block_size,
            ),
        )
        self._option_reply(option, NBD_REP_ACK)
        if option == NBD_OPT_GO:
            self._enter_transmission(events, block_size_negotiated=NBD_INFO_BLOCK_SIZE in requested)

    def _enter_transmission(self, events: list[Event], block_size_negotiated: bool) -> None:
        self.block_size_negotiated = block_size_negotiated
        self.state = State.AWAIT_REQUEST
        events.append(
            HandshakeComplete(
                export_name=self.export.name,
                transmission_flags=self.export.transmission_flags,
                block_size_negotiated=block_size_negotiated,
                no_zeroes=bool(self.client_flags & NBD_FLAG_C_NO_ZEROES),
            )
        )

    # transmission ------------------------------------------------------------------

    def _parse_request(self, events: list[Event]) -> bool:
        raw = self._take(REQUEST_HEADER.size)
        if raw is None:
            return False
        magic, flags, command, handle, offset, length = REQUEST_HEADER.unpack(raw)
        if magic != NBD_REQUEST_MAGIC:
            self._fail(events, f"bad request magic {magic:#010x}")
            return False
        if command == NBD_CMD_DISC:
            # No reply; the client must not send anything afterwards.
            self.state = State.CLOSED
            self._inbuf.clear()
            events.append(Disconnect("client sent NBD_CMD_DISC"))
            return False
        self._expect_reply(handle, command, length if command == NBD_CMD_READ else 0)
        refusal = self._check_request(command, flags, offset, length)
        if command == NBD_CMD_WRITE:
            if refusal is not None:
                error, reason = refusal
                self._discard = _Discard(handle, command, error, reason, length)
                self.state = State.DISCARDING_PAYLOAD
            else:
                buffer = None if self.metered_payloads else bytearray(length)
                self._write = _PendingWrite(handle, offset, flags, length, buffer)
                self.state = State.RECEIVING_PAYLOAD
            return True
        if refusal is not None:
            error, reason = refusal
            events.append(InvalidRequest(handle, command, error, reason))
        elif command == NBD_CMD_READ:
            events.append(ReadRequest(handle, offset, length, flags))
        elif command == NBD_CMD_FLUSH:
            events.append(FlushRequest(handle))
        elif command == NBD_CMD_TRIM:
            events.append(TrimRequest(handle, offset, length, bool(flags & NBD_CMD_FLAG_FUA)))
        else:
            assert command == NBD_CMD_WRITE_ZEROES
            events.append(
                WriteZeroesRequest(
                    handle,
                    offset,
                    length,
                    fua=bool(flags & NBD_CMD_FLAG_FUA),
                    no_hole=bool(flags & NBD_CMD_FLAG_NO_HOLE),
                )
            )
        return True

    def _check_request(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """The errno and reason to refuse a request with, or None to run it."""
        exp = self.export
        name = COMMAND_NAMES.get(command, f"command {command}")
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return NBD_EINVAL, f"unsupported {name}"
        if command in _MUTATING and exp.read_only:
            return NBD_EPERM, f"{name} on a read-only export"
        if command == NBD_CMD_TRIM and not exp.can_trim:
            return NBD_EINVAL, "TRIM was not advertised"
        if flags & ~allowed:
            return NBD_EINVAL, f"{name} with unsupported flags {flags:#06x}"
        if command == NBD_CMD_FLUSH:
            if offset or length:
                return NBD_EINVAL, "FLUSH with nonzero offset or length"
            return None
        if length == 0:
            return NBD_EINVAL, f"zero-length {name}"
        if offset + length > exp.size:
            # The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
            error = NBD_ENOSPC if command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
            return error, f"{name} {offset}+{length} beyond the export size {exp.size}"
        if command in (NBD_CMD_READ, NBD_CMD_WRITE) and length > exp.max_block_size:
            return NBD_EINVAL, f"{name} of {length} bytes over the {exp.max_block_size} limit"
        if self.block_size_negotiated and (offset | length) % exp.min_block_size:
            return NBD_EINVAL, (
                f"{name} {offset}+{length} not aligned to the negotiated "
                f"{exp.min_block_size}-byte minimum block size"
            )
        return None

    def _fill_payload(self, events: list[Event]) -> bool:
        write = self._write
        assert write is not None
        if write.buffer is None:
            return False  # metered: waits for grant_payload()
        need = write.length - write.filled
        if need and self._inbuf:
            n = min(need, len(self._inbuf))
            write.buffer[write.filled : write.filled + n] = self._inbuf[:n]
            del self._inbuf[:n]
            write.filled += n
            need -= n
        if need:
            return False
        self._write = None
        self.state = State.AWAIT_REQUEST
        events.append(
            WriteRequest(
                write.handle,
                write.offset,
                memoryview(write.buffer),
                fua=bool(write.flags & NBD_CMD_FLAG_FUA),
            )
        )
        return True

    def _drain_discard(self, events: list[Event]) -> bool:
        discard = self._discard
        assert discard is not None
        if discard.remaining and self._inbuf:
            n = min(discard.remaining, len(self._inbuf))
            del self._inbuf[:n]
            discard.remaining -= n
        if discard.remaining:
            return False
        self._discard = None
        self.state = State.AWAIT_REQUEST
        events.append(
            InvalidRequest(discard.handle, discard.command, discard.error, discard.reason)
        )
        return True


# A class-level table, not bound methods on the instance: those would make every
# connection a reference cycle, so a dropped one (and a write buffer it holds)
# would wait for the cyclic collector instead of being freed at once.
_HANDLERS: dict[State, Callable[[NbdServerConnection, list[Event]], bool]] = {
    State.AWAIT_CLIENT_FLAGS: NbdServerConnection._parse_client_flags,
    State.AWAIT_OPTION: NbdServerConnection._parse_option_header,
    State.AWAIT_OPTION_DATA: NbdServerConnection._parse_option_data,
    State.AWAIT_REQUEST: NbdServerConnection._parse_request,
    State.RECEIVING_PAYLOAD: NbdServerConnection._fill_payload,
    State.DISCARDING_PAYLOAD: NbdServerConnection._drain_discard,
}

_MUTATING = frozenset({NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES})
# FUA is valid on every command once SEND_FUA is advertised (the spec says the
# server must accept it, even by ignoring it).
_ALLOWED_FLAGS: dict[int, int] = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
}


# --- client-side builders (tests, probes) ----------------------------------------


def build_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def build_info_request(option: int, name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    body = U32.pack(len(raw)) + raw + INFO_TYPE.pack(len(infos))
    body += b"".join(INFO_TYPE.pack(i) for i in infos)
    return build_option(option, body)


def build_request(
    command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    return REQUEST_HEADER.pack(NBD_REQUEST_MAGIC, flags, command, handle, offset, length)
