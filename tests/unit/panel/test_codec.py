"""The front-panel link codec (firmware/panel/codec.py): round trips, resynchronisation
after noise, and every kind of bad frame refused at bounded cost."""

from __future__ import annotations

import json
import struct

import pytest
from cobs import cobs
from hypothesis import assume, given
from hypothesis import strategies as st

from firmware.panel.codec import (
    MAX_ENCODED,
    MAX_PAYLOAD,
    VERSION,
    BadFrame,
    Frame,
    FrameDecoder,
    FrameType,
    PanelProtocolError,
    encode_frame,
)
from firmware.record import crc32c

values = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31),
                   st.text(max_size=20))
bodies = st.dictionaries(st.text(max_size=8), values, max_size=8)


def raw_frame(version: int, ftype: int, payload: bytes, crc: int | None = None) -> bytes:
    head = bytes((version, ftype)) + payload
    c = crc32c(head) if crc is None else crc
    return b"\x00" + cobs.encode(head + struct.pack("<I", c)) + b"\x00"


@given(st.sampled_from(list(FrameType)), bodies)
def test_round_trip_whole_and_byte_at_a_time(ftype: FrameType, body: dict[str, object]) -> None:
    assume(len(json.dumps(body, separators=(",", ":"))) <= MAX_PAYLOAD)
    wire = encode_frame(ftype, body)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert FrameDecoder().feed(wire) == [Frame(ftype, body)]
    d = FrameDecoder()
    events = [e for b in wire for e in d.feed(bytes([b]))]
    assert events == [Frame(ftype, body)]


@given(st.binary(max_size=600), bodies)
def test_any_noise_then_a_frame_decodes_the_frame(noise: bytes, body: dict[str, object]) -> None:
    assume(len(json.dumps(body, separators=(",", ":"))) <= MAX_PAYLOAD)
    d = FrameDecoder()
    events = d.feed(noise) + d.feed(encode_frame(FrameType.STATUS, body))
    assert events[-1] == Frame(FrameType.STATUS, body)
    assert all(isinstance(e, BadFrame) for e in events[:-1])
    assert d.errors == len(events) - 1


BAD = [
    ("short", b"\x00" + cobs.encode(b"\x01\x02\x03") + b"\x00", "short frame"),
    ("crc", raw_frame(VERSION, 2, b"{}", crc=1234), "CRC mismatch"),
    ("version", raw_frame(VERSION + 1, 2, b"{}"), "protocol version 2"),
    ("type", raw_frame(VERSION, 99, b"{}"), "unknown frame type 99"),
    ("list", raw_frame(VERSION, 2, b"[1,2]"), "not a map"),
    ("utf8", raw_frame(VERSION, 2, b"{\"a\":\"\xff\"}"), "undecodable payload"),
    ("json", raw_frame(VERSION, 2, b"{\"a\":"), "undecodable payload"),
    ("nan", raw_frame(VERSION, 2, b"{\"a\":NaN}"), "undecodable payload"),
    ("cobs", b"\x00\x05\x01\x00", "bad COBS"),
]


@pytest.mark.parametrize("name, wire, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_frames_are_reported_and_the_next_one_decodes(name: str, wire: bytes,
                                                          reason: str) -> None:
    d = FrameDecoder()
    good = encode_frame(FrameType.HEARTBEAT, {"boot": 1})
    events = d.feed(wire + good)
    assert len(events) == 2 and isinstance(events[0], BadFrame), events
    assert reason in events[0].reason
    assert events[1] == Frame(FrameType.HEARTBEAT, {"boot": 1})
    assert d.errors == 1


def test_an_overlong_run_is_dropped_without_being_kept() -> None:
    d = FrameDecoder()
    events = d.feed(b"\x00" + b"\x01" * (MAX_ENCODED * 50))
    assert events == [BadFrame(f"frame over {MAX_ENCODED} bytes")]
    assert len(d._buf) == 0  # nothing of the run is buffered while it is dropped
    assert d.feed(b"\x01" * 100 + encode_frame(FrameType.STATUS, {})) == \
        [Frame(FrameType.STATUS, {})]


def test_empty_frames_between_delimiters_are_not_errors() -> None:
    d = FrameDecoder()
    assert d.feed(b"\x00\x00\x00") == [] and d.errors == 0


def test_the_largest_payload_fits_and_one_more_byte_is_refused() -> None:
    filler = "x" * (MAX_PAYLOAD - len(json.dumps({"s": ""}, separators=(",", ":"))))
    wire = encode_frame(FrameType.STATUS, {"s": filler})
    assert len(wire) - 2 <= MAX_ENCODED
    assert FrameDecoder().feed(wire) == [Frame(FrameType.STATUS, {"s": filler})]
    with pytest.raises(PanelProtocolError, match="over 400"):
        encode_frame(FrameType.STATUS, {"s": filler + "x"})
    with pytest.raises(PanelProtocolError, match="cannot encode"):
        encode_frame(FrameType.STATUS, {"f": float("nan")})
