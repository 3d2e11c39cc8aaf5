"""The record module: self-checking headers, their refusals, and the bytes of every format."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable

import pytest

from firmware.record import HeaderFormat, IntegrityError, crc32c

# magic, version, a u64, a u32, crc
PLAIN = HeaderFormat("thing", struct.Struct("<4sHQII"), b"THNG", 3)
# The CRC followed by pad bytes, as the config slot lays it out.
PADDED = HeaderFormat("padded thing", struct.Struct("<8sHQI4x"), b"PADTHING", 1)
# An integer magic, as the CBQ record has it.
NUMERIC = HeaderFormat("numbered thing", struct.Struct("<IBQI"), 0x474E4854, 2)
FORMATS = [PLAIN, PADDED, NUMERIC]
PAYLOAD = bytes(range(40))


def _fields(fmt: HeaderFormat) -> tuple[int, ...]:
    return (7, 9) if fmt is PLAIN else (7,)


def test_crc32c_is_castagnoli() -> None:
    # The check value of CRC-32C (RFC 3720, B.4).
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


@pytest.mark.parametrize(("fmt", "crc_offset"), [(PLAIN, 18), (PADDED, 18), (NUMERIC, 13)])
def test_crc_offset_comes_from_the_layout(fmt: HeaderFormat, crc_offset: int) -> None:
    assert fmt.crc_offset == crc_offset


@pytest.mark.parametrize("layout", ["<4sHQ", ">4sHQI", "<4sHIQ", "4sHQI"])
def test_layouts_without_a_trailing_little_endian_crc_are_refused(layout: str) -> None:
    with pytest.raises(ValueError, match="end in a u32 CRC"):
        HeaderFormat("bad", struct.Struct(layout), b"BAD!", 1)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("payload", [b"", b"x", PAYLOAD], ids=["empty", "one", "forty"])
def test_round_trip(fmt: HeaderFormat, payload: bytes) -> None:
    raw, crc = fmt.pack(*_fields(fmt), payload=payload)
    assert len(raw) == fmt.size
    assert fmt.verify(raw, payload) == (*_fields(fmt), crc)
    assert fmt.verify(memoryview(raw), memoryview(payload))[-1] == crc
    assert crc == crc32c(payload, crc32c(raw[:fmt.crc_offset] + bytes(4)
                                         + raw[fmt.crc_offset + 4:]))


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# (name, damage to (header, payload), reason the check gives)
DAMAGE: list[tuple[str, Callable[[bytes, bytes], tuple[bytes, bytes]], str]] = [
    ("torn header field", lambda h, p: (_flip(h, PLAIN.size - 6), p), "thing CRC mismatch"),
    ("torn crc", lambda h, p: (_flip(h, PLAIN.crc_offset), p), "thing CRC mismatch"),
    ("torn payload", lambda h, p: (h, _flip(p, 17)), "thing CRC mismatch"),
    ("payload cut short", lambda h, p: (h, p[:-1]), "thing CRC mismatch"),
    ("payload of another record", lambda h, p: (h, p[::-1]), "thing CRC mismatch"),
    ("wrong magic", lambda h, p: (b"THNX" + h[4:], p), "not a thing: bad magic b'THNX'"),
    ("wrong version", lambda h, p: (h[:4] + (4).to_bytes(2, "little") + h[6:], p),
     "unsupported thing format 4"),
    ("truncated header", lambda h, p: (h[:-1], p), "thing truncated: 21 of 22 bytes"),
    ("no header", lambda h, p: (b"", p), "thing truncated: 0 of 22 bytes"),
]


@pytest.mark.parametrize(("name", "damage", "reason"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_refused_with_path_offset_and_reason(
        name: str, damage: Callable[[bytes, bytes], tuple[bytes, bytes]], reason: str) -> None:
    good, _ = PLAIN.pack(7, 9, payload=PAYLOAD)
    header, payload = damage(good, PAYLOAD)
    with pytest.raises(IntegrityError) as info:
        PLAIN.verify(header, payload, path="seg-1", offset=4096)
    e = info.value
    assert (e.path, e.offset, e.reason) == ("seg-1", 4096, reason)
    assert str(e) == f"{reason} in seg-1 at offset 4096"
    assert not PLAIN.crc_ok(header, payload)


def test_torn_pad_bytes_after_the_crc_are_caught() -> None:
    raw, _ = PADDED.pack(7, payload=PAYLOAD)
    with pytest.raises(IntegrityError, match="padded thing CRC mismatch"):
        PADDED.check(_flip(raw, PADDED.size - 1), PAYLOAD)


def test_unpack_does_not_check_the_crc() -> None:
    # Readers learn the payload length from the header before they can check the CRC.
    raw, crc = PLAIN.pack(7, 9, payload=PAYLOAD)
    assert PLAIN.unpack(raw) == (7, 9, crc)
    with pytest.raises(IntegrityError):
        PLAIN.check(raw)


@pytest.mark.parametrize(("path", "offset", "text"), [
    ("a.seg", 36, "bad in a.seg at offset 36"),
    (None, 36, "bad at offset 36"),
    ("a.seg", None, "bad in a.seg"),
    (None, None, "bad"),
])
def test_error_text_names_what_is_known(path: str | None, offset: int | None,
                                        text: str) -> None:
    assert str(IntegrityError(path, offset, "bad")) == text


def test_error_survives_pickling_with_its_location() -> None:
    e = pickle.loads(pickle.dumps(IntegrityError("a.seg", 36, "bad")))
    assert (e.path, e.offset, e.reason, str(e)) == ("a.seg", 36, "bad", "bad in a.seg at offset 36")


# ---------------------------------------------------------------- the formats keep their bytes


def _cbq_record() -> bytes:
    from firmware.cbq.format import RecordHeader, RecordKind, encode_record
    h = RecordHeader(RecordKind.DATA, 3, 0xDEADBEEF, 42, 1234567890, 7, 2, 16, 0, 99, 0x1234)
    raw, crc = encode_record(h, bytes(range(16)))
    assert crc == 1744882878
    return raw


def _cbq_superblock() -> bytes:
    from firmware.cbq.format import encode_superblock
    return encode_superblock(5, b"body")[:40]


def _journal_record() -> bytes:
    from firmware.remote import format as rf
    r = rf.RecordHeader(rf.RecordKind.WRITE, 0xCAFEF00D, 9, 111, 4, 1, 8)
    return rf.encode_record(r, b"abcdefgh")


def _segment_header() -> bytes:
    from firmware.remote import format as rf
    return rf.encode_segment_header(rf.RECEIVE_SEGMENT_MAGIC, 0x01020304, 3, 5555)


def _config_slot() -> bytes:
    from firmware.config.store import encode_slot
    return encode_slot(2, b"\xa0")


# Bytes as the formats wrote them before they shared the record module: files written
# then must still open.
GOLDEN = [
    ("cbq record", _cbq_record,
     "4d5543520101000003000000efbeadde2a00000000000000d20296490000000007000000000000000200"
     "0000100000000000000000000000630000000000000034120000becc0068"),
    # format 2 since barriers (a format-1 superblock still opens and is upgraded:
    # tests/unit/volume/test_barriers.py)
    ("cbq superblock", _cbq_superblock,
     "4d5543425153423102000000050000000000000004000000fa308d66626f64790000000000000000"),
    ("journal record", _journal_record,
     "4d555252010001000df0feca09000000000000006f000000000000000400000000000000010000000800"
     "000066cdf2606162636465666768"),
    ("journal segment header", _segment_header,
     "4d55524a5345473101000000040302010300000000000000b31500000000000050ed26f2"),
    ("config slot", _config_slot,
     "4d55434f4e4649470100200002000000000000000100000093c9b92600000000a0"),
]


@pytest.mark.parametrize(("name", "encode", "golden"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_every_format_keeps_its_bytes(name: str, encode: Callable[[], bytes],
                                      golden: str) -> None:
    assert encode().hex() == golden
