"""On-disk format of the circular buffer queue (CBQ).

Layout of the queue file or partition (all integers little-endian):

    0            superblock slot 0            (SUPERBLOCK_SLOT bytes)
    4096         superblock slot 1
    8192         dirty map                    (one bit per volume chunk, padded to 4 KiB)
    ring_start   ring of records              (ring_size bytes, a multiple of `align`)

Superblock slots are written alternately; each is a fixed header (magic,
version, generation, body length, CRC32C) followed by a CBOR body with the
geometry and the last checkpoint.  The slot with the highest generation whose
CRC checks out is current, so a torn superblock write leaves the previous one.

Records are packed at RECORD_ALIGN boundaries inside a commit group; each
group starts at an `align` boundary so a group never rewrites a sector that
holds records of an earlier, already-synced group.  Every record header
carries the queue salt, the lap of the ring it was written in, its seq and
the CRC of the previous record (a chain), and a CRC32C over header and
payload.  A record left from an earlier lap, from before a crash, or torn by
a power cut fails one of those checks and ends the log.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from firmware.record import HeaderFormat, IntegrityError

SUPERBLOCK_MAGIC = b"MUCBQSB1"
SUPERBLOCK_SLOT = 4096
#: Version 2: the ring may hold BARRIER records.  A version-1 reader stops its log at the
#: first barrier (an unknown kind reads as the end of the log), so it must refuse the queue
#: outright instead: it does, as its superblock reader accepts version 1 only.  This code
#: writes version 2 and still opens a version-1 queue (it holds no barrier).
FORMAT_VERSION = 2
#: Superblock versions this code opens.
READABLE_FORMAT_VERSIONS = (1, 2)
_SUPERBLOCK_LAYOUT = struct.Struct("<8sHHQII")
# magic, version, flags, generation, body_len, crc
SUPERBLOCK = HeaderFormat("superblock", _SUPERBLOCK_LAYOUT, SUPERBLOCK_MAGIC, FORMAT_VERSION)
_SUPERBLOCK_READERS = {v: HeaderFormat("superblock", _SUPERBLOCK_LAYOUT, SUPERBLOCK_MAGIC, v)
                       for v in READABLE_FORMAT_VERSIONS}
SUPERBLOCK_HEADER = SUPERBLOCK.layout
assert SUPERBLOCK_HEADER.size == 28
DIRTY_MAP_OFFSET = 2 * SUPERBLOCK_SLOT

RECORD_MAGIC = 0x5243554D  # "MUCR"
RECORD_VERSION = 1
RECORD_ALIGN = 16
# magic, version, kind, flags, lap, salt, seq, timestamp_ns, lbn, nblocks,
# payload_len, ref_seq, cum_blocks, prev_crc, crc
RECORD = HeaderFormat("record", struct.Struct("<IBBHIIQQQIIQQII"), RECORD_MAGIC,
                      RECORD_VERSION)
RECORD_HEADER = RECORD.layout
assert RECORD_HEADER.size == 72


class RecordKind(enum.IntEnum):
    #: A write with its data.
    DATA = 1
    #: A write by block numbers only; data is read from the local mirror at send time.
    COMPACT = 2
    #: Before-image of blocks of a queued COMPACT record (`ref_seq`), copied on overwrite.
    SIDE = 3
    #: The rest of the ring is unused; the log continues at the ring's start.
    WRAP = 4
    #: The host declared its writes durable (FLUSH, SYNCHRONIZE CACHE or a completed FUA
    #: write): every write up to and including `seq` is covered.  No payload and no seq of
    #: its own, so senders and recovery skip it like SIDE; `flags` holds the command's
    #: nature (BARRIER_FLUSH, BARRIER_FUA).  A reader older than this kind stops the log
    #: at the first barrier, so a queue holding one must not be opened by older firmware.
    BARRIER = 5


#: Barrier flags: what the host sent.  The u16 `flags` of a BARRIER record holds these
#: bits, the front end in bits 4..7 and the command's opcode in bits 8..15 (see
#: `barrier_flags`); its `ref_seq` holds the front end's connection id.
BARRIER_FLUSH = 0x1
BARRIER_FUA = 0x2
#: Appended while some peer still needs a checksum resync: the instant is not consistent
#: on that peer until the resync completes.
BARRIER_IN_RESYNC = 0x4
BARRIER_KIND_MASK = 0x000F
_FRONT_END_SHIFT = 4
_OPCODE_SHIFT = 8


def barrier_flags(kind: int, front_end: int = 0, opcode: int = 0) -> int:
    """The u16 `flags` of a BARRIER record: `kind` bits, front end (0..15), opcode (0..255)."""
    if kind & ~BARRIER_KIND_MASK or not 0 <= front_end <= 0xF or not 0 <= opcode <= 0xFF:
        raise ValueError(f"barrier kind {kind:#x}, front end {front_end}, opcode {opcode:#x} "
                         "out of range")
    return kind | front_end << _FRONT_END_SHIFT | opcode << _OPCODE_SHIFT


def split_barrier_flags(flags: int) -> tuple[int, int, int]:
    """(kind bits, front end, opcode) of a BARRIER record's `flags`."""
    return (flags & BARRIER_KIND_MASK, flags >> _FRONT_END_SHIFT & 0xF,
            flags >> _OPCODE_SHIFT & 0xFF)


