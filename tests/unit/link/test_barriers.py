"""Barriers on the journey link and at the remote: the WRITES codec, the HELLO agreement
(an older peer on either side), the local CBQ source, and the remote's points log."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from firmware.blockdev import FrontEnd
from firmware.cbq import CircularBufferQueue
from firmware.cbq.format import BARRIER_FLUSH, BARRIER_FUA, BARRIER_IN_RESYNC, barrier_flags
from firmware.cbq.queue import MIRROR_CONSUMER, create
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    CODEC_ZSTD,
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    HelloAck,
    WriteRecord,
    Writes,
    barrier_record,
    batch_digest,
    encode_body,
    encode_frame,
)
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    SenderConfig,
    SenderSession,
)
from firmware.local.replication import CbqSource
from firmware.remote.errors import NotRestorable, SeqGap
from firmware.remote.points import POINT, POINTS_NAME
from firmware.remote.server import UnitSink
from firmware.remote.unit import Retention, UnitStore
from firmware.storage import FileStorage
from tests.support.link import shuttle

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

BS = 512
VOLUME = 1 << 20
FLUSH = barrier_flags(BARRIER_FLUSH, FrontEnd.NBD, 3)
FUA = barrier_flags(BARRIER_FUA, FrontEnd.SCSI, 0x2A)


def w(seq: int, lbn: int = 0, fill: int = 1, ts: int | None = None) -> WriteRecord:
    return WriteRecord(seq=seq, lbn=lbn, data=bytes([fill]) * BS, ts=seq if ts is None else ts)


# --------------------------------------------------------------------------- codec


def test_writes_with_barriers_round_trip_and_digest() -> None:
    recs = (barrier_record(3, 9, FLUSH, 4, 30), w(4), w(5), barrier_record(5, 11, FUA, 0, 32),
            barrier_record(5, 12, FLUSH, 1, 32), w(6))
    frame = Writes(1, CODEC_ZSTD, recs)
    assert FrameDecoder().receive_data(encode_frame(frame)) == [frame]
    assert all(r.barrier and not r.is_write for r in recs if not r.data)
    # The digest tells a barrier from a write, and one barrier from another.
    assert batch_digest(recs) != batch_digest(recs[1:])
    assert batch_digest([barrier_record(5, 11, FUA)]) != batch_digest(
        [barrier_record(5, 11, FLUSH)])


def _writes_body(recs: list[list[int]], payload: bytes = b"") -> bytes:
    return encode_body(cbor2.dumps({"type": "WRITES", "batch": 1, "codec": "none",
                                    "recs": recs, "payload": payload}))


@pytest.mark.parametrize("recs,reason", [
    ([[4, 0, 1, 0, 0, 2]], "a barrier must be"),            # unknown record kind
    ([[4, 0, 0x10000, 0, 0, 1]], "a barrier must be"),      # flags wider than 16 bits
    ([[5, 0, 0, 1], [4, 0, 1, 0, 0, 1]], "barrier seq 4 is before 5"),
    ([[4, 0, 1, 0, 0, 1], [4, 0, 0, 1]], "does not follow"),  # a write at the barrier's seq
])
def test_malformed_barriers_are_refused(recs: list[list[int]], reason: str) -> None:
    payload = b"x" * sum(r[3] for r in recs if len(r) == 4)
    with pytest.raises(LinkProtocolError, match=reason):
        FrameDecoder().receive_data(_writes_body(recs, payload))


def test_hello_fields_are_optional() -> None:
    """An older peer sends no `barriers` key, and reads past one it does not know."""
    hello = Hello(VERSIONS, "u", VOLUME, BS, 0, ("none",), False, barriers=True)
    assert FrameDecoder().receive_data(encode_frame(hello)) == [hello]
    old = encode_body(cbor2.dumps({"type": "HELLO_ACK", "version": 1, "compression": "none",
                                   "signature": False, "durable": 0}))
    assert FrameDecoder().receive_data(old) == [HelloAck(1, "none", False, 0)]


# --------------------------------------------------------------------------- sessions


class ListSource:
    def __init__(self, records: list[WriteRecord]) -> None:
        self.records = records
        self.acked = 0

    def next_batch(self, max_bytes: int) -> list[WriteRecord]:
        out, self.records = self.records[:2], self.records[2:]
        return out

    def ack(self, seq: int) -> None:
        self.acked = seq

    def rewind_to(self, seq: int) -> None:
        pass


class ListSink:
    def __init__(self) -> None:
        self.got: list[WriteRecord] = []

    def apply(self, records: list[WriteRecord]) -> int:
        self.got.extend(records)
        return self.last_durable_seq()

    def last_durable_seq(self) -> int:
        return max((r.last_seq for r in self.got), default=0)

    def check_queue(self, queue_id: int | None) -> bool:
        return False


STREAM = [w(1), barrier_record(1, 1, FLUSH), w(2), w(3), barrier_record(3, 3, FUA),
          barrier_record(3, 4, FLUSH), w(4), barrier_record(4, 5, FLUSH)]


@pytest.mark.parametrize("signature", [False, True])
@pytest.mark.parametrize("local_offers,remote_takes", [
    (True, True), (True, False), (False, True), (False, False)])
def test_barriers_travel_only_when_both_sides_know_them(
        local_offers: bool, remote_takes: bool, signature: bool) -> None:
    source, sink = ListSource(list(STREAM)), ListSink()
    sender = SenderSession(SenderConfig("u", VOLUME, BS, signature=signature,
                                        barriers=local_offers), source)
    receiver = ReceiverSession(ReceiverConfig(known_units={"u"}, barriers=remote_takes),
                               lambda hello: sink)
    sender.start()
    shuttle(sender, receiver)
    expect = STREAM if local_offers and remote_takes else [r for r in STREAM if not r.barrier]
    assert sink.got == expect
    assert source.acked == 4
    # Batches of barriers alone were acknowledged too: nothing is left in flight.
    assert sender.in_flight_bytes == 0 and not sender._in_flight
    assert sender.barriers == (local_offers and remote_takes)


def test_a_barrier_the_remote_did_not_agree_to_is_a_protocol_error() -> None:
    receiver = ReceiverSession(ReceiverConfig(known_units={"u"}), lambda hello: ListSink())
    receiver.receive_data(encode_frame(Hello(VERSIONS, "u", VOLUME, BS, 0, ("none",), False,
                                             barriers=True)))
    receiver.data_to_send()
    with pytest.raises(LinkProtocolError, match="a barrier, which HELLO_ACK refused"):
        receiver.receive_data(encode_frame(Writes(1, "none",
                                                  (w(1), barrier_record(1, 1, FLUSH)))))
    assert b"barrier" in receiver.data_to_send()  # the ERROR frame says why
    assert receiver.is_finished


# --------------------------------------------------------------------------- local source


def test_cbq_source_hands_barriers_in_order_and_again_after_a_rewind(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "cbq.img", size=4 << 20, create=True)
    create(storage, volume_blocks=VOLUME // BS, block_size=BS, consumers=("peer",))
    cbq = CircularBufferQueue(storage)
    cbq.append_write(0, b"a" * BS)
    cbq.append_barrier(FLUSH, 7)
    cbq.append_write(1, b"b" * BS)
    cbq.append_write(2, b"c" * BS)
    cbq.append_barrier(FUA)
    cbq.ack(MIRROR_CONSUMER, cbq.sync())
    (tmp_path / "state").mkdir()
    src = CbqSource(cbq, "peer", None, tmp_path / "state")
    got = src.next_batch(1 << 20)
    assert [(r.seq, r.barrier) for r in got] == [(1, False), (1, True), (2, False),
                                                 (3, False), (3, True)]
    assert (got[1].flags, got[1].connection, got[1].cum_blocks) == (FLUSH, 7, 1)
    src.ack(3)
    src.rewind_to(3)  # the barrier at the acknowledged seq may not have arrived
    again = src.next_batch(1 << 20)
    assert [(r.seq, r.barrier) for r in again] == [(3, True)]


# --------------------------------------------------------------------------- remote points


def test_store_keeps_points_durably_once_per_seq(tmp_path: Path) -> None:
    d = tmp_path / "u"
    with UnitStore(d, "unit-a", VOLUME, BS) as u:
        u.apply([w(1, 0, 1, ts=100), barrier_record(1, 101, FLUSH, 2, 1),
                 w(2, 1, 2, ts=102), w(3, 2, 3, ts=103)])
        u.apply([barrier_record(3, 104, FUA | BARRIER_IN_RESYNC, 0, 3),
                 barrier_record(3, 105, FLUSH, 0, 3)])   # a second flush: the same instant
        u.apply([barrier_record(1, 101, FLUSH, 2, 1)])   # resent after a reconnect
        with pytest.raises(SeqGap, match="barrier at seq 9"):
            u.apply([barrier_record(9, 106, FLUSH)])
        pts = u.points()
        assert [(p.number, p.seq, p.ts, p.bytes_since, p.kind, p.in_resync) for p in pts] == [
            (1, 1, 101, BS, BARRIER_FLUSH, False), (2, 3, 104, 2 * BS, BARRIER_FUA, True)]
        assert (pts[0].front_end, pts[0].opcode, pts[0].connection) == (FrontEnd.NBD, 3, 2)
        assert u.point(1).seq == 1
        with pytest.raises(NotRestorable, match="inside a resync"):
            u.point(2)
        assert [p.number for p in u.points(102, None)] == [2]
    # A torn append is cut off at open; the points before it stay.
    log = d / POINTS_NAME
    log.write_bytes(log.read_bytes() + b"\x01" * (POINT.size - 5))
    with UnitStore(d, "unit-a", VOLUME, BS) as u:
        assert [p.number for p in u.points()] == [1, 2]
        u.apply([w(4, 3, 4, ts=200), barrier_record(4, 201, FLUSH, 0, 4)])
        assert [p.number for p in u.points()] == [1, 2, 3]
    assert log.stat().st_size == 3 * POINT.size


def test_points_are_pruned_with_history_and_numbers_never_reused(tmp_path: Path) -> None:
    now = [10**18]
    with UnitStore(tmp_path / "u", "unit-a", VOLUME, BS, clock=lambda: now[0]) as u:
        for i in range(1, 11):
            u.apply([w(i, i, i, ts=now[0]), barrier_record(i, now[0], FLUSH, 0, i)])
            now[0] += 10**9
        assert len(u.points()) == 10
        u.set_retention(Retention(max_age_s=4.5))
        kept = u.points()
        assert kept and all(p.seq >= u.oldest_restorable.seq for p in kept)
        assert len(kept) < 10 and kept[-1].number == 10
        with pytest.raises(NotRestorable, match="no point 1"):
            u.point(1)
        u.apply([w(11, 0, 11, ts=now[0]), barrier_record(11, now[0], FLUSH, 0, 11)])
        assert u.points()[-1].number == 11


def test_unit_sink_passes_barriers_and_keeps_them_out_of_arrivals(tmp_path: Path) -> None:
    u = UnitStore(tmp_path / "u", "unit-a", VOLUME, BS)
    sink = UnitSink(u)
    assert sink.apply([w(1), barrier_record(1, 5, FLUSH, 0, 1), w(2)]) == 2
    assert sink.apply([barrier_record(2, 6, FLUSH, 0, 2)]) == 2
    assert [p.seq for p in u.points()] == [1, 2]
    lines = (Path(u.directory) / "arrivals.log").read_text().splitlines()
    assert lines == ["1 2"]
    u.close()
