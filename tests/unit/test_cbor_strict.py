"""The strict CBOR decoder: hostile bodies are refused at once, the supported subset
round-trips through cbor2's encoder, and a unit's control socket refuses hostile
bodies and keeps serving honest clients."""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.cbor_strict import CborDecodeError, loads
from firmware.control import ControlServer, call
from firmware.control.socket import FRAME_LENGTH as CONTROL_LENGTH
from tests.support.hostile_cbor import head, shared_body, shared_nesting
from tests.support.unitproc import read_until_closed

#: Generous enough not to flake on a loaded machine; the decoders that honour tags
#: need hours for the 40-level body below.
REFUSED_WITHIN_S = 0.010


_TYPE = cbor2.dumps("type")
SHARED_40 = shared_body(40)
assert len(SHARED_40) < 300

HOSTILE: list[tuple[str, bytes, dict[str, Any], str]] = [
    ("shared 28/29 x40", SHARED_40, {}, "tag 28"),
    ("sharedref alone", head(6, 29) + b"\x00", {}, "tag 29"),
    ("nested arrays x10000", b"\x81" * 10_000 + b"\x00", {}, "nest deeper than 16"),
    ("nested maps x10000", b"\xa1\x00" * 10_000 + b"\x00", {}, "nest deeper than 16"),
    ("depth past a small limit", b"\x81\x81\x81\x81\x00", {"max_depth": 3}, "deeper than 3"),
    ("bignum 2^64", cbor2.dumps(2**64), {}, "tag 2 (a bignum"),
    ("bignum 2^100000", cbor2.dumps(2**100_000), {}, "tag 2"),
    ("negative bignum", cbor2.dumps(-(2**64) - 1), {}, "tag 3"),
    ("negative below i64", b"\x3b" + (2**63).to_bytes(8, "big"), {}, "below -2^63"),
    ("byte string of 2^40 in 20 bytes", b"\x5b" + (2**40).to_bytes(8, "big") + b"x" * 11, {},
     "declares 1099511627776 bytes"),
    ("text of 2^32-1", b"\x7a\xff\xff\xff\xff" + b"x" * 15, {}, "declares 4294967295 bytes"),
    ("array of 2^64-1", b"\x9b" + b"\xff" * 8 + b"\x00" * 11, {}, "declares"),
    ("map of 2^40 pairs", b"\xbb" + (2**40).to_bytes(8, "big") + b"\x00" * 11, {}, "declares"),
    ("array over max_items", b"\x99\x10\x00" + b"\x00" * 4096, {"max_items": 1000},
     "more than 1000 items"),
    ("array over max_length", b"\x99\x10\x00" + b"\x00" * 4096, {"max_length": 100},
     "limit 100"),
    ("indefinite byte string", b"\x5f\x41a\xff", {}, "indefinite-length byte string"),
    ("indefinite text", b"\x7f\x61a\xff", {}, "indefinite-length text string"),
    ("indefinite array", b"\x9f\x01\xff", {}, "indefinite-length array"),
    ("indefinite map", b"\xbf\x61a\x01\xff", {}, "indefinite-length map"),
    ("stray break", b"\x81\xff", {}, "break"),
    ("duplicate text keys", b"\xa2" + _TYPE + b"\x01" + _TYPE + b"\x02", {},
     "duplicate map key 'type'"),
    ("duplicate int keys", b"\xa2\x07\x01\x07\x02", {}, "duplicate map key 7"),
    ("array as key", b"\xa1\x81\x01\x01", {}, "only text and integer keys"),
    ("bytes as key", b"\xa1\x41a\x01", {}, "only text and integer keys"),
    ("bool as key", b"\xa1\xf5\x01", {}, "only text and integer keys"),
    ("trailing bytes", cbor2.dumps({"type": "BYE"}) + b"\x00", {}, "1 byte trails"),
    ("float refused", cbor2.dumps(1.5), {}, "floating-point"),
    ("undefined", b"\xf7", {}, "simple value 23"),
    ("simple value 255", b"\xf8\xff", {}, "simple value 24"),
    ("reserved info 28", b"\x1c", {}, "additional information 28"),
    ("invalid UTF-8", b"\x62\xc3\x28", {}, "not UTF-8"),
    ("truncated head", b"\x19\x01", {}, "ends inside an item head"),
    ("truncated map", b"\xa1\x61a", {}, "input ends"),
    ("empty input", b"", {}, "input ends"),
]


