"""Journey-link frame codec and sans-IO session state machines."""

from __future__ import annotations

import os
import random
import time
import zlib
from collections.abc import Callable

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.lineage import Lineage
from firmware.lineage import Role as LineageRole
from firmware.link.errors import LinkProtocolError, LinkRefused
from firmware.link.frames import (
    CODEC_NONE,
    CODEC_ZLIB,
    CODEC_ZSTD,
    DIGEST_SIZE,
    FRAME_LENGTH,
    MAX_ANONYMOUS_BODY,
    MAX_FRAME_BODY,
    MAX_WRITES_RECORDS,
    PROTOCOL_VERSION,
    WRITES_HEADER_ALLOWANCE,
    Abort,
    Ack,
    Bye,
    ChunkWant,
    Commit,
    Digest,
    ErrorFrame,
    FailbackCommit,
    FailbackPlan,
    FailbackStart,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    Ping,
    Pong,
    RecoverChallenge,
    SwitchoverDone,
    SwitchoverStart,
    WriteRecord,
    Writes,
    decode_body,
    encode_body,
    encode_frame,
    skip_record,
)
from firmware.link.memory import MemorySink, MemorySource
from firmware.link.session import (
    Acknowledged,
    BatchAborted,
    Established,
    PeerRefusal,
    ReceiverConfig,
    ReceiverSession,
    Refused,
    SenderConfig,
    SenderSession,
    SessionState,
)
from tests.support.hostile_cbor import shared_body

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

BS = 512
REC = (
    WriteRecord(seq=1, lbn=0, data=b"\x00" * BS, ts=1),
    WriteRecord(seq=2, lbn=7, data=bytes(range(256)) * 4, ts=2),
    WriteRecord(seq=5, lbn=2**40, data=b"z" * BS * 3, ts=2**63),
)

FORKED = Lineage.first(LineageRole.PRIMARY, 1.5e9, random.Random(1)).fork(
    LineageRole.PRIMARY, 12, 1.6e9, False, random.Random(2)).fork(
    LineageRole.PRIMARY, 30, 1.7e9, True, random.Random(3))

FRAMES: list[Frame] = [
    Hello((1, 2), "unit-a", 2**40, BS, 17, (CODEC_ZSTD, CODEC_ZLIB), True),
    Hello(VERSIONS, "unit-a", 2**20, BS, 17, (), False, queue_id=7,
          lineage=Lineage.first(LineageRole.PRIMARY, 1.5e9, random.Random(1)), last_seq=20),
    HelloAck(1, CODEC_ZLIB, False, 2**64 - 1),
    Writes(1, CODEC_NONE, REC),
    Writes(2, CODEC_ZLIB, REC),
    Writes(3, CODEC_ZSTD, REC),
    Ack(42),
    Digest(9, bytes(range(DIGEST_SIZE))),
    Commit(9),
    Abort(9, "digest mismatch"),
    Ping(3),
    Pong(3),
    ErrorFrame("unknown-unit", "unit 'x' is not known here"),
    Bye(),
    # a lineage with history nests four deep: a copy that was promoted or failed back
    Hello(VERSIONS, "unit-a", 2**20, BS, 17, (), False, lineage=FORKED, last_seq=20),
    FailbackStart("unit-a", FORKED, (CODEC_ZSTD, CODEC_NONE)),
    FailbackPlan(5, 80, FORKED, 65536, 20, b"\x01\x80\x0f", b"\x00\x80\x00", CODEC_ZSTD),
    ChunkWant(5, (0, 15, 19)),
    FailbackCommit(5, 90, FORKED),
    SwitchoverStart("unit-a", FORKED, 77),
    SwitchoverDone("unit-a", 77, FORKED),
    RecoverChallenge("unit-a", "scrypt", (15, 8, 1), b"s" * 16, b"n" * 32),
    RecoverChallenge("unit-a", "argon2id", (131072, 3, 1), b"s" * 16, b"n" * 32),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert FrameDecoder().receive_data(wire) == [frame]


def test_compression_shrinks_compressible_batches() -> None:
    plain = len(encode_frame(Writes(1, CODEC_NONE, REC)))
    for codec in (CODEC_ZLIB, CODEC_ZSTD):
        assert len(encode_frame(Writes(1, codec, REC))) < plain / 4


records_st = st.lists(
    st.tuples(
        st.integers(0, 2**32), st.binary(min_size=0, max_size=600), st.integers(0, 2**64 - 1)
    ),
    min_size=1,
    max_size=5,
).map(
    lambda xs: tuple(
        WriteRecord(seq=i + 1, lbn=lbn, data=data, ts=ts) for i, (lbn, data, ts) in enumerate(xs)
    )
)
u64 = st.integers(0, 2**64 - 1)
frame_st: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Writes, u64, st.sampled_from([CODEC_NONE, CODEC_ZLIB, CODEC_ZSTD]), records_st),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(Commit, u64),
    st.builds(Abort, u64, st.text(max_size=50)),
    st.builds(Digest, u64, st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)),
    st.builds(ErrorFrame, st.text(max_size=20), st.text(max_size=100)),
    st.just(Bye()),
    st.builds(
        Hello,
        st.lists(st.integers(1, 65535), min_size=1, max_size=4).map(tuple),
        st.text(min_size=1, max_size=20),
        u64,
        u64,
        u64,
        st.lists(st.sampled_from([CODEC_NONE, CODEC_ZLIB, CODEC_ZSTD]), max_size=8).map(tuple),
        st.booleans(),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(frame_st, min_size=1, max_size=6), data=st.data())
