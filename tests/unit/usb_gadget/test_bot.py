"""Bulk-Only Transport state machine: the thirteen cases, invalid CBWs, resets."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.blockdev import DeviceState
from firmware.scsi import LogicalUnit, ScsiTarget
from firmware.usb_gadget import bot as B
from tests.support.memdev import MemoryDevice

BS = 512


def make_bot(
    luns: int = 1, *, chunk_size: int = 1 << 20, can_stall: bool = True, power_on: bool = False
) -> tuple[B.BulkOnlyTransport, list[MemoryDevice]]:
    devs = [MemoryDevice(4 << 20, trim=False) for _ in range(luns)]
    target = ScsiTarget(
        [LogicalUnit(d, serial=f"B{i}") for i, d in enumerate(devs)],
        power_on_unit_attention=power_on,
    )
    machine = B.BulkOnlyTransport(target, chunk_size=chunk_size, can_stall=can_stall)
    assert machine.start() == [B.ReceiveCBW()]
    return machine, devs


@dataclass
class Exchange:
    """What the host saw for one CBW."""

    data_in: bytes = b""
    data_in_pieces: list[int] = field(default_factory=list)
    out_requests: list[int] = field(default_factory=list)
    out_consumed: int = 0
    stalled_in: bool = False
    stalled_out: bool = False
    csw: B.CommandStatusWrapper | None = None


def run(
    machine: B.BulkOnlyTransport,
    cbw: bytes,
    data_out: bytes = b"",
    short_after: int | None = None,
) -> Exchange:
    """Play the shell: perform actions until the next CBW read (or a dead end).

    `short_after`: the host stops sending data-out after this many bytes (its last
    transfer ends with a short packet)."""
    ex = Exchange()
    actions = machine.bulk_out_received(cbw)
    limit = len(data_out) if short_after is None else short_after
    while True:
        for action in actions[:-1]:
            if isinstance(action, B.StallIn):
                ex.stalled_in = True
            elif isinstance(action, B.StallOut):
                ex.stalled_out = True
            else:
                raise AssertionError(f"{action} not last")
        last = actions[-1] if actions else None
        if isinstance(last, B.StallIn | B.StallOut):
            ex.stalled_in |= isinstance(last, B.StallIn) or ex.stalled_in
            ex.stalled_out |= isinstance(last, B.StallOut)
            return ex
        if isinstance(last, B.SendData):
            assert not ex.stalled_in, "data after a stall"
            ex.data_in += bytes(last.data)
            ex.data_in_pieces.append(len(last.data))
            actions = machine.bulk_in_complete()
        elif isinstance(last, B.SendCSW):
            assert len(last.data) == B.CSW_SIZE
            ex.csw = B.CommandStatusWrapper.unpack(last.data)
            assert ex.csw == last.csw
            assert machine.bulk_in_complete() == [B.ReceiveCBW()]
            return ex
        elif isinstance(last, B.ReceiveData):
            ex.out_requests.append(last.length)
            piece = data_out[ex.out_consumed : min(ex.out_consumed + last.length, limit)]
            ex.out_consumed += len(piece)
            actions = machine.bulk_out_received(piece)
        else:
            raise AssertionError(f"unexpected {actions}")


def cbw(tag: int, length: int, data_in: bool, cdb: bytes, lun: int = 0) -> bytes:
    return B.make_cbw(tag, length, data_in, cdb, lun)


TUR = bytes(6)
INQUIRY36 = bytes([0x12, 0, 0, 0, 36, 0])
REQUEST_SENSE = bytes([0x03, 0, 0, 0, 18, 0])


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def test_wire_formats() -> None:
    raw = cbw(0x1234, 4096, True, read10(1, 8), lun=0)
    assert len(raw) == 31 and raw[:4] == b"USBC"
    parsed = B.CommandBlockWrapper.unpack(raw)
    assert (parsed.dCBWTag, parsed.dCBWDataTransferLength, parsed.bmCBWFlags) == (
        0x1234,
        4096,
        0x80,
    )
    assert parsed.cdb == read10(1, 8) and parsed.pack() == raw
    csw = B.CommandStatusWrapper(B.CSW_SIGNATURE, 7, 9, 1).pack()
    assert csw == b"USBS" + struct.pack("<IIB", 7, 9, 1)


# -- the thirteen cases (BOT 6.7) ---------------------------------------------------------


def pattern(n: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(n))


def test_case_1_hn_eq_dn() -> None:
    m, _ = make_bot()
    ex = run(m, cbw(1, 0, False, TUR))
    assert ex.csw == B.CommandStatusWrapper(B.CSW_SIGNATURE, 1, 0, 0)
    assert not ex.stalled_in and not ex.data_in


def test_case_2_hn_lt_di() -> None:
    m, _ = make_bot()
    ex = run(m, cbw(2, 0, True, INQUIRY36))
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert ex.csw.dCSWDataResidue == 0 and not ex.data_in


def test_case_3_hn_lt_do_does_not_write() -> None:
    m, (dev,) = make_bot()
    ex = run(m, cbw(3, 0, False, write10(0, 1)))
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert dev.data[:BS] == bytes(BS)


@pytest.mark.parametrize("can_stall", [True, False])
def test_case_4_hi_gt_dn(can_stall: bool) -> None:
    m, _ = make_bot(can_stall=can_stall)
    ex = run(m, cbw(4, 512, True, TUR))
    assert ex.csw is not None and ex.csw.bCSWStatus == 0 and ex.csw.dCSWDataResidue == 512
    if can_stall:
        assert ex.stalled_in and ex.data_in == b""
    else:
        assert not ex.stalled_in and ex.data_in == bytes(512)


@pytest.mark.parametrize("can_stall", [True, False])
def test_case_5_hi_gt_di(can_stall: bool) -> None:
    m, _ = make_bot(can_stall=can_stall)
    ex = run(m, cbw(5, 64, True, INQUIRY36))
    assert ex.csw is not None and ex.csw.bCSWStatus == 0 and ex.csw.dCSWDataResidue == 28
    assert ex.data_in[:36] == m.target.execute(0, INQUIRY36).data_in
    assert ex.stalled_in is can_stall
    assert len(ex.data_in) == (36 if can_stall else 64)


def test_case_6_hi_eq_di() -> None:
    m, (dev,) = make_bot()
    dev.data[BS : 9 * BS] = pattern(8 * BS)
    ex = run(m, cbw(6, 8 * BS, True, read10(1, 8)))
    assert ex.csw == B.CommandStatusWrapper(B.CSW_SIGNATURE, 6, 0, 0)
    assert ex.data_in == pattern(8 * BS) and not ex.stalled_in


def test_case_7_hi_lt_di() -> None:
    m, (dev,) = make_bot()
    dev.data[: 8 * BS] = pattern(8 * BS)
    ex = run(m, cbw(7, 1024, True, read10(0, 8)))
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert ex.data_in == pattern(1024)


def test_case_8_hi_ne_do() -> None:
    m, (dev,) = make_bot()
    ex = run(m, cbw(8, BS, True, write10(0, 1)))
    assert ex.stalled_in and not ex.data_in
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert ex.csw.dCSWDataResidue == BS and dev.data[:BS] == bytes(BS)


def test_case_9_ho_gt_dn() -> None:
    m, _ = make_bot()
    ex = run(m, cbw(9, 512, False, TUR), b"\1" * 512)
    assert ex.out_consumed == 512 and not ex.stalled_out  # drained, like f_mass_storage
    assert ex.csw is not None and ex.csw.bCSWStatus == 0 and ex.csw.dCSWDataResidue == 512


def test_case_10_ho_ne_di() -> None:
    m, _ = make_bot()
    ex = run(m, cbw(10, BS, False, read10(0, 1)), b"\1" * BS)
    assert ex.out_consumed == BS
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert ex.csw.dCSWDataResidue == BS


def test_case_11_ho_gt_do() -> None:
    m, (dev,) = make_bot()
    ex = run(m, cbw(11, 2 * BS, False, write10(3, 1)), pattern(2 * BS))
    assert ex.out_consumed == 2 * BS
    assert ex.csw is not None and ex.csw.bCSWStatus == 0 and ex.csw.dCSWDataResidue == BS
    assert dev.data[3 * BS : 4 * BS] == pattern(BS) and dev.data[4 * BS : 5 * BS] == bytes(BS)


def test_case_12_ho_eq_do() -> None:
    m, (dev,) = make_bot()
    ex = run(m, cbw(12, 8 * BS, False, write10(2, 8)), pattern(8 * BS))
    assert ex.csw == B.CommandStatusWrapper(B.CSW_SIGNATURE, 12, 0, 0)
    assert dev.data[2 * BS : 10 * BS] == pattern(8 * BS)


def test_case_13_ho_lt_do_writes_nothing() -> None:
    m, (dev,) = make_bot()
    ex = run(m, cbw(13, 2 * BS, False, write10(0, 8)), pattern(2 * BS))
    assert ex.out_consumed == 2 * BS
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert dev.data[: 8 * BS] == bytes(8 * BS)


# -- failures, sense, residues ------------------------------------------------------------


def test_check_condition_then_request_sense() -> None:
    m, _ = make_bot()
    ex = run(m, cbw(20, BS, True, read10(1 << 20, 1)))
    assert ex.stalled_in and ex.csw is not None
    assert ex.csw.bCSWStatus == B.CswStatus.COMMAND_FAILED and ex.csw.dCSWDataResidue == BS
    ex = run(m, cbw(21, 18, True, REQUEST_SENSE))
    assert ex.csw is not None and ex.csw.bCSWStatus == 0
    assert (ex.data_in[2], ex.data_in[12]) == (5, 0x21)


def test_write_to_failing_lun_drains_data() -> None:
    m, (dev,) = make_bot()
    dev.state = DeviceState.STANDBY
    ex = run(m, cbw(22, 4 * BS, False, write10(0, 4)), pattern(4 * BS))
    assert ex.out_consumed == 4 * BS and not ex.stalled_out
    assert ex.csw is not None and ex.csw.bCSWStatus == 1 and ex.csw.dCSWDataResidue == 4 * BS


def test_medium_error_mid_read_ends_data_short() -> None:
    m, (dev,) = make_bot(chunk_size=4 * BS)
    dev.data[: 16 * BS] = pattern(16 * BS)
    dev.fail_read_from = 6 * BS
    ex = run(m, cbw(23, 16 * BS, True, read10(0, 16)))
    assert ex.data_in == pattern(4 * BS) and ex.stalled_in
    assert ex.csw is not None and ex.csw.bCSWStatus == 1
    assert ex.csw.dCSWDataResidue == 12 * BS
    ex = run(m, cbw(24, 18, True, REQUEST_SENSE))
    assert (ex.data_in[2], ex.data_in[12]) == (3, 0x11)


def test_large_transfers_are_chunked() -> None:
    m, (dev,) = make_bot(chunk_size=1 << 20)
    payload = pattern(3 << 20)
    blocks = len(payload) // BS
    ex = run(m, cbw(30, len(payload) + BS, False, write10(0, blocks)), payload + bytes(BS))
    assert ex.out_requests == [1 << 20, 1 << 20, 1 << 20, BS]
    assert ex.csw is not None and ex.csw.bCSWStatus == 0 and ex.csw.dCSWDataResidue == BS
    ex = run(m, cbw(31, len(payload) + BS, True, read10(0, blocks)))
    assert ex.data_in_pieces == [1 << 20] * 3 and ex.data_in == payload
    assert ex.stalled_in and ex.csw is not None and ex.csw.dCSWDataResidue == BS


def test_short_packet_in_data_out_is_a_phase_error() -> None:
    m, (dev,) = make_bot(chunk_size=4 * BS)
    ex = run(m, cbw(32, 16 * BS, False, write10(0, 16)), pattern(16 * BS), short_after=5 * BS)
    assert ex.out_consumed == 5 * BS
    assert ex.csw is not None and ex.csw.bCSWStatus == B.CswStatus.PHASE_ERROR
    assert ex.csw.dCSWDataResidue == 11 * BS


def test_tags_are_echoed() -> None:
    m, _ = make_bot()
    for tag in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        ex = run(m, cbw(tag, 0, False, TUR))
        assert ex.csw is not None and ex.csw.dCSWTag == tag


# -- invalid CBWs and reset recovery -------------------------------------------------------

GOOD_CBW = cbw(40, 0, False, TUR)
INVALID_CBWS = {
    "short": GOOD_CBW[:30],
    "long": GOOD_CBW + b"\0",
    "signature": b"USBX" + GOOD_CBW[4:],
    "lun": cbw(40, 0, False, TUR, lun=1),
    "cb length 0": GOOD_CBW[:14] + b"\x00" + GOOD_CBW[15:],
    "cb length 17": GOOD_CBW[:14] + b"\x11" + GOOD_CBW[15:],
    "reserved flags": GOOD_CBW[:12] + b"\x40" + GOOD_CBW[13:],
    "empty": b"",
}


@pytest.mark.parametrize("raw", INVALID_CBWS.values(), ids=INVALID_CBWS.keys())
def test_invalid_cbw_stalls_until_reset(raw: bytes) -> None:
    m, _ = make_bot()
    assert m.bulk_out_received(raw) == [B.StallIn(), B.StallOut()]
    assert m.state is B.BotState.NEEDS_RESET
    with pytest.raises(B.BotUsageError):
        m.bulk_out_received(GOOD_CBW)
    # Clearing a halt without the class reset does not recover (the endpoint is wedged).
    assert m.clear_halt(B.Endpoint.BULK_IN) == [B.StallIn()]
    assert m.clear_halt(B.Endpoint.BULK_OUT) == [B.StallOut()]
    assert m.control_request(0xA1, B.GET_MAX_LUN, 0, 0, 1) == [B.ControlReply(b"\x00")]
    assert m.control_request(0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 0, 0, 0) == [
        B.ControlReply(b""),
        B.ReceiveCBW(),
    ]
    assert m.state is B.BotState.EXPECT_CBW
    assert m.clear_halt(B.Endpoint.BULK_IN) == []
    ex = run(m, GOOD_CBW)
    assert ex.csw is not None and ex.csw.bCSWStatus == 0


def test_reset_during_data_phase_cancels_and_recovers() -> None:
    m, (dev,) = make_bot(chunk_size=BS)
    actions = m.bulk_out_received(cbw(50, 8 * BS, False, write10(0, 8)))
    assert actions == [B.ReceiveData(BS)]
    m.bulk_out_received(pattern(BS))
    assert m.control_request(0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 0, 0, 0) == [
        B.ControlReply(b""),
        B.CancelTransfers(),
        B.ReceiveCBW(),
    ]
    ex = run(m, cbw(51, 0, False, TUR))
    assert ex.csw is not None and ex.csw.dCSWTag == 51 and ex.csw.bCSWStatus == 0


@pytest.mark.parametrize(
    "request_,expected",
    [
        ((0xA1, B.GET_MAX_LUN, 0, 0, 1), [B.ControlReply(b"\x02")]),
        ((0xA1, B.GET_MAX_LUN, 0, 1, 1), [B.ControlStall()]),
        ((0xA1, B.GET_MAX_LUN, 0, 0, 2), [B.ControlStall()]),
        ((0x21, B.GET_MAX_LUN, 0, 0, 1), [B.ControlStall()]),
        ((0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 1, 0, 0), [B.ControlStall()]),
        ((0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 0, 0, 1), [B.ControlStall()]),
        ((0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 0, 0, 0), [B.ControlReply(b"")]),
        ((0xA1, 0x42, 0, 0, 1), [B.ControlStall()]),
    ],
)
def test_class_requests(request_: tuple[int, int, int, int, int], expected: list[B.Action]) -> None:
    m, _ = make_bot(luns=3)
    assert m.control_request(*request_) == expected


def test_bus_reset_raises_unit_attention() -> None:
    m, _ = make_bot()
    m.bulk_out_received(cbw(60, 8 * BS, True, read10(0, 8)))
    assert m.bus_reset() == [B.CancelTransfers()]
    assert m.state is B.BotState.IDLE
    assert m.start() == [B.ReceiveCBW()]
    ex = run(m, cbw(61, 0, False, TUR))
    assert ex.csw is not None and ex.csw.bCSWStatus == 1
    ex = run(m, cbw(62, 18, True, REQUEST_SENSE))
    assert (ex.data_in[2], ex.data_in[12]) == (6, 0x29)


def test_out_of_turn_calls_are_usage_errors() -> None:
    target = ScsiTarget([LogicalUnit(MemoryDevice(4 << 20, trim=False), serial="x")])
    m = B.BulkOnlyTransport(target)
    with pytest.raises(B.BotUsageError):
        m.bulk_out_received(GOOD_CBW)
    m.start()
    with pytest.raises(B.BotUsageError):
        m.bulk_in_complete()
    with pytest.raises(B.BotUsageError):
        m.start()


# -- properties ---------------------------------------------------------------------------


@st.composite
def cbw_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=40))
    cdb = draw(
        st.one_of(
            st.sampled_from([TUR, INQUIRY36, REQUEST_SENSE, bytes([0x25]) + bytes(9)]),
            st.builds(read10, st.integers(0, 9000), st.integers(0, 12)),
            st.builds(write10, st.integers(0, 9000), st.integers(0, 12)),
            st.binary(min_size=1, max_size=16),
        )
    )
    raw = B.CBW.pack(
        B.CBW_SIGNATURE if draw(st.integers(0, 19)) else draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([0, 1, 13, 36, 512, 1024, 4096, 6144, 8192])),
        draw(st.sampled_from([0x00, 0x80, 0x80, 0x01])),
        draw(st.sampled_from([0, 0, 1, 2, 0x10])),
        draw(st.sampled_from([len(cdb), len(cdb), 0, 16, 17])),
        cdb.ljust(16, b"\0"),
    )
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cbws=st.lists(cbw_bytes(), min_size=1, max_size=6), chunk=st.sampled_from([512, 1 << 20]))
def test_random_cbws_never_raise(cbws: list[bytes], chunk: int) -> None:
    m, _ = make_bot(luns=2, chunk_size=chunk, power_on=True)
    for raw in cbws:
        ex = run(m, raw, data_out=pattern(8192))
        if ex.csw is None:
            assert ex.stalled_in and ex.stalled_out and m.state is B.BotState.NEEDS_RESET
            m.control_request(0x21, B.BULK_ONLY_MASS_STORAGE_RESET, 0, 0, 0)
            continue
        sent = B.CommandBlockWrapper.unpack(raw)
        assert ex.csw.dCSWSignature == B.CSW_SIGNATURE and ex.csw.dCSWTag == sent.dCBWTag
        assert ex.csw.bCSWStatus in (0, 1, 2)
        assert 0 <= ex.csw.dCSWDataResidue <= sent.dCBWDataTransferLength
        if sent.data_in and sent.dCBWDataTransferLength:
            assert len(ex.data_in) + ex.csw.dCSWDataResidue >= sent.dCBWDataTransferLength or (
                ex.csw.bCSWStatus == 2
            )
            assert len(ex.data_in) <= sent.dCBWDataTransferLength
        elif sent.dCBWDataTransferLength:
            assert ex.out_consumed == sent.dCBWDataTransferLength
        assert m.state is B.BotState.EXPECT_CBW
    ex = run(m, cbw(99, 0, False, TUR))
    assert ex.csw is not None and ex.csw.dCSWTag == 99


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    steps = []
    for tag in range(draw(st.integers(1, 8))):
        lba = draw(st.integers(0, 60))
        blocks = draw(st.integers(0, 10))
        slack = draw(st.sampled_from([0, 0, BS, -BS, 100]))
        length = max(blocks * BS + slack, 0)
        if draw(st.booleans()):
            fill = bytes([tag + 1]) * length
            steps.append((cbw(tag, length, False, write10(lba, blocks)), fill))
        else:
            steps.append((cbw(tag, length, True, read10(lba, blocks)), b""))
    return steps


@settings(max_examples=150, deadline=None)
@given(script=scripts())
def test_chunking_does_not_change_results(script: list[tuple[bytes, bytes]]) -> None:
    """Whole data phases and data phases split into small pieces give the same
    CSWs, the same data-in and the same device content."""
    outcomes = []
    for chunk in (BS, 3 * BS, 1 << 20):
        m, (dev,) = make_bot(chunk_size=chunk)
        seen = []
        for raw, data_out in script:
            ex = run(m, raw, data_out)
            seen.append((ex.csw, ex.data_in, ex.stalled_in, ex.out_consumed))
            assert all(piece <= chunk for piece in ex.data_in_pieces + ex.out_requests)
        outcomes.append((seen, bytes(dev.data[: 80 * BS])))
    assert outcomes[0] == outcomes[1] == outcomes[2]


@pytest.mark.parametrize(
    ("host_length", "blocks", "chunk"),
    [
        (8 * BS, 8, 4 * BS),  # case 12, two full pieces
        (9 * BS, 9, 4 * BS),  # last piece shorter than a chunk
        (12 * BS, 5, 4 * BS),  # case 11: the command's data, then the surplus drained
        (2 * BS, 8, 4 * BS),  # case 13: not executed, host data drained
        (3 * BS, 3, 1 << 20),  # one piece
    ],
)
def test_data_out_plan_predicts_every_read(host_length: int, blocks: int, chunk: int) -> None:
    """A pipelining shell posts the plan ahead: it must match, read for read, what
    the machine asks for when every read arrives in full."""
    m, _ = make_bot(chunk_size=chunk)
    assert m.data_out_plan() == []
    actions = m.bulk_out_received(cbw(1, host_length, False, write10(0, blocks)))
    plan = m.data_out_plan()
    asked: list[int] = []
    while isinstance(actions[-1], B.ReceiveData):
        assert m.data_out_plan() == plan[len(asked):]
        asked.append(actions[-1].length)
        actions = m.bulk_out_received(bytes(actions[-1].length))
    assert asked == plan and sum(plan) == host_length
    assert isinstance(actions[-1], B.SendCSW) and m.data_out_plan() == []
