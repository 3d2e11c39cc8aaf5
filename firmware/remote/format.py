"""On-disk formats of a remote unit's directory.

    <unit>/state.cbor         CBOR map, replaced atomically (tmp + fsync + rename + fsync dir)
    <unit>/mirror.img         the remote mirror image, volume_size bytes
    <unit>/journal/rj-N.seg   receive journal: the writes as they arrived, in seq order
    <unit>/history/hj-N.seg   history journal: before-images of what reached the mirror
    <unit>/unit.lock          flock()ed while the unit is open

Both journals are sequences of append-only segment files.  A segment starts with
a SEGMENT_HEADER (magic, version, a random salt, the segment number, CRC32C);
records follow back to back.  Every record header repeats the segment's salt and
carries a CRC32C over header and payload, so a record from another segment (a
recycled file, a stale copy) or one torn by a power cut never passes as current.
All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import crc32c as _crc32c

FORMAT_VERSION = 1

RECEIVE_SEGMENT_MAGIC = b"MURJSEG1"
HISTORY_SEGMENT_MAGIC = b"MUHJSEG1"
# magic, version, flags, salt, segment number, created ns, crc
SEGMENT_HEADER = struct.Struct("<8sHHIQQI")
assert SEGMENT_HEADER.size == 36

RECORD_MAGIC = b"MURR"
# magic, version, kind, salt, seq, ts_ns, lbn, nblocks, payload_len, crc
RECORD_HEADER = struct.Struct("<4sHHIQQQIII")
assert RECORD_HEADER.size == 48
_RECORD_CRC_OFFSET = RECORD_HEADER.size - 4
_SEGMENT_CRC_OFFSET = SEGMENT_HEADER.size - 4

#: Resync digests cover chunks of this many bytes of the mirror.
CHUNK_SIZE = 64 * 1024
#: Digest used to decide chunk equality (never a CRC).
CHUNK_DIGEST_SIZE = 32


class RecordKind(enum.IntEnum):
    #: Receive journal: a write as the link delivered it (payload = data).
    WRITE = 1
    #: History: the blocks a write overwrote (payload = their previous contents).
    BEFORE = 2
    #: History: the blocks a resync chunk overwrote; `seq` is the resync's start seq.
    CHUNK_BEFORE = 3
    #: Receive journal: seqs `seq`..`lbn` were discarded at the local and carry
    #: nothing (nblocks 0, no payload).  The last seq sits in the header, not the
    #: payload, because recovery checks seq contiguity from headers alone.
    SKIP = 4


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


@dataclass(frozen=True)
class RecordHeader:
    kind: RecordKind
    salt: int
    seq: int
    ts: int
    lbn: int
    nblocks: int
    payload_len: int

    @property
    def length(self) -> int:
        """Bytes the record occupies in its segment."""
        return RECORD_HEADER.size + self.payload_len


def encode_record(h: RecordHeader, payload: bytes | bytearray | memoryview) -> bytes:
    """Header and payload, ready to append."""
    assert len(payload) == h.payload_len
    raw = bytearray(
        RECORD_HEADER.pack(
            RECORD_MAGIC, FORMAT_VERSION, int(h.kind), h.salt, h.seq, h.ts, h.lbn,
            h.nblocks, h.payload_len, 0,
        )
    )
    crc = crc32c(payload, crc32c(raw))
    struct.pack_into("<I", raw, _RECORD_CRC_OFFSET, crc)
    raw += payload
    return bytes(raw)


def decode_record_header(raw: bytes | memoryview) -> tuple[RecordHeader, int] | None:
    """Parse a header; None when it is not a record header of this format.
    Returns the header and the CRC it claims (checked by `record_crc_ok`)."""
    if len(raw) < RECORD_HEADER.size:
        return None
    magic, version, kind, salt, seq, ts, lbn, nblocks, plen, crc = RECORD_HEADER.unpack_from(raw)
    if magic != RECORD_MAGIC or version != FORMAT_VERSION:
        return None
    try:
        k = RecordKind(kind)
    except ValueError:
        return None
    return RecordHeader(k, salt, seq, ts, lbn, nblocks, plen), crc


def record_crc_ok(raw_header: bytes | memoryview, payload: bytes | memoryview, crc: int) -> bool:
    head = bytearray(raw_header[: RECORD_HEADER.size])
    struct.pack_into("<I", head, _RECORD_CRC_OFFSET, 0)
    return crc32c(payload, crc32c(head)) == crc


def encode_segment_header(magic: bytes, salt: int, number: int, created_ns: int) -> bytes:
    raw = bytearray(SEGMENT_HEADER.pack(magic, FORMAT_VERSION, 0, salt, number, created_ns, 0))
    struct.pack_into("<I", raw, _SEGMENT_CRC_OFFSET, crc32c(raw))
    return bytes(raw)


@dataclass(frozen=True)
class SegmentHeader:
    salt: int
    number: int
    created_ns: int


def decode_segment_header(raw: bytes, magic: bytes) -> SegmentHeader | None:
    """None when `raw` is not a valid segment header with this magic."""
    if len(raw) < SEGMENT_HEADER.size:
        return None
    m, version, _flags, salt, number, created, crc = SEGMENT_HEADER.unpack_from(raw)
    if m != magic or version != FORMAT_VERSION:
        return None
    head = bytearray(raw[: SEGMENT_HEADER.size])
    struct.pack_into("<I", head, _SEGMENT_CRC_OFFSET, 0)
    if crc32c(head) != crc:
        return None
    return SegmentHeader(salt, number, created)