def test_whole_stream_and_any_split_give_the_same_frames(
    frames: list[Frame], data: st.DataObject
) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    whole = FrameDecoder().receive_data(wire)
    assert whole == frames
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    split = FrameDecoder()
    got: list[Frame] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += split.receive_data(wire[prev:cut])
        prev = cut
    assert got == frames
    one = FrameDecoder()
    bytewise: list[Frame] = []
    for i in range(len(wire)):
        bytewise += one.receive_data(wire[i : i + 1])
    assert bytewise == frames


def _body(m: object) -> bytes:
    return encode_body(cbor2.dumps(m))


def _writes_map(**over: object) -> dict[str, object]:
    m: dict[str, object] = {
        "type": "WRITES",
        "batch": 1,
        "codec": "none",
        "recs": [[1, 0, 0, 4], [2, 0, 1, 4]],
        "payload": b"abcdefgh",
    }
    m.update(over)
    return m


GOOD_ACK = encode_frame(Ack(5))
BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("oversized", FRAME_LENGTH.pack(MAX_FRAME_BODY + 1), "limit"),
    ("huge length", b"\xff\xff\xff\xff", "limit"),
    ("zero length", FRAME_LENGTH.pack(0) + b"\0\0\0\0", "empty"),
    ("bad crc", GOOD_ACK[:-1] + bytes([GOOD_ACK[-1] ^ 1]), "CRC32C"),
    ("flipped body", GOOD_ACK[:5] + bytes([GOOD_ACK[5] ^ 0x40]) + GOOD_ACK[6:], "CRC32C"),
    ("not cbor", encode_body(b"\x1c"), "not valid CBOR"),
    ("truncated cbor", encode_body(b"\xa1\x64type"), "not valid CBOR"),
    ("trailing bytes", encode_body(cbor2.dumps({"type": "BYE"}) + b"\0"), "trail"),
    ("cbor list", _body(["ACK", 1]), "not a map"),
    ("cbor int", _body(7), "not a map"),
    ("no type", _body({"durable": 1}), "'type'"),
    ("type not text", _body({"type": 3}), "'type'"),
    ("unknown type", _body({"type": "FLY"}), "unknown frame type"),
    ("missing field", _body({"type": "ACK"}), "lacks field 'durable'"),
    ("negative int", _body({"type": "ACK", "durable": -1}), "unsigned"),
    ("bool for int", _body({"type": "PING", "nonce": True}), "unsigned"),
    ("text for int", _body({"type": "COMMIT", "batch": "1"}), "unsigned"),
    ("u64 overflow", _body({"type": "ACK", "durable": 2**64}), "unsigned"),
    ("digest size", _body({"type": "DIGEST", "batch": 1, "digest": b"x"}), "DIGEST must be"),
    (
        "hello no versions",
        _body(
            {
                "type": "HELLO",
                "versions": [],
                "unit": "u",
                "size": 1,
                "bs": 1,
                "resume": 0,
                "compression": [],
                "signature": False,
            }
        ),
        "versions",
    ),
    (
        "hello empty unit",
        _body(
            {
                "type": "HELLO",
                "versions": [1],
                "unit": "",
                "size": 1,
                "bs": 1,
                "resume": 0,
                "compression": [],
                "signature": False,
            }
        ),
        "unit",
    ),
    (
        "hello bad lineage",
        _body(
            {
                "type": "HELLO",
                "versions": [1],
                "unit": "u",
                "size": 1,
                "bs": 1,
                "resume": 0,
                "compression": [],
                "signature": False,
                "lineage": {"current": {}, "history": [], "writer": True},
            }
        ),
        "lineage",
    ),
    (
        "hello int signature",
        _body(
            {
                "type": "HELLO",
                "versions": [1],
                "unit": "u",
                "size": 1,
                "bs": 1,
                "resume": 0,
                "compression": [],
                "signature": 1,
            }
        ),
        "boolean",
    ),
    (
        "writes seq backwards",
        _body(_writes_map(recs=[[2, 0, 0, 4], [1, 0, 1, 4]])),
        "does not follow",
    ),
    (
        "writes seq repeated",
        _body(_writes_map(recs=[[2, 0, 0, 4], [2, 0, 1, 4]])),
        "does not follow",
    ),
    ("writes no records", _body(_writes_map(recs=[], payload=b"")), "no records"),
    ("writes short record", _body(_writes_map(recs=[[1, 0, 0]])), "[seq, ts, lbn, length]"),
    ("writes payload short", _body(_writes_map(payload=b"abc")), "records declare"),
    ("writes unknown codec", _body(_writes_map(codec="lzma")), "unknown codec"),
    ("writes bad zlib", _body(_writes_map(codec="zlib", payload=b"nope")), "zlib"),
    (
        "writes zlib bomb",
        _body(_writes_map(codec="zlib", payload=zlib.compress(b"\0" * 10_000_000))),
        "declare",
    ),
    ("writes zstd garbage", _body(_writes_map(codec="zstd", payload=b"\0" * 16)), "zstd"),
    ("writes data too big", _body(_writes_map(recs=[[1, 0, 0, 2**40]])), "exceeds"),
]


