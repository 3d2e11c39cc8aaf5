"""Discarded seq ranges travel as SKIP records: codec, sans-IO sessions, the remote
store's journal, and the local CBQ source with its skip ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.cbq import CircularBufferQueue
from firmware.cbq.queue import MIRROR_CONSUMER, create
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    CODEC_NONE,
    CODEC_ZSTD,
    FrameDecoder,
    WriteRecord,
    Writes,
    batch_digest,
    encode_body,
    encode_frame,
    skip_record,
)
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    SenderConfig,
    SenderSession,
)
from firmware.local.replication import SKIPS_SUFFIX, CbqSource
from firmware.remote.server import ARRIVALS_NAME, UnitSink
from firmware.remote.unit import UnitStore
from firmware.storage import FileStorage
from tests.support.link import shuttle

BS = 512
VOLUME = 1 << 20


def w(seq: int, lbn: int = 0, fill: int = 1, nblocks: int = 1) -> WriteRecord:
    return WriteRecord(seq=seq, lbn=lbn, data=bytes([fill]) * (BS * nblocks), ts=seq)


# --------------------------------------------------------------------------- codec


@st.composite
def mixed_records(draw: Any) -> tuple[WriteRecord, ...]:
    seq = draw(st.integers(1, 1 << 40))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            last = seq + draw(st.integers(0, 1000))
            out.append(skip_record(seq, last, draw(st.integers(0, 2**64 - 1))))
            seq = last + 1
        else:
            out.append(WriteRecord(seq, draw(st.integers(0, 2**32)),
                                   draw(st.binary(min_size=1, max_size=700)), seq))
            seq += 1
    return tuple(out)


@given(mixed_records(), st.sampled_from([CODEC_NONE, "zlib", CODEC_ZSTD]))
def test_writes_with_skips_round_trip(records: tuple[WriteRecord, ...], codec: str) -> None:
    frame = Writes(7, codec, records)
    wire = encode_frame(frame)
    assert FrameDecoder().receive_data(wire) == [frame]
    # Byte at a time gives the same frame.
    dec = FrameDecoder()
    got = [f for i in range(len(wire)) for f in dec.receive_data(wire[i:i + 1])]
    assert got == [frame]


def test_skip_record_shape() -> None:
    r = skip_record(4, 9, 123)
    assert r.is_skip and r.last_seq == 9 and r.data == b"" and r.lbn == 0
    assert not w(3).is_skip and w(3).last_seq == 3
    with pytest.raises(ValueError):
        skip_record(5, 4, 0)
    with pytest.raises(ValueError):
        skip_record(0, 4, 0)
    # The digest tells a skip from any write, and one skip range from another.
    assert batch_digest([r]) != batch_digest([skip_record(4, 8, 123)])
    assert batch_digest([r]) != batch_digest([WriteRecord(4, 9, b"", 123)])


def _writes_body(recs: list[list[int]], payload: bytes = b"") -> bytes:
    return encode_body(cbor2.dumps({"type": "WRITES", "batch": 1, "codec": "none",
                                    "recs": recs, "payload": payload}))


@pytest.mark.parametrize("recs,payload,reason", [
    ([[4, 0, 1, 0, 9]], b"", "a skip must be"),           # lbn set
    ([[4, 0, 0, 512, 9]], b"x" * 512, "a skip must be"),   # carries data
    ([[4, 0, 0, 0, 3]], b"", "a skip must be"),            # ends before it starts
    ([[0, 0, 0, 0, 3]], b"", "a skip must be"),            # seq 0 is "nothing"
    ([[4, 0, 0, 0, 9], [9, 0, 0, 4]], b"x" * 4, "does not follow"),  # overlaps the skip
    ([[4, 0, 0, 0, 9, 1, 0]], b"", r"must be \[seq"),        # seven elements
    ([[4, 0, 0, 0, -1]], b"", r"must be \[seq"),             # negative
])
def test_malformed_skips_are_refused(recs: list[list[int]], payload: bytes,
                                     reason: str) -> None:
    with pytest.raises(LinkProtocolError, match=reason):
        FrameDecoder().receive_data(_writes_body(recs, payload))


# --------------------------------------------------------------------------- remote store


def test_store_journals_a_skip_and_recovers_it(tmp_path: Path) -> None:
    d = tmp_path / "u"
    with UnitStore(d, "unit-a", VOLUME, BS) as u:
        assert u.apply([w(1, 0, 1), w(2, 1, 2), skip_record(3, 5, 10), w(6, 2, 6)]) == 6
        assert u.last_applied_seq == 6
        st_ = u.status()
        assert st_.skipped_seqs == 3 and st_.skipped_ranges == [[3, 5]]
        assert any(e["event"] == "skip" and e["first_seq"] == 3 and e["last_seq"] == 5
                   for e in st_.events)
        # Replays are harmless, also of a skip re-cut at another first seq.
        assert u.apply([w(2, 1, 2), skip_record(3, 5, 10)]) == 6
        assert u.apply([skip_record(5, 8, 11), w(9, 3, 9)]) == 9
        assert u.status().skipped_seqs == 5  # only 7..8 were new
        assert u.read_mirror(0, 4 * BS) == (bytes([1]) * BS + bytes([2]) * BS
                                            + bytes([6]) * BS + bytes([9]) * BS)
    with UnitStore(d, "unit-a", VOLUME, BS) as u:
        assert u.last_durable_seq() == 9 and u.last_applied_seq == 9
        # A point inside a skip shows the image of the write before it.
        with u.image_at_seq(4) as dev:
            assert dev.point.seq == 2
            assert dev.pread(2 * BS, BS) == bytes(BS)
        # The next seq after the skip is contiguous; one past it is a gap.
        with pytest.raises(Exception, match="arrived where 10 was due"):
            u.apply([w(11)])


def test_store_recovers_skips_from_the_journal_with_a_commit_delay(tmp_path: Path) -> None:
    d = tmp_path / "u"
    now = [10**18]
    with UnitStore(d, "unit-a", VOLUME, BS, commit_delay_s=1000, clock=lambda: now[0]) as u:
        t = now[0]
        u.apply([WriteRecord(1, 0, b"\1" * BS, t), skip_record(2, 4, t),
                 WriteRecord(5, 1, b"\5" * BS, t)])
        assert u.last_applied_seq == 0 and u.status().pending_records == 2
    with UnitStore(d, "unit-a", VOLUME, BS, clock=lambda: now[0]) as u:
        assert u.last_durable_seq() == 5
        now[0] += 2000 * 10**9
        u.apply_due()
        assert u.last_applied_seq == 5
        assert u.read_mirror(BS, BS) == bytes([5]) * BS


# --------------------------------------------------------------------------- sessions


class Env:
    """A real CBQ (the local side) and a real unit store (the remote side)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.storage = FileStorage(tmp / "cbq.img", size=4 << 20, create=True)
        create(self.storage, volume_blocks=VOLUME // BS, block_size=BS, consumers=("peer",))
        self.state = tmp / "state"
        self.state.mkdir()
        self.image = bytearray(VOLUME)
        self.cbq = self._open()
        self.unit = UnitStore(tmp / "store" / "unit-a", "unit-a", VOLUME, BS)
        self.sink = UnitSink(self.unit)

    def _open(self) -> CircularBufferQueue:
        return CircularBufferQueue(self.storage)

    def write(self, lbn: int, fill: int) -> int:
        data = bytes([fill]) * BS
        self.image[lbn * BS:(lbn + 1) * BS] = data
        seq = self.cbq.append_write(lbn, data).seq
        assert seq is not None
        durable = self.cbq.sync()
        self.cbq.ack(MIRROR_CONSUMER, durable)
        return seq

    def source(self) -> CbqSource:
        return CbqSource(self.cbq, "peer", None, self.state)

    def sessions(self, source: CbqSource, signature: bool = False) -> tuple[SenderSession,
                                                                           ReceiverSession]:
        sender = SenderSession(
            SenderConfig("unit-a", VOLUME, BS, resume_seq=self.cbq.consumers["peer"].acked_seq,
                         signature=signature), source)
        receiver = ReceiverSession(ReceiverConfig(known_units={"unit-a"}),
                                   lambda hello: self.sink)
        sender.start()
        return sender, receiver

    def arrivals(self) -> list[str]:
        return (Path(self.unit.directory) / ARRIVALS_NAME).read_text().splitlines()


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.unit.close()
    e.cbq.close()


@pytest.mark.parametrize("signature", [False, True])
def test_discarded_ranges_reach_the_remote_as_skips(env: Env, signature: bool) -> None:
    seqs = [env.write(i, i + 1) for i in range(12)]
    assert seqs == list(range(1, 13))
    env.cbq.discard(4, 6)
    env.cbq.discard(11, 12)  # at the end: nothing follows to reveal the gap
    sender, receiver = env.sessions(env.source(), signature)
    shuttle(sender, receiver)
    assert env.unit.last_durable_seq() == 12 and env.unit.last_applied_seq == 12
    assert sender.acked_seq == 12
    assert env.cbq.consumers["peer"].acked_seq == 12
    assert env.arrivals() == ["1 3", "4 6 skip", "7 10", "11 12 skip"]
    # The discarded writes never reached the mirror; the rest did.
    for i in range(12):
        want = bytes(BS) if i + 1 in (4, 5, 6, 11, 12) else bytes([i + 1]) * BS
        assert env.unit.read_mirror(i * BS, BS) == want, i
    # Streaming goes on after the skip.
    env.write(20, 99)
    shuttle(sender, receiver)
    assert env.unit.last_durable_seq() == 13
    assert env.arrivals()[-1] == "13 13"


def test_a_skip_the_remote_never_confirmed_is_resent_after_a_restart(env: Env) -> None:
    for i in range(8):
        env.write(i, i + 1)
    env.cbq.discard(5, 8)
    # First connection: the remote takes 1..4 but the connection drops before the
    # skip arrives.  The CBQ's ack carries the consumer over the discarded seqs
    # right after 4, and with every consumer past them it forgets the discard.
    src = env.source()
    batch = src.next_batch(1 << 20)
    assert [r.seq for r in batch] == [1, 2, 3, 4, 5]
    assert batch[-1].is_skip and batch[-1].last_seq == 8
    env.unit.apply(batch[:4])
    src.ack(4)
    assert env.cbq.consumers["peer"].acked_seq == 8
    assert env.cbq.discards == []
    assert (env.state / ("peer" + SKIPS_SUFFIX)).exists()
    # The local unit restarts: only the ledger in the state dir knows 5..8 were skipped.
    env.cbq.close()
    env.cbq = env._open()
    sender, receiver = env.sessions(env.source())
    shuttle(sender, receiver)
    assert not sender.resync_active
    assert env.unit.last_durable_seq() == 8
    assert env.arrivals()[-1] == "5 8 skip"
    # Once the remote confirmed it, the ledger forgets the range.
    assert "5" not in (env.state / ("peer" + SKIPS_SUFFIX)).read_text()


def test_a_gap_that_was_not_discarded_is_not_papered_over(env: Env) -> None:
    for i in range(3):
        env.write(i, i + 1)
    src = env.source()
    src.next_batch(1 << 20)
    src.ack(3)
    # The remote claims less than the queue already released, with no discard to
    # explain it: only a resync can help, never a skip.
    plan = src.resync_plan(1)
    assert plan is not None and not plan.verify
