"""Unit tests of the sans-IO NBD server core (firmware.nbd.protocol)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.nbd import protocol as p
from firmware.nbd.protocol import (
    Disconnect,
    ExportInfo,
    FlushRequest,
    HandshakeComplete,
    InvalidRequest,
    LocalProtocolError,
    NbdServerConnection,
    ProtocolViolation,
    ReadRequest,
    State,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
    build_info_request,
    build_option,
    build_request,
)

SIZE = 1 << 20
NAME = "mirrorunit"
GOOD_FLAGS = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES


def export(**kw: object) -> ExportInfo:
    args: dict[str, object] = {"name": NAME, "size": SIZE}
    args.update(kw)
    return ExportInfo(**args)  # type: ignore[arg-type]


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a stream of fixed-newstyle option replies; asserts it parses exactly."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = p.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == p.NBD_OPTION_REPLY_MAGIC
        pos += p.OPTION_REPLY_HEADER.size
        out.append((option, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def connect(exp: ExportInfo | None = None, client_flags: int = GOOD_FLAGS) -> NbdServerConnection:
    conn = NbdServerConnection(exp or export())
    conn.data_to_send()
    assert conn.receive_data(struct.pack(">I", client_flags)) == []
    return conn


def transmission(
    exp: ExportInfo | None = None, negotiate_block_size: bool = True
) -> NbdServerConnection:
    conn = connect(exp)
    infos = (p.NBD_INFO_BLOCK_SIZE,) if negotiate_block_size else ()
    events = conn.receive_data(build_info_request(p.NBD_OPT_GO, NAME, infos))
    assert len(events) == 1 and isinstance(events[0], HandshakeComplete)
    conn.data_to_send()
    return conn


# --- handshake ---------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = NbdServerConnection(export())
    greeting = conn.data_to_send()
    assert greeting == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 0b11)
    assert conn.data_to_send() == b""
    assert conn.state is State.AWAIT_CLIENT_FLAGS


@pytest.mark.parametrize(
    ("client_flags", "accepted"),
    [
        (0, True),
        (p.NBD_FLAG_C_FIXED_NEWSTYLE, True),
        (p.NBD_FLAG_C_NO_ZEROES, True),
        (GOOD_FLAGS, True),
        (1 << 2, False),
        (GOOD_FLAGS | 1 << 31, False),
        (0xFFFFFFFF, False),
    ],
)
def test_client_flags(client_flags: int, accepted: bool) -> None:
    conn = NbdServerConnection(export())
    events = conn.receive_data(struct.pack(">I", client_flags))
    if accepted:
        assert events == [] and conn.state is State.AWAIT_OPTION
    else:
        assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
        assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("client_flags", "name", "zero_pad"),
    [
        (GOOD_FLAGS, NAME, False),
        (p.NBD_FLAG_C_FIXED_NEWSTYLE, NAME, True),
        (0, "", True),
        (GOOD_FLAGS, "", False),
    ],
)
def test_export_name(client_flags: int, name: str, zero_pad: bool) -> None:
    exp = export()
    conn = connect(exp, client_flags)
    events = conn.receive_data(build_option(p.NBD_OPT_EXPORT_NAME, name.encode()))
    assert events == [HandshakeComplete(NAME, exp.transmission_flags, False, not zero_pad)]
    expected = struct.pack(">QH", SIZE, exp.transmission_flags)
    if zero_pad:
        expected += bytes(124)
    assert conn.data_to_send() == expected
    assert conn.in_transmission and not conn.block_size_negotiated


def test_export_name_unknown_closes_without_reply() -> None:
    conn = connect()
    events = conn.receive_data(build_option(p.NBD_OPT_EXPORT_NAME, b"other"))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert conn.data_to_send() == b""
    assert conn.receive_data(build_request(p.NBD_CMD_READ, 1, 0, 512)) == []


@pytest.mark.parametrize("option", [p.NBD_OPT_GO, p.NBD_OPT_INFO])
@pytest.mark.parametrize(
    ("infos", "name"),
    [
        ((), NAME),
        ((p.NBD_INFO_BLOCK_SIZE,), NAME),
        ((p.NBD_INFO_NAME, p.NBD_INFO_BLOCK_SIZE, p.NBD_INFO_DESCRIPTION), ""),
        ((p.NBD_INFO_EXPORT, 0x7777), NAME),
    ],
)
def test_info_and_go(option: int, infos: tuple[int, ...], name: str) -> None:
    exp = export(description="test export")
    conn = connect(exp)
    events = conn.receive_data(build_info_request(option, name, infos))
    replies = option_replies(conn.data_to_send())
    assert all(opt == option for opt, _, _ in replies)
    assert replies[-1][1:] == (p.NBD_REP_ACK, b"")
    infos_sent = {
        struct.unpack(">H", payload[:2])[0]: payload[2:]
        for _, rtype, payload in replies[:-1]
        if rtype == p.NBD_REP_INFO
    }
    assert len(infos_sent) == len(replies) - 1
    assert infos_sent[p.NBD_INFO_EXPORT] == struct.pack(">QH", SIZE, exp.transmission_flags)
    assert infos_sent[p.NBD_INFO_BLOCK_SIZE] == struct.pack(">III", 512, 4096, 1 << 25)
    if p.NBD_INFO_NAME in infos:
        assert infos_sent[p.NBD_INFO_NAME] == NAME.encode()
    if p.NBD_INFO_DESCRIPTION in infos:
        assert infos_sent[p.NBD_INFO_DESCRIPTION] == b"test export"
    assert 0x7777 not in infos_sent
    if option == p.NBD_OPT_GO:
        negotiated = p.NBD_INFO_BLOCK_SIZE in infos
        assert events == [HandshakeComplete(NAME, exp.transmission_flags, negotiated, True)]
        assert conn.in_transmission and conn.block_size_negotiated == negotiated
    else:
        assert events == [] and conn.state is State.AWAIT_OPTION
        # INFO leaves haggling open: the client can still go.
        assert isinstance(
            conn.receive_data(build_info_request(p.NBD_OPT_GO, NAME))[0], HandshakeComplete
        )


@pytest.mark.parametrize("option", [p.NBD_OPT_GO, p.NBD_OPT_INFO])
@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (struct.pack(">I", 5) + b"other" + struct.pack(">H", 0), p.NBD_REP_ERR_UNKNOWN),
        (b"", p.NBD_REP_ERR_INVALID),
        (b"\0\0\0", p.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 100) + b"abc" + struct.pack(">H", 0), p.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 0) + struct.pack(">H", 2) + b"\0\3", p.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 0) + struct.pack(">H", 0) + b"xx", p.NBD_REP_ERR_INVALID),
        (struct.pack(">I", 3) + b"a\0b" + struct.pack(">H", 0), p.NBD_REP_ERR_INVALID),
    ],
)
def test_info_and_go_errors_keep_haggling(option: int, data: bytes, reply: int) -> None:
    conn = connect()
    assert conn.receive_data(build_option(option, data)) == []
    [(opt, rtype, _)] = option_replies(conn.data_to_send())
    assert (opt, rtype) == (option, reply)
    assert conn.state is State.AWAIT_OPTION


def test_list() -> None:
    conn = connect()
    assert conn.receive_data(build_option(p.NBD_OPT_LIST)) == []
    assert option_replies(conn.data_to_send()) == [
        (p.NBD_OPT_LIST, p.NBD_REP_SERVER, struct.pack(">I", len(NAME)) + NAME.encode()),
        (p.NBD_OPT_LIST, p.NBD_REP_ACK, b""),
    ]
    assert conn.receive_data(build_option(p.NBD_OPT_LIST, b"junk")) == []
    [(_, rtype, _)] = option_replies(conn.data_to_send())
    assert rtype == p.NBD_REP_ERR_INVALID


def test_abort_acks_and_disconnects() -> None:
    conn = connect()
    events = conn.receive_data(build_option(p.NBD_OPT_ABORT) + b"trailing garbage")
    assert len(events) == 1 and isinstance(events[0], Disconnect)
    assert option_replies(conn.data_to_send()) == [(p.NBD_OPT_ABORT, p.NBD_REP_ACK, b"")]
    assert conn.receive_data(b"more") == [] and conn.state is State.CLOSED


@pytest.mark.parametrize(
    "option",
    [
        p.NBD_OPT_STRUCTURED_REPLY,
        p.NBD_OPT_STARTTLS,
        p.NBD_OPT_PEEK_EXPORT,
        p.NBD_OPT_LIST_META_CONTEXT,
        p.NBD_OPT_SET_META_CONTEXT,
        p.NBD_OPT_EXTENDED_HEADERS,
        0,
        999,
        0xFFFFFFFF,
    ],
)
def test_unsupported_options_get_err_unsup(option: int) -> None:
    conn = connect()
    assert conn.receive_data(build_option(option, b"some data")) == []
    assert option_replies(conn.data_to_send()) == [(option, p.NBD_REP_ERR_UNSUP, b"")]
    assert conn.state is State.AWAIT_OPTION


def test_option_over_length_limit_is_refused_and_closed() -> None:
    conn = connect()
    header = p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, p.MAX_OPTION_LENGTH + 1)
    events = conn.receive_data(header)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    [(opt, rtype, _)] = option_replies(conn.data_to_send())
    assert (opt, rtype) == (p.NBD_OPT_GO, p.NBD_REP_ERR_TOO_BIG)


def test_option_at_length_limit_is_parsed() -> None:
    conn = connect()
    assert conn.receive_data(build_option(999, bytes(p.MAX_OPTION_LENGTH))) == []
    assert option_replies(conn.data_to_send()) == [(999, p.NBD_REP_ERR_UNSUP, b"")]


def test_bad_option_magic_closes() -> None:
    conn = connect()
    events = conn.receive_data(p.OPTION_HEADER.pack(0x1234, p.NBD_OPT_GO, 0))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert "magic" in events[0].reason


def test_too_many_options_closes() -> None:
    conn = connect()
    events = conn.receive_data(build_option(p.NBD_OPT_LIST) * (p.MAX_OPTIONS + 1))
    assert isinstance(events[-1], ProtocolViolation)
    assert len(option_replies(conn.data_to_send())) == 2 * p.MAX_OPTIONS


@pytest.mark.parametrize(
    ("kw", "present", "absent"),
    [
        (
            {},
            p.NBD_FLAG_HAS_FLAGS
            | p.NBD_FLAG_SEND_FLUSH
            | p.NBD_FLAG_SEND_FUA
            | p.NBD_FLAG_SEND_TRIM
            | p.NBD_FLAG_SEND_WRITE_ZEROES,
            p.NBD_FLAG_READ_ONLY | p.NBD_FLAG_CAN_MULTI_CONN | p.NBD_FLAG_SEND_DF,
        ),
        (
            {"read_only": True},
            p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_READ_ONLY | p.NBD_FLAG_SEND_FLUSH,
            p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_SEND_WRITE_ZEROES | p.NBD_FLAG_CAN_MULTI_CONN,
        ),
        (
            {"can_trim": False},
            p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_WRITE_ZEROES,
            p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_READ_ONLY | p.NBD_FLAG_CAN_MULTI_CONN,
        ),
    ],
)
def test_transmission_flags(kw: dict[str, bool], present: int, absent: int) -> None:
    flags = export(**kw).transmission_flags
    assert flags & present == present
    assert flags & absent == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"min_block_size": 3},
        {"min_block_size": 1 << 17},
        {"preferred_block_size": 256},
        {"max_block_size": (1 << 25) + 512},
        {"name": "a\0b"},
        {"size": -1},
    ],
)
def test_export_info_rejects_unadvertisable_limits(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        export(**kw)


# --- transmission --------------------------------------------------------------

FUA, NO_HOLE = p.NBD_CMD_FLAG_FUA, p.NBD_CMD_FLAG_NO_HOLE
EINVAL, ENOSPC, EPERM = p.NBD_EINVAL, p.NBD_ENOSPC, p.NBD_EPERM
MAX = 1 << 25

# (export kwargs, negotiated, command, flags, offset, length, expected)
# expected: an event for success, or an errno for InvalidRequest.
COMMANDS: list[tuple[dict[str, object], bool, int, int, int, int, object]] = [
    ({}, True, p.NBD_CMD_READ, 0, 0, 512, ReadRequest(7, 0, 512, 0)),
    ({}, True, p.NBD_CMD_READ, FUA, SIZE - 4096, 4096, ReadRequest(7, SIZE - 4096, 4096, FUA)),
    ({}, True, p.NBD_CMD_READ, 0, SIZE - 512, 1024, EINVAL),
    ({}, True, p.NBD_CMD_READ, 0, (1 << 64) - 512, 512, EINVAL),
    ({}, True, p.NBD_CMD_READ, 0, 0, 0, EINVAL),
    ({}, True, p.NBD_CMD_READ, NO_HOLE, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_READ, p.NBD_CMD_FLAG_DF, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_READ, 0, 1, 512, EINVAL),
    ({}, True, p.NBD_CMD_READ, 0, 0, 513, EINVAL),
    ({}, False, p.NBD_CMD_READ, 0, 1, 513, ReadRequest(7, 1, 513, 0)),
    ({"size": 1 << 26}, True, p.NBD_CMD_READ, 0, 0, MAX + 512, EINVAL),
    ({"size": 1 << 26}, True, p.NBD_CMD_READ, 0, 0, MAX, ReadRequest(7, 0, MAX, 0)),
    ({}, True, p.NBD_CMD_FLUSH, 0, 0, 0, FlushRequest(7)),
    ({}, True, p.NBD_CMD_FLUSH, FUA, 0, 0, FlushRequest(7)),
    ({}, True, p.NBD_CMD_FLUSH, 0, 512, 0, EINVAL),
    ({}, True, p.NBD_CMD_FLUSH, 0, 0, 512, EINVAL),
    ({"read_only": True}, True, p.NBD_CMD_FLUSH, 0, 0, 0, FlushRequest(7)),
    ({}, True, p.NBD_CMD_TRIM, 0, 4096, 8192, TrimRequest(7, 4096, 8192, False)),
    ({}, True, p.NBD_CMD_TRIM, FUA, 0, SIZE, TrimRequest(7, 0, SIZE, True)),
    ({}, True, p.NBD_CMD_TRIM, 0, SIZE, 512, EINVAL),
    ({}, True, p.NBD_CMD_TRIM, NO_HOLE, 0, 512, EINVAL),
    ({"read_only": True}, True, p.NBD_CMD_TRIM, 0, 0, 512, EPERM),
    ({"can_trim": False}, True, p.NBD_CMD_TRIM, 0, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_WRITE_ZEROES, 0, 0, 512, WriteZeroesRequest(7, 0, 512, False, False)),
    (
        {},
        True,
        p.NBD_CMD_WRITE_ZEROES,
        FUA | NO_HOLE,
        512,
        SIZE - 512,
        WriteZeroesRequest(7, 512, SIZE - 512, True, True),
    ),
    ({}, True, p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_FLAG_FAST_ZERO, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_WRITE_ZEROES, 0, SIZE - 512, 1024, ENOSPC),
    ({"read_only": True}, True, p.NBD_CMD_WRITE_ZEROES, 0, 0, 512, EPERM),
    ({}, True, p.NBD_CMD_CACHE, 0, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_BLOCK_STATUS, 0, 0, 512, EINVAL),
    ({}, True, p.NBD_CMD_RESIZE, 0, 0, 512, EINVAL),
    ({}, True, 0x7FFF, 0, 0, 0, EINVAL),
]


@pytest.mark.parametrize(
    ("kw", "negotiated", "command", "flags", "offset", "length", "expected"), COMMANDS
)
def test_commands_without_payload(
    kw: dict[str, object],
    negotiated: bool,
    command: int,
    flags: int,
    offset: int,
    length: int,
    expected: object,
) -> None:
    conn = transmission(export(**kw), negotiated)
    events = conn.receive_data(build_request(command, 7, offset, length, flags))
    if isinstance(expected, int):
        assert len(events) == 1 and isinstance(events[0], InvalidRequest)
        assert (events[0].handle, events[0].command, events[0].error) == (7, command, expected)
        assert conn.reply_error(7, expected) == struct.pack(
            ">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, expected, 7
        )
    else:
        assert events == [expected]
    assert conn.state is State.AWAIT_REQUEST


# (export kwargs, negotiated, flags, offset, length, expected errno or None for success)
WRITES: list[tuple[dict[str, object], bool, int, int, int, int | None]] = [
    ({}, True, 0, 0, 512, None),
    ({}, True, FUA, SIZE - 1024, 1024, None),
    ({}, False, 0, 3, 1000, None),
    ({}, True, 0, 3, 1000, EINVAL),
    ({}, True, 0, SIZE - 512, 1024, ENOSPC),
    ({}, True, 0, SIZE, 512, ENOSPC),
    ({}, True, 0, 0, 0, EINVAL),
    ({}, True, NO_HOLE, 0, 512, EINVAL),
    ({"read_only": True}, True, 0, 0, 512, EPERM),
    ({"read_only": True}, True, FUA, SIZE, 512, EPERM),
    ({"size": 1 << 26}, True, 0, 0, MAX + 512, EINVAL),
]


@pytest.mark.parametrize(("kw", "negotiated", "flags", "offset", "length", "error"), WRITES)
def test_write_payload_is_consumed_whether_accepted_or_refused(
    kw: dict[str, object],
    negotiated: bool,
    flags: int,
    offset: int,
    length: int,
    error: int | None,
) -> None:
    conn = transmission(export(**kw), negotiated)
    payload = bytes((i * 7) & 0xFF for i in range(length))
    follow_up = build_request(p.NBD_CMD_FLUSH, 8)
    events = conn.receive_data(build_request(p.NBD_CMD_WRITE, 7, offset, length, flags))
    events += conn.receive_data(payload + follow_up)
    assert events[-1] == FlushRequest(8), "the stream must stay in sync after the payload"
    [event] = events[:-1]
    if error is None:
        assert event == WriteRequest(7, offset, memoryview(payload), bool(flags & FUA))
        assert conn.reply_ok(7) == struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, 0, 7)
    else:
        assert isinstance(event, InvalidRequest) and event.error == error
        assert event.handle == 7 and event.command == p.NBD_CMD_WRITE


def test_payload_buffer_receives_in_place() -> None:
    conn = transmission()
    header = build_request(p.NBD_CMD_WRITE, 1, 4096, 8192, FUA)
    # Header plus the first bytes of payload arrive in one segment.
    assert conn.receive_data(header + b"\xaa" * 100) == []
    sink = conn.payload_buffer()
    assert sink is not None and len(sink) == 8192 - 100
    sink[:1000] = b"\xbb" * 1000
    assert conn.payload_received(1000) == []
    sink = conn.payload_buffer()
    assert sink is not None and len(sink) == 8192 - 1100
    sink[:] = b"\xcc" * len(sink)
    [event] = conn.payload_received(len(sink))
    assert isinstance(event, WriteRequest) and event.fua and event.offset == 4096
    assert bytes(event.data) == b"\xaa" * 100 + b"\xbb" * 1000 + b"\xcc" * (8192 - 1100)
    assert conn.payload_buffer() is None


def test_refused_payload_is_drained_through_payload_buffer() -> None:
    conn = transmission(export(read_only=True))
    assert conn.receive_data(build_request(p.NBD_CMD_WRITE, 1, 0, 200 * 1024)) == []
    events: list[object] = []
    while (sink := conn.payload_buffer()) is not None:
        assert 0 < len(sink) <= 64 * 1024
        events += conn.payload_received(len(sink))
    assert events == [InvalidRequest(1, p.NBD_CMD_WRITE, EPERM, "WRITE on a read-only export")]


def test_payload_received_without_payload_is_a_local_error() -> None:
    conn = transmission()
    with pytest.raises(LocalProtocolError):
        conn.payload_received(5)


def test_disc_disconnects_and_ignores_the_rest() -> None:
    conn = transmission()
    events = conn.receive_data(
        build_request(p.NBD_CMD_READ, 1, 0, 512)
        + build_request(p.NBD_CMD_DISC, 2)
        + build_request(p.NBD_CMD_READ, 3, 0, 512)
    )
    assert events == [ReadRequest(1, 0, 512, 0), Disconnect("client sent NBD_CMD_DISC")]
    assert conn.receive_data(b"x") == []


@pytest.mark.parametrize(
    "magic",
    [0, p.NBD_SIMPLE_REPLY_MAGIC, 0x668E33EF, 0x21E41C71, p.NBD_REQUEST_MAGIC ^ 1],
)
def test_bad_request_magic_closes(magic: int) -> None:
    conn = transmission()
    raw = p.REQUEST_HEADER.pack(magic, 0, p.NBD_CMD_READ, 1, 0, 512)
    [event] = conn.receive_data(build_request(p.NBD_CMD_FLUSH, 1) + raw)[1:]
    assert isinstance(event, ProtocolViolation) and f"{magic:#010x}" in event.reason
    assert conn.state is State.CLOSED
    assert conn.receive_data(build_request(p.NBD_CMD_FLUSH, 2)) == []


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"", Disconnect),
        (build_request(p.NBD_CMD_READ, 1, 0, 512)[:27], ProtocolViolation),
        (build_request(p.NBD_CMD_WRITE, 1, 0, 512) + bytes(511), ProtocolViolation),
        (build_request(p.NBD_CMD_WRITE, 1, 0, 5 * 1024), ProtocolViolation),
    ],
)
def test_eof(stream: bytes, expected: type) -> None:
    conn = transmission(negotiate_block_size=False)
    if stream:
        assert conn.receive_data(stream) == []
    [event] = conn.receive_data(b"")
    assert isinstance(event, expected)
    assert conn.state is State.CLOSED


def test_eof_mid_option() -> None:
    conn = connect()
    conn.receive_data(build_option(p.NBD_OPT_LIST, b"abc")[:-1])
    [event] = conn.receive_data(b"")
    assert isinstance(event, ProtocolViolation)


# --- replies -------------------------------------------------------------------


def test_read_reply_layout_and_bookkeeping() -> None:
    conn = transmission()
    conn.receive_data(build_request(p.NBD_CMD_READ, 0xDEADBEEF01, 0, 1024))
    assert conn.pending_replies == 1
    with pytest.raises(LocalProtocolError):
        conn.reply_read(0xDEADBEEF01, bytes(512))  # wrong length
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(0xDEADBEEF01)  # a read needs data
    header, data = conn.reply_read(0xDEADBEEF01, b"\x5a" * 1024)
    assert header == struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, 0, 0xDEADBEEF01)
    assert bytes(data) == b"\x5a" * 1024
    assert conn.pending_replies == 0
    with pytest.raises(LocalProtocolError):
        conn.reply_error(0xDEADBEEF01, EINVAL)  # already answered


def test_reply_to_unknown_handle_and_zero_errno_are_local_errors() -> None:
    conn = transmission()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)
    conn.receive_data(build_request(p.NBD_CMD_FLUSH, 1))
    with pytest.raises(LocalProtocolError):
        conn.reply_error(1, 0)
    assert conn.reply_error(1, p.NBD_EIO)[4:8] == struct.pack(">I", p.NBD_EIO)


def test_duplicate_handles_are_answered_in_order() -> None:
    conn = transmission()
    conn.receive_data(build_request(p.NBD_CMD_READ, 5, 0, 512) + build_request(p.NBD_CMD_FLUSH, 5))
    assert len(conn.reply_read(5, bytes(512))) == 2
    assert conn.reply_ok(5)[:4] == struct.pack(">I", p.NBD_SIMPLE_REPLY_MAGIC)
    assert conn.pending_replies == 0


# --- properties ------------------------------------------------------------------


def _request_strategy() -> st.SearchStrategy[bytes]:
    def write(args: tuple[int, int, int, int]) -> bytes:
        handle, offset, length, flags = args
        payload = bytes([handle & 0xFF]) * length
        return build_request(p.NBD_CMD_WRITE, handle, offset, length, flags) + payload

    offsets = st.sampled_from([0, 1, 511, 512, 4096, SIZE - 512, SIZE, 1 << 40])
    lengths = st.sampled_from([0, 1, 512, 1000, 4096])
    handles = st.integers(0, (1 << 64) - 1)
    flags = st.sampled_from([0, FUA, NO_HOLE, FUA | NO_HOLE, 0x20])
    plain = st.builds(
        build_request,
        st.sampled_from(
            [p.NBD_CMD_READ, p.NBD_CMD_FLUSH, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES, 5, 77]
        ),
        handles,
        offsets,
        lengths,
        flags,
    )
    return st.one_of(plain, st.tuples(handles, offsets, lengths, flags).map(write))


def _option_strategy() -> st.SearchStrategy[bytes]:
    infos = st.lists(st.sampled_from([0, 1, 2, 3, 9]), max_size=4).map(tuple)
    return st.one_of(
        st.builds(
            build_info_request, st.just(p.NBD_OPT_INFO), st.sampled_from([NAME, "", "x"]), infos
        ),
        st.builds(build_option, st.sampled_from([p.NBD_OPT_LIST, p.NBD_OPT_STRUCTURED_REPLY, 42])),
        st.builds(build_option, st.just(p.NBD_OPT_LIST), st.binary(max_size=8)),
    )


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    stream = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 4])))
    stream += b"".join(draw(st.lists(_option_strategy(), max_size=4)))
    stream += draw(
        st.sampled_from(
            [
                build_info_request(p.NBD_OPT_GO, NAME, (p.NBD_INFO_BLOCK_SIZE,)),
                build_info_request(p.NBD_OPT_GO, NAME),
                build_option(p.NBD_OPT_EXPORT_NAME, NAME.encode()),
            ]
        )
    )
    stream += b"".join(draw(st.lists(_request_strategy(), max_size=8)))
    tail = draw(
        st.sampled_from([b"", build_request(p.NBD_CMD_DISC, 0), b"\0" * 28, b"\x25\x60\x95"])
    )
    return stream + tail + draw(st.binary(max_size=40))


def _run(chunks: list[bytes]) -> tuple[list[object], bytes]:
    conn = NbdServerConnection(export())
    events: list[object] = []
    out = conn.data_to_send()
    for chunk in chunks:
        events += conn.receive_data(chunk)
        out += conn.data_to_send()
    events += conn.receive_data(b"")
    return events, out


@settings(max_examples=200, deadline=None)
@given(client_streams(), st.data())
def test_whole_vs_byte_at_a_time_vs_random_chunks(stream: bytes, data: st.DataObject) -> None:
    whole = _run([stream])
    assert _run([bytes([b]) for b in stream]) == whole
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _run([piece for piece in pieces if piece]) == whole
    # Whatever happened, the stream ends in exactly one terminal event.
    terminal = [e for e in whole[0] if isinstance(e, Disconnect | ProtocolViolation)]
    assert len(terminal) == 1 and whole[0][-1] is terminal[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_never_raise(garbage: bytes, after_handshake: bool) -> None:
    conn = transmission() if after_handshake else NbdServerConnection(export())
    events = conn.receive_data(garbage) + conn.receive_data(b"")
    assert conn.state is State.CLOSED
    for event in events:
        if isinstance(event, InvalidRequest):
            conn.reply_error(event.handle, event.error)
        elif isinstance(event, ReadRequest):
            conn.reply_read(event.handle, bytes(event.length))
        elif isinstance(event, WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest):
            conn.reply_ok(event.handle)
    assert conn.pending_replies == 0
