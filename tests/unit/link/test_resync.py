"""Resync frames (codec) and the sans-IO checksum resync between the two sessions."""

from __future__ import annotations

from collections.abc import Sequence

import cbor2
import pytest
from blake3 import blake3
from hypothesis import given
from hypothesis import strategies as st

from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    ChunkData,
    ChunkDigests,
    DigestRequest,
    FrameDecoder,
    ResyncDone,
    ResyncEnd,
    ResyncStart,
    WriteRecord,
    encode_body,
    encode_frame,
)
from firmware.link.memory import MemorySink, MemorySource
from firmware.link.session import (
    ReceiverConfig,
    ReceiverSession,
    ResyncFinished,
    ResyncPlan,
    SenderConfig,
    SenderSession,
)
from tests.support.link import ChunkedSource

CHUNK = 4096
VOLUME = 64 * CHUNK

u64 = st.integers(0, (1 << 64) - 1)
chunks = st.lists(st.integers(0, 1 << 40), max_size=50).map(tuple)
frames = st.one_of(
    st.builds(ResyncStart, u64, st.booleans(), u64, st.integers(1, 1 << 20), u64),
    st.builds(DigestRequest, u64, chunks),
    chunks.flatmap(lambda cs: st.builds(
        ChunkDigests, u64, st.just(cs),
        st.lists(st.binary(min_size=32, max_size=32), min_size=len(cs),
                 max_size=len(cs)).map(tuple))),
    st.builds(ChunkData, u64, u64, st.sampled_from(["none", "zlib", "zstd"]),
              st.binary(min_size=1, max_size=70000)),
    st.builds(ResyncEnd, u64, u64),
    st.builds(ResyncDone, u64, u64, u64),
)


@given(frames)
def test_resync_frames_round_trip(frame: object) -> None:
    assert FrameDecoder().receive_data(encode_frame(frame)) == [frame]  # type: ignore[arg-type]


@pytest.mark.parametrize("body,reason", [
    ({"type": "CHUNK_DIGESTS", "rid": 1, "chunks": [1, 2], "digests": b"\0" * 32},
     "digest bytes for 2 chunks"),
    ({"type": "CHUNK", "rid": 1, "chunk": 0, "codec": "none", "len": 2 << 20,
      "data": b"x"}, "CHUNK length"),
    ({"type": "CHUNK", "rid": 1, "chunk": 0, "codec": "none", "len": 5, "data": b"x"},
     "records declare 5"),
    ({"type": "DIGEST_REQ", "rid": 1, "chunks": list(range(1025))}, "at most 1024"),
    ({"type": "DIGEST_REQ", "rid": 1, "chunks": [-1]}, "chunk numbers"),
    ({"type": "RESYNC_START", "rid": 1, "verify": False, "seq": 0, "chunk": 0, "total": 0},
     "chunk size 0"),
])
def test_malformed_resync_frames_are_protocol_errors(body: dict[str, object],
                                                     reason: str) -> None:
    with pytest.raises(LinkProtocolError, match=reason):
        FrameDecoder().receive_data(encode_body(cbor2.dumps(body)))


class ChunkedSink(MemorySink):
    chunk_size = CHUNK
    chunk_count = VOLUME // CHUNK

    def __init__(self) -> None:
        super().__init__(VOLUME, 512)
        self.written: list[int] = []
        self.resyncing = False

    def begin_resync(self) -> int:
        self.resyncing = True
        return self.last_durable_seq()

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return {c: blake3(bytes(self.image[c * CHUNK:(c + 1) * CHUNK])).digest() for c in chunks}

    def write_chunk(self, chunk: int, data: bytes) -> bool:
        self.image[chunk * CHUNK:(chunk + 1) * CHUNK] = data
        self.written.append(chunk)
        return True

    def resync_complete(self, seq: int) -> None:
        self.resyncing = False
        self._durable = self._applied = seq


def _run(sender: SenderSession, receiver: ReceiverSession) -> list[object]:
    events: list[object] = []
    for _ in range(1000):
        sender.pump()
        events += sender.take_events()
        out = sender.data_to_send()
        back = b""
        if out:
            receiver.receive_data(out)
            back = receiver.data_to_send()
        if back:
            events += sender.receive_data(back)
        if not out and not back:
            break
    return events


@pytest.mark.parametrize("verify", [False, True])
def test_resync_sends_only_differing_chunks_then_streams_on(verify: bool) -> None:
    image = bytearray(VOLUME)
    sink = ChunkedSink()
    for c in (3, 17, 40):
        image[c * CHUNK:c * CHUNK + 10] = b"changed!!!"
    plan = ResyncPlan(verify=verify, seq=0 if verify else 5,
                      chunks=tuple(range(VOLUME // CHUNK)))
    src = ChunkedSource(image, plan)
    for _ in range(5):
        src.append(0, b"\0" * 512)  # seqs 1..5: covered by the resync
    src.next_batch(1 << 20)
    src.ack(5)
    src.append(1, b"\x77" * 512)  # seq 6: after the resync point, streamed
    sender = SenderSession(SenderConfig("u", VOLUME, 512), src)
    receiver = ReceiverSession(ReceiverConfig(known_units={"u"}, require_contiguous=False),
                               lambda hello: sink)
    sender.start()
    events = _run(sender, receiver)
    done = [e for e in events if isinstance(e, ResyncFinished)]
    assert len(done) == 1 and done[0].differing == (3, 17, 40)
    assert src.finished == [([3, 17, 40], done[0].seq)]
    if verify:
        assert sink.written == [] and done[0].bytes_sent == 0
    else:
        assert sink.written == [3, 17, 40] and done[0].bytes_sent == 3 * CHUNK
        assert sink.applied_log == [6]
        expect = bytearray(image)
        expect[512:1024] = b"\x77" * 512
        assert sink.image == expect


def test_chunk_frame_outside_a_resync_is_refused() -> None:
    sink = ChunkedSink()
    receiver = ReceiverSession(ReceiverConfig(known_units={"u"}), lambda hello: sink)
    sender = SenderSession(SenderConfig("u", VOLUME, 512), MemorySource())
    sender.start()
    receiver.receive_data(sender.data_to_send())
    with pytest.raises(LinkProtocolError, match="not running"):
        receiver.receive_data(encode_frame(ChunkData(9, 0, "none", b"\1" * CHUNK)))
    assert sink.written == []


def test_writes_during_a_resync_are_refused() -> None:
    sink = ChunkedSink()
    receiver = ReceiverSession(ReceiverConfig(known_units={"u"}), lambda hello: sink)
    sender = SenderSession(SenderConfig("u", VOLUME, 512), MemorySource())
    sender.start()
    receiver.receive_data(sender.data_to_send())
    receiver.receive_data(encode_frame(ResyncStart(1, False, 0, CHUNK, 1)))
    from firmware.link.frames import Writes

    with pytest.raises(LinkProtocolError, match="while a resync"):
        receiver.receive_data(encode_frame(Writes(1, "none", (WriteRecord(1, 0, b"\1" * 512,
                                                                          1),))))