@pytest.mark.parametrize(("name", "wire", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_malformed_input_is_a_protocol_error_with_reason(
    name: str, wire: bytes, reason: str
) -> None:
    dec = FrameDecoder()
    with pytest.raises(LinkProtocolError) as err:
        dec.receive_data(wire)
    assert reason in err.value.reason
    # A failed decoder stays failed: no frame can be resynchronised from a broken stream.
    with pytest.raises(LinkProtocolError):
        dec.receive_data(GOOD_ACK)


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    dec = FrameDecoder()
    with pytest.raises(LinkProtocolError, match="limit"):
        dec.receive_data(FRAME_LENGTH.pack(MAX_FRAME_BODY + 1)[:4])
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_protocol_errors(junk: bytes) -> None:
    try:
        FrameDecoder().receive_data(junk)
    except LinkProtocolError as exc:
        assert exc.reason


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FRAMES), st.data())
def test_any_single_byte_change_is_detected(frame: Frame, data: st.DataObject) -> None:
    wire = bytearray(encode_frame(frame))
    pos = data.draw(st.integers(0, len(wire) - 1))
    wire[pos] ^= data.draw(st.integers(1, 255))
    dec = FrameDecoder()
    try:
        got = dec.receive_data(bytes(wire))
    except LinkProtocolError:
        return
    # A change in the length prefix can only make the decoder wait for more bytes.
    assert got == [] and pos < FRAME_LENGTH.size


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.text(max_size=8)
        | st.binary(max_size=8)
        | st.floats(),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["type", "batch", "recs", "payload", "codec", "durable", "digest", "unit"]
            ),
            children,
            max_size=5,
        ),
        max_leaves=20,
    ),
    st.sampled_from(["HELLO", "HELLO_ACK", "WRITES", "ACK", "DIGEST", "ABORT", "ERROR"]),
)
def test_well_formed_cbor_with_wrong_shapes_is_a_protocol_error(value: object, ftype: str) -> None:
    m = value if isinstance(value, dict) else {"x": value}
    m = {**m, "type": ftype}
    try:
        FrameDecoder().receive_data(_body(m))
    except LinkProtocolError as exc:
        assert exc.reason


