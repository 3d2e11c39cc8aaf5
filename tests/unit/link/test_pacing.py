"""The sans-IO token bucket, and the sender session pacing WRITES and resync chunks with
it and changing its codec on an established session."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    CODEC_NONE,
    CODEC_ZLIB,
    CODEC_ZSTD,
    FrameDecoder,
    Writes,
    available_codecs,
    chunk_digest,
)
from firmware.link.memory import MemorySink, MemorySource
from firmware.link.pacing import MIN_PACED_BATCH, TokenBucket
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    ResyncFinished,
    ResyncPlan,
    SenderConfig,
    SenderSession,
)
from tests.support.link import ChunkedSource

BS = 512
VOLUME = 4096 * BS
CHUNK = 4096
CHUNKS = 256


class ChunkedSink(MemorySink):
    chunk_size = CHUNK
    chunk_count = CHUNKS

    def __init__(self) -> None:
        super().__init__(CHUNKS * CHUNK, BS)

    def begin_resync(self) -> int:
        return self.last_durable_seq()

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return {c: chunk_digest(bytes(self.image[c * CHUNK:(c + 1) * CHUNK])) for c in chunks}

    def write_chunk(self, chunk: int, data: bytes) -> bool:
        self.image[chunk * CHUNK:(chunk + 1) * CHUNK] = data
        return True

    def resync_complete(self, seq: int) -> None:
        self._durable = self._applied = seq


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the bucket


def test_the_bucket_holds_the_long_run_rate_and_refills_only_to_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, burst=100, clock=clock)
    sent = 0
    while sent < 5000:
        wait = bucket.delay()
        if wait:
            clock.now += wait
            continue
        bucket.spend(100)
        sent += 100
    # 5000 bytes at 1000 B/s with a 100-byte head start; the last frame's debt is
    # still to be paid.
    assert clock.now - 100.0 == pytest.approx(4.8)
    assert bucket.delay() == pytest.approx(0.1)
    clock.now += 10.0  # idle time refills only up to the burst
    bucket.spend(100)
    assert bucket.delay() == 0.0
    bucket.spend(100)
    assert bucket.delay() == pytest.approx(0.1)


def test_a_frame_larger_than_the_burst_goes_and_its_debt_is_paid() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, burst=100, clock=clock)
    bucket.spend(1100)
    assert bucket.delay() == pytest.approx(1.0)


def test_the_rate_changes_live() -> None:
    clock = Clock()
    bucket = TokenBucket(clock=clock)
    assert bucket.rate is None and bucket.delay() == 0.0
    bucket.spend(10 << 20)
    assert bucket.delay() == 0.0  # no cap: nothing is owed
    bucket.set_rate(1 << 20)  # a cap set now starts with a full burst
    assert bucket.burst == (1 << 20) // 10 and bucket.delay() == 0.0
    bucket.spend(bucket.burst + (1 << 20))
    assert bucket.delay() == pytest.approx(1.0)
    bucket.set_rate(2 << 20)  # the debt is paid at the new rate
    assert bucket.delay() == pytest.approx(0.5)
    bucket.set_rate(0)  # lifted
    assert bucket.rate is None and bucket.delay() == 0.0
    with pytest.raises(ValueError):
        bucket.set_rate(-1)


def test_a_capped_batch_is_about_one_burst() -> None:
    assert TokenBucket().batch_bytes(1 << 20) == 1 << 20
    assert TokenBucket(10 << 20).batch_bytes(1 << 20) == (10 << 20) // 10
    assert TokenBucket(1000.0).batch_bytes(1 << 20) == MIN_PACED_BATCH
    assert TokenBucket(1 << 30).batch_bytes(1 << 20) == 1 << 20


# --------------------------------------------------------------------------- the session


def _source(n: int, size: int = 8 * BS) -> MemorySource:
    src = MemorySource()
    for i in range(n):
        src.append((i * 8) % (VOLUME // BS - 8), bytes([i % 251]) * size)
    return src


def _drive(sender: SenderSession, receiver: ReceiverSession, clock: Clock,
           limit: int = 100_000) -> tuple[list[object], list[tuple[float, bytes]]]:
    """Shuttle bytes; when neither side has anything to say and the pacer holds the
    sender back, the clock moves on by what it asks.  Returns the sender's events and
    what it sent when."""
    events: list[object] = []
    wire: list[tuple[float, bytes]] = []
    for _ in range(limit):
        sender.pump()
        events += sender.take_events()
        out = sender.data_to_send()
        if out:
            wire.append((clock.now, out))
            receiver.receive_data(out)
        back = receiver.data_to_send()
        if back:
            events += sender.receive_data(back)
        if not out and not back:
            wait = sender.send_delay()
            if not wait:
                return events, wire
            clock.now += wait
    raise AssertionError("sessions did not settle")


def test_writes_leave_at_the_capped_rate_and_faster_once_it_is_lifted() -> None:
    clock = Clock()
    rate = 256 * 1024
    pacer = TokenBucket(rate, clock=clock)
    src, sink = _source(400), MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("u", VOLUME, BS, compression=(CODEC_NONE,)), src,
                           pacer=pacer)
    receiver = ReceiverSession(ReceiverConfig({"u"}), lambda h: sink)
    sender.start()
    t0 = clock.now
    _, wire = _drive(sender, receiver, clock)
    total = sum(len(b) for _, b in wire)
    assert sink.applied_log == list(range(1, 401))
    elapsed = clock.now - t0
    # 1.6 MiB at 256 KiB/s, less the first burst; no batch bigger than about a burst.
    assert elapsed == pytest.approx((total - pacer.burst) / rate, rel=0.05)
    assert max(len(b) for _, b in wire) < 2 * pacer.burst
    assert sender.writes_data_bytes == 400 * 8 * BS
    assert sender.writes_wire_bytes >= sender.writes_data_bytes
    for i in range(400):
        src.append(i % 64, b"\x55" * 8 * BS)
    pacer.set_rate(None)
    t1 = clock.now
    _drive(sender, receiver, clock)
    assert clock.now == t1 and sink.applied_log[-1] == 800


def test_resync_chunks_are_paced_and_the_end_follows_the_last() -> None:
    clock = Clock()
    rate = 64 * CHUNK
    pacer = TokenBucket(rate, burst=CHUNK, clock=clock)
    image = bytearray(ChunkedSink.chunk_count * CHUNK)
    for c in range(0, ChunkedSink.chunk_count, 2):
        image[c * CHUNK:c * CHUNK + 4] = b"diff"
    plan = ResyncPlan(verify=False, seq=0, chunks=tuple(range(ChunkedSink.chunk_count)))
    src, sink = ChunkedSource(image, plan), ChunkedSink()
    sender = SenderSession(SenderConfig("u", len(image), 512, compression=(CODEC_NONE,)),
                           src, pacer=pacer)
    receiver = ReceiverSession(ReceiverConfig({"u"}, require_contiguous=False),
                               lambda h: sink)
    sender.start()
    events, wire = _drive(sender, receiver, clock)
    done = [e for e in events if isinstance(e, ResyncFinished)]
    differing = ChunkedSink.chunk_count // 2
    assert len(done) == 1 and len(done[0].differing) == differing
    assert sink.image == image
    # Each chunk frame is a little over CHUNK bytes: at 64 chunks/s, less the burst.
    assert clock.now - 100.0 == pytest.approx((differing - 1) / 64, rel=0.05)


def _writes_codecs(wire: list[tuple[float, bytes]]) -> list[str]:
    decoder = FrameDecoder()
    return [f.codec for _, b in wire for f in decoder.receive_data(b) if isinstance(f, Writes)]


def test_the_codec_changes_on_the_session_between_negotiated_and_none() -> None:
    clock = Clock()
    src, sink = _source(4), MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("u", VOLUME, BS), src)
    receiver = ReceiverSession(ReceiverConfig({"u"}), lambda h: sink)
    sender.start()
    _, wire = _drive(sender, receiver, clock)
    assert sender.negotiated == CODEC_ZSTD and _writes_codecs(wire) == [CODEC_ZSTD]
    assert sender.prefer_codecs((CODEC_NONE,))
    for i in range(4):
        src.append(i, b"\x11" * 8 * BS)
    _, wire = _drive(sender, receiver, clock)
    assert _writes_codecs(wire) == [CODEC_NONE]
    assert sender.writes_wire_bytes > sender.writes_data_bytes - 4 * 8 * BS
    assert sender.prefer_codecs(available_codecs()) and sender.compression == CODEC_ZSTD
    # zlib was not negotiated: only a new HELLO can offer it.
    assert not sender.prefer_codecs((CODEC_ZLIB, CODEC_NONE))
    assert sender.compression == CODEC_ZSTD
    assert sink.applied_log == list(range(1, 9))


def test_codecs_the_remote_passed_over_at_hello_are_skipped() -> None:
    src, sink = _source(1), MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("u", VOLUME, BS), src)
    receiver = ReceiverSession(ReceiverConfig({"u"}, compression=(CODEC_ZLIB,)),
                               lambda h: sink)
    sender.start()
    _drive(sender, receiver, Clock())
    assert sender.negotiated == CODEC_ZLIB
    # "auto" offers zstd first; this remote has none of it, so zlib it stays.
    assert sender.prefer_codecs(available_codecs()) and sender.compression == CODEC_ZLIB
    assert sender.prefer_codecs((CODEC_ZSTD, CODEC_NONE)) and sender.compression == CODEC_NONE


def test_a_remote_refuses_a_codec_it_did_not_negotiate() -> None:
    src, sink = _source(1), MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("u", VOLUME, BS), src)
    receiver = ReceiverSession(ReceiverConfig({"u"}), lambda h: sink)
    sender.start()
    _drive(sender, receiver, Clock())
    sender.compression = CODEC_ZLIB  # what prefer_codecs never does
    src.append(0, b"\x22" * BS)
    sender.pump()
    with pytest.raises(LinkProtocolError, match="negotiated"):
        receiver.receive_data(sender.data_to_send())