#: Kinds that are writes of the volume and take a new seq.
WRITE_KINDS = (RecordKind.DATA, RecordKind.COMPACT)


class Mode(enum.Enum):
    NORMAL = "normal"
    COMPACT = "compact"
    OVERFLOW = "overflow"


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RecordHeader:
    kind: RecordKind
    lap: int
    salt: int
    seq: int
    timestamp_ns: int
    lbn: int
    nblocks: int
    payload_len: int
    ref_seq: int
    cum_blocks: int
    prev_crc: int
    crc: int = 0
    flags: int = 0

    @property
    def length(self) -> int:
        """Bytes the record occupies in the ring, padding included."""
        return align_up(RECORD_HEADER.size + self.payload_len, RECORD_ALIGN)


def encode_record(h: RecordHeader,
                  payload: bytes | bytearray | memoryview = b"") -> tuple[bytes, int]:
    """Return (header bytes, crc).  The caller writes header, payload and padding."""
    assert len(payload) == h.payload_len
    return RECORD.pack(int(h.kind), h.flags, h.lap, h.salt, h.seq, h.timestamp_ns, h.lbn,
                       h.nblocks, h.payload_len, h.ref_seq, h.cum_blocks, h.prev_crc,
                       payload=payload)


def decode_header(raw: bytes | memoryview) -> RecordHeader | None:
    """Parse a header; None when it is not a record header at all (padding, say)."""
    try:
        (kind, flags, lap, salt, seq, ts, lbn, nblocks, plen, ref_seq, cum_blocks,
         prev_crc, crc) = RECORD.unpack(raw)
        k = RecordKind(kind)
    except (IntegrityError, ValueError):
        return None
    return RecordHeader(k, lap, salt, seq, ts, lbn, nblocks, plen, ref_seq, cum_blocks,
                        prev_crc, crc, flags)


def record_crc_ok(raw_header: bytes | memoryview, payload: bytes | memoryview) -> bool:
    return RECORD.crc_ok(raw_header, payload)


def encode_superblock(generation: int, body: bytes) -> bytes:
    if SUPERBLOCK_HEADER.size + len(body) > SUPERBLOCK_SLOT:
        raise ValueError(f"superblock body of {len(body)} bytes does not fit its slot")
    head, _ = SUPERBLOCK.pack(0, generation, len(body), payload=body)
    slot = head + body
    return slot + bytes(SUPERBLOCK_SLOT - len(slot))


def superblock_version(raw: bytes) -> int:
    """The format version a slot claims (0 when it is too short to claim one)."""
    return int(_SUPERBLOCK_LAYOUT.unpack_from(raw)[1]) if len(raw) >= _SUPERBLOCK_LAYOUT.size else 0


def decode_superblock(raw: bytes, offset: int | None = None) -> tuple[int, bytes]:
    """Return (generation, body) of a slot; IntegrityError when it is not valid."""
    # An unknown version gets this version's format, whose unpack refuses it by name.
    fmt = _SUPERBLOCK_READERS.get(superblock_version(raw), SUPERBLOCK)
    _flags, gen, blen, _crc = fmt.unpack(raw, offset=offset)
    if SUPERBLOCK_HEADER.size + blen > SUPERBLOCK_SLOT:
        raise IntegrityError(None, offset, f"superblock body length {blen} out of bounds")
    body = raw[SUPERBLOCK_HEADER.size:SUPERBLOCK_HEADER.size + blen]
    fmt.check(raw, body, offset=offset)
    return gen, bytes(body)