# --------------------------------------------------------------------------- sessions

VOLUME = 256 * BS


def make_source(n: int, seed: int = 1, size: int = BS) -> MemorySource:
    src = MemorySource()
    rng = __import__("random").Random(seed)
    for i in range(n):
        blocks = 1 + rng.randrange(3)
        data = (bytes([i % 251]) * 7 + rng.randbytes(1)) * (size * blocks // 8)
        src.append(rng.randrange(VOLUME // BS - blocks), data)
    return src


def expected_image(src: MemorySource) -> bytes:
    img = bytearray(VOLUME)
    for r in src.history:
        img[r.lbn * BS : r.lbn * BS + len(r.data)] = r.data
    return bytes(img)


Tamper = Callable[[bytes], bytes]


def run_pair(
    sender: SenderSession,
    receiver: ReceiverSession,
    rounds: int = 10_000,
    to_sender: Tamper | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[list[object], list[object]]:
    """Shuttle bytes between the two sessions until neither has anything to say."""
    s_events: list[object] = []
    r_events: list[object] = []
    if sender.state is SessionState.IDLE:
        sender.start()
    for _ in range(rounds):
        sender.pump()
        if check:
            check()
        out = sender.data_to_send()
        if out:
            r_events += receiver.receive_data(out)
        back = receiver.data_to_send()
        if back:
            s_events += sender.receive_data(to_sender(back) if to_sender else back)
        if not out and not back:
            break
    return s_events, r_events


def pair(
    src: MemorySource,
    sink: MemorySink,
    *,
    unit: str = "unit-a",
    known: tuple[str, ...] = ("unit-a",),
    authenticated: str | None = None,
    **sender_kw: object,
) -> tuple[SenderSession, ReceiverSession]:
    cfg = SenderConfig(unit_id=unit, volume_size=VOLUME, block_size=BS, **sender_kw)  # type: ignore[arg-type]
    return (
        SenderSession(cfg, src),
        ReceiverSession(ReceiverConfig(known_units=set(known)), lambda h: sink, authenticated),
    )


@pytest.mark.parametrize("signature", [False, True])
@pytest.mark.parametrize("codec", [CODEC_NONE, CODEC_ZLIB, CODEC_ZSTD])
def test_stream_delivers_every_write_in_order_once(codec: str, signature: bool) -> None:
    src, sink = make_source(300), MemorySink(VOLUME, BS)
    sender, receiver = pair(
        src,
        sink,
        compression=(codec,),
        signature=signature,
        window_bytes=8 * BS * 4,
        batch_bytes=4 * BS * 4,
    )

    def window_holds() -> None:
        assert sender.in_flight_bytes <= sender.config.window_bytes

    s_ev, r_ev = run_pair(sender, receiver, check=window_holds)
    assert isinstance(s_ev[0], Established) and s_ev[0].compression == codec
    assert s_ev[0].signature is signature and receiver.signature is signature
    assert sink.applied_log == list(range(1, 301))
    assert bytes(sink.image) == expected_image(src)
    assert sender.acked_seq == src.acked_seq == 300
    acks = [e.durable_seq for e in s_ev if isinstance(e, Acknowledged)]
    assert acks == sorted(acks) and acks[-1] == 300


def test_codec_is_the_senders_best_that_the_receiver_has() -> None:
    src, sink = make_source(1), MemorySink(VOLUME, BS)
    sender, _ = pair(src, sink, compression=("lz4", CODEC_ZLIB, CODEC_ZSTD))
    receiver = ReceiverSession(
        ReceiverConfig(known_units={"unit-a"}, compression=(CODEC_ZSTD, CODEC_ZLIB)),
        lambda h: sink,
    )
    run_pair(sender, receiver)
    assert sender.compression == receiver.compression == CODEC_ZLIB


def test_highest_common_version_is_chosen_and_none_is_refused() -> None:
    src, sink = make_source(1), MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("unit-a", VOLUME, BS, versions=(1, 2, 3)), src)
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}, versions=(1, 2)), lambda h: sink)
    s_ev, _ = run_pair(sender, receiver)
    assert isinstance(s_ev[0], Established) and s_ev[0].version == 2

    sink = MemorySink(VOLUME, BS)
    sender = SenderSession(SenderConfig("unit-a", VOLUME, BS, versions=(9,)), src)
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: sink)
    s_ev, r_ev = run_pair(sender, receiver)
    assert r_ev == [Refused("version", "no common protocol version: (9,) vs (2,) "
                              "(both units need firmware speaking the same link protocol)")]
    assert isinstance(s_ev[0], PeerRefusal) and s_ev[0].code == "version"
    assert sender.is_finished and receiver.is_finished and sink.applied_log == []