@pytest.mark.parametrize(("name", "data", "kwargs", "reason"), HOSTILE,
                         ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_refused_at_once_with_its_reason(
        name: str, data: bytes, kwargs: dict[str, Any], reason: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CborDecodeError) as err:
        loads(data, **kwargs)
    elapsed = time.perf_counter() - start
    assert reason in err.value.reason
    assert 0 <= err.value.offset <= len(data)
    assert str(err.value).endswith(f"(at byte {err.value.offset})")
    assert isinstance(err.value, ValueError)
    assert elapsed < REFUSED_WITHIN_S, f"{name} took {elapsed * 1000:.1f} ms"


def test_the_shared_nesting_is_what_makes_general_decoders_exponential() -> None:
    # The hostile shape is real: cbor2, honouring tags, does twice the work per level.
    def cost(levels: int) -> float:
        body = shared_body(levels)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            cbor2.loads(body)
            runs.append(time.perf_counter() - start)
        return min(runs)
    assert cost(19) > 8 * cost(14)


def test_limits_at_their_edges_are_accepted() -> None:
    assert loads(b"\x81\x81\x81\x00", max_depth=3) == [[[0]]]
    assert loads(cbor2.dumps(2**64 - 1)) == 2**64 - 1
    assert loads(cbor2.dumps(-(2**63))) == -(2**63)
    assert loads(cbor2.dumps(list(range(100))), max_items=100, max_length=100) == list(range(100))
    assert loads(cbor2.dumps({"a": 1, 1: "a"}), max_items=4) == {"a": 1, 1: "a"}
    assert loads(b"\xf9\x3c\x00", floats=True) == 1.0
    assert loads(bytearray(b"\x43abc")) == b"abc"
    assert loads(memoryview(b"\x63abc")) == "abc"


# --------------------------------------------------------------------------- properties

_ints = st.integers(-(2**63), 2**64 - 1)
_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_leaves = st.none() | st.booleans() | _ints | st.binary(max_size=40) | _texts
_keys = _texts | _ints


def _tree(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=6) | st.dictionaries(_keys, kids, max_size=6),
        max_leaves=40)


def _typed(v: Any) -> Any:
    """`v` with every value tagged by its type (1 == True == 1.0 in Python, not in CBOR)
    and maps as sets (canonical encoding reorders keys)."""
    if isinstance(v, dict):
        return ("map", frozenset((_typed(k), _typed(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("array", tuple(_typed(x) for x in v))
    if isinstance(v, float):
        return ("float", struct.pack(">d", v))
    return (type(v).__name__, v)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tree(_leaves), st.booleans())
def test_the_supported_subset_round_trips_through_cbor2(value: Any, canonical: bool) -> None:
    assert _typed(loads(cbor2.dumps(value, canonical=canonical), max_depth=64)) == _typed(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tree(_leaves | st.floats(allow_nan=False)), st.booleans())
def test_floats_round_trip_where_allowed(value: Any, canonical: bool) -> None:
    got = loads(cbor2.dumps(value, canonical=canonical), max_depth=64, floats=True)
    assert _typed(got) == _typed(value)


def test_nan_decodes_where_floats_are_allowed() -> None:
    assert math.isnan(loads(cbor2.dumps(math.nan), floats=True))


def _only_strict_errors(data: bytes, floats: bool) -> None:
    try:
        loads(data, floats=floats)
    except CborDecodeError as exc:
        assert exc.reason and 0 <= exc.offset <= len(data)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_raise_nothing_but_cbor_decode_error(junk: bytes, floats: bool) -> None:
    _only_strict_errors(junk, floats)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tree(_leaves), st.data())
def test_damaged_encodings_raise_nothing_but_cbor_decode_error(
        value: Any, data: st.DataObject) -> None:
    wire = bytearray(cbor2.dumps(value))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    _only_strict_errors(bytes(wire[:cut]), data.draw(st.booleans()))


# --------------------------------------------------------------------------- control socket


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Path, list[Any]]]:
    seen: list[Any] = []
    path = tmp_path / "unit.sock"

    def set_high_water(high_water: float) -> float:
        seen.append(high_water)
        return high_water

    server = ControlServer(path, {"status": lambda: {"ok": 1}, "set": set_high_water})
    server.start()
    yield path, seen
    server.stop()


def test_control_socket_refuses_a_hostile_request_and_keeps_serving(
        control: tuple[Path, list[Any]], caplog: pytest.LogCaptureFixture) -> None:
    path, _ = control
    # 20 levels: a decoder that honours tags still finishes (in tens of ms), so on such
    # a decoder this test fails on the answer instead of hanging the test process.
    body = b"\xa2" + cbor2.dumps("op") + cbor2.dumps("status") + shared_nesting(20) + b"\x00"
    caplog.set_level(logging.WARNING, logger="mirrorunit.control")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.fspath(path))
        s.sendall(CONTROL_LENGTH.pack(len(body)) + body)
        reply = read_until_closed(s)
    (length,) = CONTROL_LENGTH.unpack(reply[:4])
    answer = cbor2.loads(reply[4:4 + length])
    assert answer["ok"] is False and "tag 28" in answer["error"]
    assert len(reply) == 4 + length  # and then the unit closed the connection
    assert any("bad request" in r.getMessage() and "tag 28" in r.getMessage()
               for r in caplog.records)
    assert call(path, "status") == {"ok": 1}


def test_control_requests_still_carry_floats(control: tuple[Path, list[Any]]) -> None:
    path, seen = control
    assert call(path, "set", high_water=0.8) == 0.8
    assert seen == [0.8]
