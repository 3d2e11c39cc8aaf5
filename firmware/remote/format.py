"""On-disk formats of a remote unit's directory.

    <unit>/state.cbor         CBOR map, replaced atomically (tmp + fsync + rename + fsync dir)
    <unit>/mirror.img         the remote mirror image, volume_size bytes
    <unit>/journal/rj-N.seg   receive journal: the writes as they arrived, in seq order
    <unit>/history/hj-N.seg   history journal: before-images of what reached the mirror
    <unit>/unit.lock          flock()ed while the unit is open
    <unit>/points.log         consistent points (the host's barriers; see remote.points)

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

from firmware.record import HeaderFormat, IntegrityError
from firmware.record import crc32c as crc32c  # the unit's state file checks itself with it

FORMAT_VERSION = 1

RECEIVE_SEGMENT_MAGIC = b"MURJSEG1"
HISTORY_SEGMENT_MAGIC = b"MUHJSEG1"
# magic, version, flags, salt, segment number, created ns, crc
SEGMENT_HEADER = struct.Struct("<8sHHIQQI")
assert SEGMENT_HEADER.size == 36
SEGMENT_FORMATS = {
    magic: HeaderFormat("segment header", SEGMENT_HEADER, magic, FORMAT_VERSION)
    for magic in (RECEIVE_SEGMENT_MAGIC, HISTORY_SEGMENT_MAGIC)
}

RECORD_MAGIC = b"MURR"
# magic, version, kind, salt, seq, ts_ns, lbn, nblocks, payload_len, crc
RECORD = HeaderFormat("record", struct.Struct("<4sHHIQQQIII"), RECORD_MAGIC, FORMAT_VERSION)
RECORD_HEADER = RECORD.layout
assert RECORD_HEADER.size == 48

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
    head, _ = RECORD.pack(int(h.kind), h.salt, h.seq, h.ts, h.lbn, h.nblocks, h.payload_len,
                          payload=payload)
    return head + bytes(payload)


def decode_record_header(raw: bytes | memoryview, *, path: str | None = None,
                         offset: int | None = None) -> tuple[RecordHeader, int]:
    """Parse a header: it and the CRC it claims (checked by `RECORD.check` once the
    payload is read); IntegrityError when it is not a record header of this format."""
    kind, salt, seq, ts, lbn, nblocks, plen, crc = RECORD.unpack(raw, path=path, offset=offset)
    try:
        k = RecordKind(kind)
    except ValueError:
        raise IntegrityError(path, offset, f"unknown record kind {kind}") from None
    return RecordHeader(k, salt, seq, ts, lbn, nblocks, plen), crc


def encode_segment_header(magic: bytes, salt: int, number: int, created_ns: int) -> bytes:
    head, _ = SEGMENT_FORMATS[magic].pack(0, salt, number, created_ns)
    return head


@dataclass(frozen=True)
class SegmentHeader:
    salt: int
    number: int
    created_ns: int


def decode_segment_header(raw: bytes, magic: bytes, *, path: str | None = None
                          ) -> SegmentHeader:
    """The segment header in `raw`; IntegrityError unless it is valid with this magic."""
    _flags, salt, number, created, _crc = SEGMENT_FORMATS[magic].verify(raw, path=path,
                                                                       offset=0)
    return SegmentHeader(salt, number, created)