@pytest.mark.parametrize(
    ("unit", "known", "authenticated", "code"),
    [
        ("unit-x", ("unit-a",), None, "unknown-unit"),
        ("unit-b", ("unit-a", "unit-b"), "unit-a", "identity"),
    ],
)
def test_unit_id_is_checked_before_anything_is_written(
    unit: str, known: tuple[str, ...], authenticated: str | None, code: str
) -> None:
    src, sink = make_source(5), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink, unit=unit, known=known, authenticated=authenticated)
    s_ev, r_ev = run_pair(sender, receiver)
    assert len(r_ev) == 1 and isinstance(r_ev[0], Refused) and r_ev[0].code == code
    assert unit in r_ev[0].text
    assert isinstance(s_ev[0], PeerRefusal) and s_ev[0].code == code
    assert sink.applied_log == [] and src.acked_seq == 0


def test_open_sink_refusal_reaches_the_sender() -> None:
    src = make_source(2)

    def busy(hello: Hello) -> MemorySink:
        raise LinkRefused("busy", f"unit {hello.unit_id} is already connected")

    sender = SenderSession(SenderConfig("unit-a", VOLUME, BS), src)
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), busy)
    s_ev, _ = run_pair(sender, receiver)
    assert s_ev == [PeerRefusal("busy", "unit unit-a is already connected")]


def test_resume_after_reconnect_starts_after_the_remote_durable_seq() -> None:
    src, sink = make_source(100), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink, window_bytes=6 * BS * 4, batch_bytes=3 * BS * 4)
    sender.start()
    # Let some batches through, then lose the connection with batches in flight.
    for _ in range(4):
        sender.pump()
        receiver.receive_data(sender.data_to_send())
        sender.receive_data(receiver.data_to_send())
    sender.pump()
    sender.data_to_send()  # bytes that never arrive
    durable = sink.last_durable_seq()
    assert 0 < durable < 100 and sender.last_sent_seq > durable
    # The local lost its acked seq too (it restarts from an older resume point).
    sender2, receiver2 = pair(src, sink, resume_seq=0)
    s_ev, _ = run_pair(sender2, receiver2)
    assert isinstance(s_ev[0], Established) and s_ev[0].durable_seq == durable
    assert sink.applied_log == list(range(1, 101))
    assert bytes(sink.image) == expected_image(src)


def test_replayed_seqs_are_acknowledged_and_skipped() -> None:
    src, sink = make_source(20), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink)
    run_pair(sender, receiver)
    assert sink.last_durable_seq() == 20
    receiver2 = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: sink)
    replay = SenderConfig("unit-a", VOLUME, BS)
    receiver2.receive_data(encode_frame(Hello(VERSIONS, "unit-a", VOLUME, BS, 0, (), False)))
    assert isinstance(FrameDecoder().receive_data(receiver2.data_to_send())[0], HelloAck)
    old = tuple(src.history[10:15])
    new = tuple(src.history[15:20])
    assert replay.unit_id == "unit-a"
    ev = receiver2.receive_data(encode_frame(Writes(1, CODEC_NONE, old)))
    assert ev == []
    assert FrameDecoder().receive_data(receiver2.data_to_send()) == [Ack(20)]
    assert sink.applied_log == list(range(1, 21))
    # A batch that straddles the durable point applies only its new part.
    src.append(3, b"n" * BS)
    ev = receiver2.receive_data(encode_frame(Writes(2, CODEC_NONE, (*new, src.history[20]))))
    assert sink.applied_log == list(range(1, 22))
    assert FrameDecoder().receive_data(receiver2.data_to_send()) == [Ack(21)]


def test_gap_in_seqs_is_a_protocol_error() -> None:
    src, sink = make_source(5), MemorySink(VOLUME, BS)
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: sink)
    receiver.receive_data(encode_frame(Hello(VERSIONS, "unit-a", VOLUME, BS, 0, (), False)))
    receiver.data_to_send()
    with pytest.raises(LinkProtocolError, match="seq 2 arrived where 1 was due"):
        receiver.receive_data(encode_frame(Writes(1, CODEC_NONE, tuple(src.history[1:3]))))
    assert FrameDecoder().receive_data(receiver.data_to_send())[0].code == "protocol"  # type: ignore[union-attr]
    assert sink.applied_log == []


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (WriteRecord(1, VOLUME // BS, b"x" * BS, 0), "past end"),
        (WriteRecord(1, 0, b"x" * (BS - 1), 0), "whole number of blocks"),
        (WriteRecord(1, 0, b"", 0), "whole number of blocks"),
    ],
)
def test_writes_outside_the_volume_geometry_are_refused(record: WriteRecord, reason: str) -> None:
    sink = MemorySink(VOLUME, BS)
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: sink)
    receiver.receive_data(encode_frame(Hello(VERSIONS, "unit-a", VOLUME, BS, 0, (), False)))
    with pytest.raises(LinkProtocolError, match=reason):
        receiver.receive_data(encode_frame(Writes(1, CODEC_NONE, (record,))))
    assert sink.applied_log == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (Writes(1, CODEC_NONE, (WriteRecord(1, 0, b"x" * BS, 0),)), "not allowed"),
        (Commit(1), "not allowed"),
        (Ack(1), "not allowed"),
    ],
)
def test_frames_out_of_state_are_protocol_errors(frame: Frame, reason: str) -> None:
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: MemorySink(VOLUME, BS))
    with pytest.raises(LinkProtocolError, match=reason):
        receiver.receive_data(encode_frame(frame))
    assert receiver.state is SessionState.FAILED


def test_ack_for_a_seq_never_sent_is_a_protocol_error() -> None:
    src, sink = make_source(3), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink)
    run_pair(sender, receiver)
    with pytest.raises(LinkProtocolError, match="only 3 was sent"):
        sender.receive_data(encode_frame(Ack(4)))


def test_an_ack_going_backwards_is_a_protocol_error() -> None:
    # A rule of the sender's session, not of the codec: ACKs in any order decode.
    assert FrameDecoder().receive_data(GOOD_ACK + encode_frame(Ack(4))) == [Ack(5), Ack(4)]
    src, sink = make_source(6), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink)
    run_pair(sender, receiver)
    assert sender.acked_seq == 6
    with pytest.raises(LinkProtocolError, match="backwards") as err:
        sender.receive_data(GOOD_ACK)
    assert "ACK seq 5 goes backwards from 6" in err.value.reason
    assert sender.state is SessionState.FAILED


def test_acks_wait_for_durability() -> None:
    src, sink = make_source(10), MemorySink(VOLUME, BS, defer_durability=True)
    sender, receiver = pair(src, sink)
    run_pair(sender, receiver)
    assert sink.applied_log == list(range(1, 11))
    assert sender.acked_seq == 0 and src.acked_seq == 0
    sink.make_durable()
    receiver.poll_durable()
    s_ev = sender.receive_data(receiver.data_to_send())
    assert s_ev == [Acknowledged(10)] and src.acked_seq == 10


def _corrupt_digests(count: list[int]) -> Tamper:
    """In the next count[0] chunks from the receiver that carry DIGESTs, give the first
    DIGEST a wrong value (later ones in the chunk answer batches the abort discards)."""

    def tamper(data: bytes) -> bytes:
        out = b""
        hit = False
        for f in FrameDecoder().receive_data(data):
            if isinstance(f, Digest) and count[0] > 0 and not hit:
                count[0] -= 1
                hit = True
                f = Digest(f.batch_id, bytes(DIGEST_SIZE))
            out += encode_frame(f)
        return out

    return tamper


def test_digest_mismatch_aborts_and_resends_without_applying_the_bad_batch() -> None:
    src, sink = make_source(60), MemorySink(VOLUME, BS)
    sender, receiver = pair(
        src, sink, signature=True, window_bytes=8 * BS * 4, batch_bytes=2 * BS * 4
    )
    s_ev, r_ev = run_pair(sender, receiver, to_sender=_corrupt_digests([2]))
    aborted = [e for e in s_ev if isinstance(e, BatchAborted)]
    assert len(aborted) == 2
    assert [e for e in r_ev if isinstance(e, BatchAborted)] == aborted
    assert sink.applied_log == list(range(1, 61))
    assert bytes(sink.image) == expected_image(src)


def test_too_many_aborts_give_up_with_an_error() -> None:
    src, sink = make_source(10), MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink, signature=True, max_aborts=2)
    s_ev, r_ev = run_pair(sender, receiver, to_sender=_corrupt_digests([100]))
    assert any(isinstance(e, Refused) and e.code == "too-many-aborts" for e in s_ev)
    assert any(isinstance(e, PeerRefusal) and e.code == "too-many-aborts" for e in r_ev)
    assert sink.applied_log == [] and src.acked_seq == 0


def test_ping_is_answered_with_pong_in_any_state() -> None:
    receiver = ReceiverSession(ReceiverConfig({"unit-a"}), lambda h: MemorySink(VOLUME, BS))
    receiver.receive_data(encode_frame(Ping(77)))
    assert FrameDecoder().receive_data(receiver.data_to_send()) == [Pong(77)]


def test_random_source_contents_survive_the_codec(tmp_path: object) -> None:
    src = MemorySource()
    for i in range(50):
        src.append(i, os.urandom(BS * (1 + i % 4)))
    sink = MemorySink(VOLUME, BS)
    sender, receiver = pair(src, sink, compression=(CODEC_ZSTD,))
    run_pair(sender, receiver)
    assert bytes(sink.image) == expected_image(src)


# --------------------------------------------------------------------------- hostile bodies


def _ack_with(extra: bytes) -> bytes:
    """An ACK body with one more key/value pair, given as raw CBOR."""
    return b"\xa3" + cbor2.dumps("type") + cbor2.dumps("ACK") + cbor2.dumps("durable") + b"\x01" \
        + extra


HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("shared 28/29 x40", shared_body(40, "ACK"), "tag 28"),
    ("nesting past the frames' depth",
     _ack_with(cbor2.dumps("x") + b"\x81\x81\x81\x81\x00"), "nest deeper than 4"),
    ("nested arrays x10000", _ack_with(cbor2.dumps("x") + b"\x81" * 10_000 + b"\x00"),
     "nest deeper"),
    ("bignum durable", cbor2.dumps({"type": "ACK", "durable": 2**64 + 1}), "tag 2"),
    ("byte string of 2^40 in a small body",
     _ack_with(cbor2.dumps("x") + b"\x5b" + (2**40).to_bytes(8, "big") + b"x" * 8),
     "declares 1099511627776 bytes"),
    ("indefinite map", b"\xbf" + cbor2.dumps("type") + cbor2.dumps("BYE") + b"\xff",
     "indefinite-length map"),
    ("indefinite text", _ack_with(cbor2.dumps("x") + b"\x7f\x61a\xff"), "indefinite-length"),
    ("duplicate type", _ack_with(cbor2.dumps("type") + cbor2.dumps("BYE")),
     "duplicate map key 'type'"),
    ("float field", cbor2.dumps({"type": "ACK", "durable": 1.0}), "floating-point"),
    ("date tag", _ack_with(cbor2.dumps("x") + b"\xc1\x00"), "tag 1"),
]


@pytest.mark.parametrize("max_body", [MAX_FRAME_BODY, MAX_ANONYMOUS_BODY],
                         ids=["pinned", "certificate-less"])
@pytest.mark.parametrize(("name", "body", "reason"), HOSTILE_BODIES,
                         ids=[h[0] for h in HOSTILE_BODIES])
def test_hostile_bodies_are_refused_at_once_with_their_reason(
        name: str, body: bytes, reason: str, max_body: int) -> None:
    wire = encode_body(body)
    dec = FrameDecoder(max_body=max_body)
    start = time.perf_counter()
    with pytest.raises(LinkProtocolError) as err:
        dec.receive_data(wire)
    elapsed = time.perf_counter() - start
    assert "not valid CBOR" in err.value.reason and reason in err.value.reason
    assert elapsed < 0.010, f"{name} took {elapsed * 1000:.1f} ms"


def _raw_writes(n: int, rec: bytes) -> bytes:
    """A WRITES body of `n` copies of the record header `rec`, built without cbor2."""
    return (b"\xa5" + b"".join(cbor2.dumps(x) for x in ("type", "WRITES", "batch", 1,
                                                          "codec", "none", "recs"))
            + b"\x9a" + n.to_bytes(4, "big") + rec * n + cbor2.dumps("payload") + b"\x40")


def test_a_writes_frame_of_912000_records_is_refused_at_its_record_count() -> None:
    body = _raw_writes(912_000, b"\x84\x01\x00\x00\x00")
    assert len(body) <= MAX_FRAME_BODY
    start = time.perf_counter()
    with pytest.raises(LinkProtocolError) as err:
        decode_body(body)
    elapsed = time.perf_counter() - start
    assert f"limit {MAX_WRITES_RECORDS}" in err.value.reason
    assert elapsed < 0.010, f"took {elapsed * 1000:.1f} ms"
    with pytest.raises(LinkProtocolError, match="limit"):
        FrameDecoder().receive_data(encode_body(body))


def _largest_sender_batch() -> tuple[WriteRecord, ...]:
    """What a sender can put in one batch at most: batch_bytes of 512-byte writes, a
    SKIP before each and one at the end."""
    records: list[WriteRecord] = []
    seq = 1
    for i in range((MAX_FRAME_BODY - WRITES_HEADER_ALLOWANCE) // BS):
        records.append(skip_record(seq, seq, ts=i))
        records.append(WriteRecord(seq=seq + 1, lbn=i, data=bytes(BS), ts=i))
        seq += 2
    records.append(skip_record(seq, seq, ts=seq))
    return tuple(records)


def test_the_record_cap_holds_the_largest_batch_a_sender_builds() -> None:
    records = _largest_sender_batch()
    assert len(records) <= MAX_WRITES_RECORDS
    frame = Writes(1, CODEC_ZSTD, records)
    assert FrameDecoder().receive_data(encode_frame(frame)) == [frame]


def test_writes_frames_over_the_record_cap_are_a_protocol_error() -> None:
    recs = [[seq, 0, 0, 0, seq] for seq in range(1, MAX_WRITES_RECORDS + 2)]
    wire = _body(_writes_map(recs=recs, payload=b""))
    with pytest.raises(LinkProtocolError, match=f"limit {MAX_WRITES_RECORDS}"):
        FrameDecoder().receive_data(wire)
    ok = _body(_writes_map(recs=recs[:MAX_WRITES_RECORDS], payload=b""))
    (frame,) = FrameDecoder().receive_data(ok)
    assert isinstance(frame, Writes) and len(frame.records) == MAX_WRITES_RECORDS


@pytest.mark.parametrize("change,why", [
    ({"changed": b"\x00"}, "bitmap 'changed' of 1 bytes for 20 chunks"),
    ({"count": 2**40, "changed": b"", "dropped": b""}, "limit"),
    ({"count": 0, "changed": b"", "dropped": b""}, "FAILBACK_PLAN of 0 chunks"),
    ({"chunk": 2**30}, "chunk size"),
])
def test_a_failback_plan_that_does_not_add_up_is_refused(change: dict[str, object],
                                                         why: str) -> None:
    good = FailbackPlan(5, 80, FORKED, 65536, 20, b"\x00" * 3, b"\x00" * 3, CODEC_NONE)
    m = cbor2.loads(encode_frame(good)[4:-4])
    m.update(change)
    with pytest.raises(LinkProtocolError, match=why):
        decode_body(cbor2.dumps(m))
