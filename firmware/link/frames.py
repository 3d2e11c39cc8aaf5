"""Journey-link frame codec (sans-IO).

Wire layout of one frame (all integers big-endian)::

    +----------------+---------------------------+----------------------------+
    | length: u32    | body: `length` bytes      | crc: u32                   |
    |                | one CBOR map with "type"  | CRC32C(length bytes + body)|
    +----------------+---------------------------+----------------------------+

The CRC covers the length prefix too, so a corrupted length can never pair with a
body that happens to check out.  A length above `MAX_FRAME_BODY` is refused as soon
as the four length bytes arrive, before any of the body is buffered.

WRITES frames do not carry one CBOR item per record's data: the record headers are a
list of ``[seq, ts, lbn, length]`` and the data of all records is one ``payload`` byte
string, compressed as a whole with the batch's codec.  One compression stream per
batch compresses many small block writes far better than one per record.

A record with a fifth element, ``[first, ts, 0, 0, last]``, is a SKIP: the local
queue discarded seqs first..last, so they carry nothing, yet the remote must consume
them to keep its seq stream contiguous (and replays of them idempotent).

A record of six, ``[seq, ts, flags, connection, cum_blocks, 1]``, is a BARRIER: the
host declared every write up to and including `seq` durable (a FLUSH, a SYNCHRONIZE
CACHE, a completed FUA write) at `ts`; `flags` are the local queue's barrier flags
(kind, front end, opcode), `cum_blocks` the blocks written by every seq up to `seq`.
It has no seq of its own, so its seq may equal the record's before it, and no data.
A sender puts barriers in a batch only when HELLO_ACK said ``barriers``: a remote
that does not know them is still served, without them.

`FrameDecoder.receive_data` turns bytes into frozen dataclass frames; any malformed
input raises `LinkProtocolError` with a reason and poisons the decoder.  Bodies are
decoded by `firmware.cbor_strict`, never by a general CBOR decoder: a body comes from a
peer, possibly one without a certificate, and cbor2's tags and unbounded containers
let a few hundred bytes stop the whole process.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import crc32c
import zstandard as _zstd
from blake3 import blake3 as _blake3

from firmware.cbor_strict import CborDecodeError
from firmware.cbor_strict import loads as _strict_loads
from firmware.lineage import Lineage, LineageError
from firmware.link.errors import LinkProtocolError

#: 2: chunk and batch digests are BLAKE3-256 (1 had BLAKE2b-256; the two do not mix, so a
#: peer that offers only 1 is refused with ERR_VERSION and told why).
PROTOCOL_VERSION = 2

FRAME_LENGTH = struct.Struct(">I")
assert FRAME_LENGTH.size == 4
FRAME_CRC = struct.Struct(">I")
assert FRAME_CRC.size == 4
#: Bytes a frame adds around its CBOR body.
FRAME_OVERHEAD = FRAME_LENGTH.size + FRAME_CRC.size

#: Largest CBOR body accepted on the wire.
MAX_FRAME_BODY = 8 * 1024 * 1024
#: Largest sum of record data in one WRITES batch after decompression; bounds what a
#: small compressed payload may expand to.
MAX_BATCH_DATA = 32 * 1024 * 1024
#: Room left in a frame for the CBOR around a batch's payload (record headers etc.).
WRITES_HEADER_ALLOWANCE = 64 * 1024
MAX_U64 = (1 << 64) - 1
MAX_TEXT = 4096

CODEC_NONE = "none"
CODEC_ZLIB = "zlib"
CODEC_ZSTD = "zstd"

#: Record header as hashed for the batch digest: seq, ts, lbn, data length.
DIGEST_RECORD = struct.Struct(">QQQI")
assert DIGEST_RECORD.size == 28
#: A barrier as hashed: seq, ts, flags, connection, cum_blocks, DIGEST_BARRIER_LENGTH.
DIGEST_BARRIER = struct.Struct(">QQHQQI")
assert DIGEST_BARRIER.size == 38
DIGEST_SIZE = 32
DIGEST_SKIP_LENGTH = 0xFFFFFFFF
DIGEST_BARRIER_LENGTH = 0xFFFFFFFE
#: The last element of a six-element record: what kind of record it is.
RECORD_BARRIER = 1


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The strong digest both ends compare to decide a resync chunk is equal: BLAKE3-256,
    about three times BLAKE2b's speed per core (SIMD), which is what keeps a verify of
    dense data near the disk's read speed.  It releases the GIL while it hashes."""
    return _blake3(data).digest()


@dataclass(frozen=True)
class WriteRecord:
    """One write of the local volume, as the CBQ numbered it (or a SKIP, see below)."""

    seq: int
    lbn: int
    data: bytes
    #: Time of the write in nanoseconds since the epoch (informational; history uses it).
    ts: int
    #: Nonzero: this is no write but a SKIP of seqs `seq`..`skip_last`, which the
    #: local queue discarded; `lbn` is 0 and `data` empty.
    skip_last: int = 0
    #: True: this is no write but a BARRIER covering every write up to `seq`; `lbn` is
    #: 0 and `data` empty; the three fields below describe it.
    barrier: bool = False
    #: The local queue's barrier flags (kind, front end, opcode; see cbq.format).
    flags: int = 0
    #: The front end's connection the barrier came on.
    connection: int = 0
    #: Blocks written by every seq up to `seq`, as the local queue counts them.
    cum_blocks: int = 0

    @property
    def is_skip(self) -> bool:
        return self.skip_last != 0

    @property
    def is_write(self) -> bool:
        return not self.skip_last and not self.barrier

    @property
    def last_seq(self) -> int:
        """The last seq this record accounts for."""
        return self.skip_last or self.seq


def barrier_record(seq: int, ts: int, flags: int, connection: int = 0,
                   cum_blocks: int = 0) -> WriteRecord:
    """A BARRIER covering every write up to `seq`."""
    if not 0 <= seq <= MAX_U64 or not 0 <= flags <= 0xFFFF:
        raise ValueError(f"barrier seq {seq} / flags {flags:#x} out of range")
    return WriteRecord(seq=seq, lbn=0, data=b"", ts=ts, barrier=True, flags=flags,
                       connection=connection, cum_blocks=cum_blocks)


def skip_record(first: int, last: int, ts: int) -> WriteRecord:
    """A SKIP of the discarded seqs first..last."""
    if not 0 < first <= last <= MAX_U64:
        raise ValueError(f"skip range {first}..{last} is not 1 <= first <= last")
    return WriteRecord(seq=first, lbn=0, data=b"", ts=ts, skip_last=last)


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    unit_id: str
    volume_size: int
    block_size: int
    #: Last seq the local knows the remote made durable (the local's view).
    resume_seq: int
    #: Codecs the local offers, in its order of preference.
    compression: tuple[str, ...]
    #: The local asks for the digest handshake (DIGEST / COMMIT / ABORT per batch).
    signature: bool
    #: Identity of the local queue the seqs come from (the CBQ's random salt).  A
    #: re-created queue starts its seqs again, so a remote that knew another queue
    #: must not take them as a continuation.  None: not told (field absent).
    queue_id: int | None = None
    #: The sender copy's generations; None: an older peer that keeps none (it holds a
    #: first generation only).
    lineage: Lineage | None = None
    #: The newest seq the sender holds (written, queued or not); None: not told, take
    #: `resume_seq`.
    last_seq: int | None = None
    #: The sender can put BARRIER records in its batches (absent: False).
    barriers: bool = False


@dataclass(frozen=True)
class HelloAck:
    version: int
    compression: str
    signature: bool
    #: The remote's last durable seq: where the local resumes.
    durable_seq: int
    #: The remote holds seqs of another queue than HELLO's: it takes nothing but a
    #: full checksum resync, after which it follows the new queue's seqs.
    requeue: bool = False
    #: The remote takes BARRIER records (only when HELLO offered them; absent: False).
    barriers: bool = False


@dataclass(frozen=True)
class Writes:
    batch_id: int
    codec: str
    records: tuple[WriteRecord, ...]


@dataclass(frozen=True)
class Ack:
    durable_seq: int


@dataclass(frozen=True)
class Digest:
    batch_id: int
    digest: bytes


@dataclass(frozen=True)
class Commit:
    batch_id: int


@dataclass(frozen=True)
class Abort:
    batch_id: int
    reason: str


@dataclass(frozen=True)
class Ping:
    nonce: int


@dataclass(frozen=True)
class Pong:
    nonce: int


@dataclass(frozen=True)
class ErrorFrame:
    code: str
    text: str


@dataclass(frozen=True)
class Bye:
    pass


@dataclass(frozen=True)
class ResyncStart:
    """Local -> remote: a checksum resync (or, with `verify`, a comparison that moves
    no data) begins.  When it ends the remote image will equal the local volume as
    of right after `seq` once the writes after `seq` are applied."""

    resync_id: int
    verify: bool
    seq: int
    chunk_size: int
    #: Chunks the local will ask digests for (informational, for progress).
    chunk_total: int


@dataclass(frozen=True)
class DigestRequest:
    """Local -> remote: send the digests of these chunks of your mirror."""

    resync_id: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class ChunkDigests:
    """Remote -> local: BLAKE3-256 digests of the chunks of one `DigestRequest`."""

    resync_id: int
    chunks: tuple[int, ...]
    digests: tuple[bytes, ...]


@dataclass(frozen=True)
class ChunkData:
    """Local -> remote: the contents of a chunk whose digests differ."""

    resync_id: int
    chunk: int
    codec: str
    data: bytes


@dataclass(frozen=True)
class ResyncEnd:
    resync_id: int
    seq: int


@dataclass(frozen=True)
class ResyncDone:
    """Remote -> local: the resync is complete (its durable seq is now `seq`), or
    the verify is over."""

    resync_id: int
    seq: int
    chunks_written: int


@dataclass(frozen=True)
class FailbackStart:
    """Local -> remote, before any HELLO: this copy gives up its writes since the remote
    was promoted off its generation and asks to become equal to the remote's mirror
    (docs/failover.md).  The remote stops its own host's writes and answers a plan."""

    unit_id: str
    lineage: Lineage
    #: Codecs the local takes for CHUNK data, in its order of preference.
    compression: tuple[str, ...]


@dataclass(frozen=True)
class FailbackPlan:
    """Remote -> local: what differs may only lie in the chunks set in `changed` (the
    remote host's writes since the promotion) or in the local's own writes after the
    fork; `dropped` marks the chunks of writes the remote received from the local and
    dropped or undid when it was promoted (the local's writes there are no longer in
    the remote's image).  Bitmaps of `chunk_count` bits, chunk c in byte c // 8, bit
    c % 8."""

    resync_id: int
    #: the remote copy's seq (in the local queue's numbering) and lineage
    seq: int
    lineage: Lineage
    chunk_size: int
    chunk_count: int
    changed: bytes
    dropped: bytes
    #: the codec the remote's CHUNK frames use
    codec: str


@dataclass(frozen=True)
class ChunkWant:
    """Local -> remote, during a failback: send the contents of these chunks."""

    resync_id: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class FailbackCommit:
    """Local -> remote: the local now holds the remote's image; from here on the local
    is the primary of `lineage` (a generation forked off the remote's at `seq`) and the
    remote follows it from `seq`.  Answered by RESYNC_DONE."""

    resync_id: int
    seq: int
    lineage: Lineage


@dataclass(frozen=True)
class SwitchoverStart:
    """Local -> remote, before any HELLO: a planned role reversal.  The local has stopped
    its host and drained its queue up to `seq`; the remote is to become the primary at
    exactly that seq (docs/failover.md)."""

    unit_id: str
    lineage: Lineage
    seq: int


@dataclass(frozen=True)
class SwitchoverDone:
    """Remote -> local: promoted at `seq`; `lineage` is the remote's, the local follows it."""

    unit_id: str
    seq: int
    lineage: Lineage


@dataclass(frozen=True)
class ConfigPut:
    """Keep this sealed config backup of unit `unit_id` (the sender's own: a unit
    only ever stores its own backup with a peer)."""

    unit_id: str
    blob: bytes


@dataclass(frozen=True)
class ConfigGet:
    """Send back the sealed config backup of unit `unit_id` (the asker's own)."""

    unit_id: str


@dataclass(frozen=True)
class ConfigBlob:
    """The answer to CONFIG_GET: the backup, or None when this peer holds none."""

    unit_id: str
    blob: bytes | None


@dataclass(frozen=True)
class RecoverHello:
    """An unauthenticated client (no certificate) asks to recover a unit's config
    backup; `unit_id` None: the only backup this peer keeps."""

    unit_id: str | None


KDF_SCRYPT = "scrypt"
KDF_ARGON2ID = "argon2id"
#: The most memory a RECOVER_CHALLENGE may name (KiB); the KDF's own bound is lower.
MAX_RECOVER_KDF_KIB = 1 << 22


@dataclass(frozen=True)
class RecoverChallenge:
    """The sealed backup's key derivation inputs (its header's, never its key
    check) and a fresh nonce the proof must cover."""

    unit_id: str
    #: "scrypt" (cost: log2 N, r, p) or "argon2id" (cost: memory KiB, passes, lanes).
    kdf: str
    cost: tuple[int, int, int]
    salt: bytes
    nonce: bytes


@dataclass(frozen=True)
class RecoverProof:
    """HMAC over the challenge keyed by the backup's key check (see recovery.py)."""

    proof: bytes


@dataclass(frozen=True)
class PairOffer:
    """An unauthenticated client (a local the remote has not pinned) offers its
    certificate; the remote pins it only if the remote's own config lists its
    SHA-256 (see pairing.py)."""

    unit_id: str
    cert_der: bytes


@dataclass(frozen=True)
class Paired:
    """The answer to PAIR_OFFER: the certificate is pinned here as `unit_id`."""

    unit_id: str


Frame = (
    Hello | HelloAck | Writes | Ack | Digest | Commit | Abort | Ping | Pong | ErrorFrame | Bye
    | ResyncStart | DigestRequest | ChunkDigests | ChunkData | ResyncEnd | ResyncDone
    | ConfigPut | ConfigGet | ConfigBlob | RecoverHello | RecoverChallenge | RecoverProof
    | PairOffer | Paired | FailbackStart | FailbackPlan | ChunkWant | FailbackCommit
    | SwitchoverStart | SwitchoverDone
)

#: Sizes in the recovery exchange.
RECOVER_SALT_BYTES = 16
RECOVER_NONCE_BYTES = 32
RECOVER_PROOF_BYTES = 32

#: Largest sealed config accepted: a config slot is 64 KiB, sealing adds ~100 bytes.
MAX_CONFIG_BLOB = 256 * 1024

#: Largest certificate a PAIR_OFFER may carry (a unit's P-256 one is ~400 bytes).
MAX_PAIR_CERT = 8 * 1024
#: Largest frame body a client without a certificate may send: its exchanges
#: (recovery, pairing) are all small, so anything bigger is refused at its length.
MAX_ANONYMOUS_BODY = 16 * 1024

#: Chunks named in one DIGEST_REQ / CHUNK_DIGESTS frame.
MAX_DIGEST_CHUNKS = 1024

#: Records in one WRITES frame.  A sender's batch holds at most batch_bytes (< 8 MiB)
#: of writes, each a whole number of blocks of at least 512 bytes, and at most one SKIP
#: before each write and one at the end: 2 * 16,256 + 1 records at the very most.
MAX_WRITES_RECORDS = 32 * 1024
#: A lineage nests deepest: body map, lineage map, history list, generation map (a
#: WRITES record list is three deep).
MAX_BODY_DEPTH = 4
#: Items in one body (every array element, map key and value): a full WRITES frame of
#: SKIP records (six items each) and its few fields.
MAX_BODY_ITEMS = 6 * MAX_WRITES_RECORDS + 64
#: Largest resync chunk accepted (the store's chunks are 64 KiB).
MAX_CHUNK_DATA = 1024 * 1024


# --------------------------------------------------------------------------- compression


def available_codecs() -> tuple[str, ...]:
    """Codecs this build can encode and decode, best first."""
    return (CODEC_ZSTD, CODEC_ZLIB, CODEC_NONE)


#: The codec preferences an operator picks from: every codec, best first, or one.
CODEC_PREFERENCES = ("auto", CODEC_ZSTD, CODEC_ZLIB, CODEC_NONE)


def codec_offer(preference: str) -> tuple[str, ...]:
    """What a sender offers at HELLO for a preference: `auto` offers every codec (the
    remote takes the best it has), a codec offers itself and none, `none` only none."""
    if preference == "auto":
        return available_codecs()
    if preference not in CODEC_PREFERENCES:
        raise ValueError(f"compression {preference!r} is not one of "
                         f"{', '.join(CODEC_PREFERENCES)}")
    return (preference,) if preference == CODEC_NONE else (preference, CODEC_NONE)


def compress(codec: str, data: bytes) -> bytes:
    if codec == CODEC_NONE:
        return data
    if codec == CODEC_ZLIB:
        # Level 1: the link is usually CPU-bound on a Pi before it is bandwidth-bound.
        return zlib.compress(data, 1)
    if codec == CODEC_ZSTD:
        return _zstd.ZstdCompressor(level=3).compress(data)
    raise LinkProtocolError(f"codec {codec!r} is not available")


def decompress(codec: str, data: bytes, expected: int) -> bytes:
    """Decompress to exactly `expected` bytes, never producing more than that plus one."""
    if codec == CODEC_NONE:
        out = data
    elif codec == CODEC_ZLIB:
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, expected + 1)
        except zlib.error as exc:
            raise LinkProtocolError(f"zlib payload does not decompress: {exc}") from None
        if len(out) > expected:
            raise LinkProtocolError(
                f"zlib payload expands past the {expected} bytes the records declare"
            )
        if not d.eof or d.unconsumed_tail or d.unused_data:
            raise LinkProtocolError("zlib payload is truncated or has trailing data")
    elif codec == CODEC_ZSTD:
        try:
            with _zstd.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                out = reader.read(expected + 1)
        except _zstd.ZstdError as exc:
            raise LinkProtocolError(f"zstd payload does not decompress: {exc}") from None
    else:
        raise LinkProtocolError(f"unknown codec {codec!r}")
    if len(out) != expected:
        raise LinkProtocolError(
            f"payload is {len(out)} bytes after {codec} decompression, records declare {expected}"
        )
    return out


def batch_digest(records: Sequence[WriteRecord]) -> bytes:
    """BLAKE3-256 over the uncompressed batch, as both ends see it after decoding."""
    h = _blake3()
    for r in records:
        if r.is_skip:
            # No write can be that long (MAX_BATCH_DATA), so this marks a skip.
            h.update(DIGEST_RECORD.pack(r.seq, r.ts, r.skip_last, DIGEST_SKIP_LENGTH))
            continue
        if r.barrier:
            h.update(DIGEST_BARRIER.pack(r.seq, r.ts, r.flags, r.connection, r.cum_blocks,
                                         DIGEST_BARRIER_LENGTH))
            continue
        h.update(DIGEST_RECORD.pack(r.seq, r.ts, r.lbn, len(r.data)))
        h.update(r.data)
    return h.digest()


# --------------------------------------------------------------------------- encoding


def _writes_map(frame: Writes) -> dict[str, Any]:
    payload = compress(frame.codec, b"".join(r.data for r in frame.records))
    return {
        "type": "WRITES",
        "batch": frame.batch_id,
        "codec": frame.codec,
        "recs": [[r.seq, r.ts, 0, 0, r.skip_last] if r.is_skip
                 else [r.seq, r.ts, r.flags, r.connection, r.cum_blocks, RECORD_BARRIER]
                 if r.barrier else [r.seq, r.ts, r.lbn, len(r.data)] for r in frame.records],
        "payload": payload,
    }


def _frame_map(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Hello):
        return {
            "type": "HELLO",
            "versions": list(frame.versions),
            "unit": frame.unit_id,
            "size": frame.volume_size,
            "bs": frame.block_size,
            "resume": frame.resume_seq,
            "compression": list(frame.compression),
            "signature": frame.signature,
            **({} if frame.queue_id is None else {"queue": frame.queue_id}),
            **({} if frame.lineage is None else {"lineage": frame.lineage.to_dict()}),
            **({} if frame.last_seq is None else {"last": frame.last_seq}),
            **({"barriers": True} if frame.barriers else {}),
        }
    if isinstance(frame, HelloAck):
        return {
            "type": "HELLO_ACK",
            "version": frame.version,
            "compression": frame.compression,
            "signature": frame.signature,
            "durable": frame.durable_seq,
            **({"requeue": True} if frame.requeue else {}),
            **({"barriers": True} if frame.barriers else {}),
        }
    if isinstance(frame, Writes):
        return _writes_map(frame)
    if isinstance(frame, Ack):
        return {"type": "ACK", "durable": frame.durable_seq}
    if isinstance(frame, Digest):
        return {"type": "DIGEST", "batch": frame.batch_id, "digest": frame.digest}
    if isinstance(frame, Commit):
        return {"type": "COMMIT", "batch": frame.batch_id}
    if isinstance(frame, Abort):
        return {"type": "ABORT", "batch": frame.batch_id, "reason": frame.reason}
    if isinstance(frame, Ping):
        return {"type": "PING", "nonce": frame.nonce}
    if isinstance(frame, Pong):
        return {"type": "PONG", "nonce": frame.nonce}
    if isinstance(frame, ErrorFrame):
        return {"type": "ERROR", "code": frame.code, "text": frame.text}
    if isinstance(frame, Bye):
        return {"type": "BYE"}
    if isinstance(frame, ResyncStart):
        return {"type": "RESYNC_START", "rid": frame.resync_id, "verify": frame.verify,
                "seq": frame.seq, "chunk": frame.chunk_size, "total": frame.chunk_total}
    if isinstance(frame, DigestRequest):
        return {"type": "DIGEST_REQ", "rid": frame.resync_id, "chunks": list(frame.chunks)}
    if isinstance(frame, ChunkDigests):
        return {"type": "CHUNK_DIGESTS", "rid": frame.resync_id, "chunks": list(frame.chunks),
                "digests": b"".join(frame.digests)}
    if isinstance(frame, ChunkData):
        return {"type": "CHUNK", "rid": frame.resync_id, "chunk": frame.chunk,
                "codec": frame.codec, "len": len(frame.data),
                "data": compress(frame.codec, frame.data)}
    if isinstance(frame, ResyncEnd):
        return {"type": "RESYNC_END", "rid": frame.resync_id, "seq": frame.seq}
    if isinstance(frame, ResyncDone):
        return {"type": "RESYNC_DONE", "rid": frame.resync_id, "seq": frame.seq,
                "written": frame.chunks_written}
    if isinstance(frame, ConfigPut | ConfigBlob) and frame.blob is not None \
            and len(frame.blob) > MAX_CONFIG_BLOB:
        raise LinkProtocolError(
            f"config backup of {len(frame.blob)} bytes, limit {MAX_CONFIG_BLOB}")
    if isinstance(frame, ConfigPut):
        return {"type": "CONFIG_PUT", "unit": frame.unit_id, "blob": frame.blob}
    if isinstance(frame, ConfigGet):
        return {"type": "CONFIG_GET", "unit": frame.unit_id}
    if isinstance(frame, ConfigBlob):
        return {"type": "CONFIG_BLOB", "unit": frame.unit_id, "blob": frame.blob}
    if isinstance(frame, RecoverHello):
        return {"type": "RECOVER_HELLO", "unit": frame.unit_id}
    if isinstance(frame, RecoverChallenge):
        a, b, c = frame.cost
        # scrypt challenges keep the keys units understood before Argon2id.
        cost: dict[str, Any] = {"ln": a, "r": b, "p": c} if frame.kdf == KDF_SCRYPT \
            else {"kdf": frame.kdf, "m": a, "t": b, "p": c}
        return {"type": "RECOVER_CHALLENGE", "unit": frame.unit_id, **cost,
                "salt": frame.salt, "nonce": frame.nonce}
    if isinstance(frame, RecoverProof):
        return {"type": "RECOVER_PROOF", "proof": frame.proof}
    if isinstance(frame, PairOffer):
        return {"type": "PAIR_OFFER", "unit": frame.unit_id, "cert": frame.cert_der}
    if isinstance(frame, Paired):
        return {"type": "PAIRED", "unit": frame.unit_id}
    if isinstance(frame, FailbackStart):
        return {"type": "FAILBACK_START", "unit": frame.unit_id,
                "lineage": frame.lineage.to_dict(), "compression": list(frame.compression)}
    if isinstance(frame, FailbackPlan):
        return {"type": "FAILBACK_PLAN", "rid": frame.resync_id, "seq": frame.seq,
                "lineage": frame.lineage.to_dict(), "chunk": frame.chunk_size,
                "count": frame.chunk_count, "changed": frame.changed,
                "dropped": frame.dropped, "codec": frame.codec}
    if isinstance(frame, ChunkWant):
        return {"type": "CHUNK_WANT", "rid": frame.resync_id, "chunks": list(frame.chunks)}
    if isinstance(frame, SwitchoverStart | SwitchoverDone):
        return {"type": "SWITCHOVER_START" if isinstance(frame, SwitchoverStart)
                else "SWITCHOVER_DONE", "unit": frame.unit_id, "seq": frame.seq,
                "lineage": frame.lineage.to_dict()}
    if isinstance(frame, FailbackCommit):
        return {"type": "FAILBACK_COMMIT", "rid": frame.resync_id, "seq": frame.seq,
                "lineage": frame.lineage.to_dict()}
    raise TypeError(f"not a frame: {frame!r}")


def encode_body(body: bytes) -> bytes:
    """Wrap an already-encoded CBOR body in length prefix and CRC (tests use it for
    hand-made bodies)."""
    head = FRAME_LENGTH.pack(len(body))
    return head + body + FRAME_CRC.pack(crc32c.crc32c(head + body))


def encode_frame(frame: Frame) -> bytes:
    body = cbor2.dumps(_frame_map(frame))
    if len(body) > MAX_FRAME_BODY:
        raise LinkProtocolError(
            f"{type(frame).__name__} frame body is {len(body)} bytes, limit {MAX_FRAME_BODY}"
        )
    return encode_body(body)


# --------------------------------------------------------------------------- decoding


def _field(m: dict[Any, Any], key: str, ftype: str) -> Any:
    if key not in m:
        raise LinkProtocolError(f"{ftype} frame lacks field {key!r}")
    return m[key]


def _u64(m: dict[Any, Any], key: str, ftype: str) -> int:
    v = _field(m, key, ftype)
    # bool is an int subclass in Python; CBOR true/false is not a number.
    if type(v) is not int or not 0 <= v <= MAX_U64:
        raise LinkProtocolError(f"{ftype} field {key!r} must be an unsigned 64-bit integer")
    return v


def _text(m: dict[Any, Any], key: str, ftype: str, limit: int = MAX_TEXT) -> str:
    v = _field(m, key, ftype)
    if type(v) is not str or len(v) > limit:
        raise LinkProtocolError(f"{ftype} field {key!r} must be text of at most {limit} chars")
    return v


def _bool(m: dict[Any, Any], key: str, ftype: str) -> bool:
    v = _field(m, key, ftype)
    if type(v) is not bool:
        raise LinkProtocolError(f"{ftype} field {key!r} must be a boolean")
    return v


def _bytes(m: dict[Any, Any], key: str, ftype: str) -> bytes:
    v = _field(m, key, ftype)
    if type(v) is not bytes:
        raise LinkProtocolError(f"{ftype} field {key!r} must be a byte string")
    return v


def _list(m: dict[Any, Any], key: str, ftype: str, limit: int) -> list[Any]:
    v = _field(m, key, ftype)
    if type(v) is not list or len(v) > limit:
        raise LinkProtocolError(f"{ftype} field {key!r} must be an array of at most {limit}")
    return v


def _decode_hello(m: dict[Any, Any]) -> Hello:
    versions = _list(m, "versions", "HELLO", 16)
    if not versions or any(type(v) is not int or not 0 < v <= 0xFFFF for v in versions):
        raise LinkProtocolError("HELLO field 'versions' must list protocol versions 1..65535")
    codecs = _list(m, "compression", "HELLO", 16)
    if any(type(c) is not str or len(c) > 32 for c in codecs):
        raise LinkProtocolError("HELLO field 'compression' must list codec names")
    unit = _text(m, "unit", "HELLO", 128)
    if not unit:
        raise LinkProtocolError("HELLO field 'unit' must not be empty")
    return Hello(
        versions=tuple(versions),
        unit_id=unit,
        volume_size=_u64(m, "size", "HELLO"),
        block_size=_u64(m, "bs", "HELLO"),
        resume_seq=_u64(m, "resume", "HELLO"),
        compression=tuple(codecs),
        signature=_bool(m, "signature", "HELLO"),
        queue_id=_u64(m, "queue", "HELLO") if "queue" in m else None,
        lineage=_lineage(m, "HELLO") if "lineage" in m else None,
        last_seq=_u64(m, "last", "HELLO") if "last" in m else None,
        barriers=_bool(m, "barriers", "HELLO") if "barriers" in m else False,
    )


def _lineage(m: dict[Any, Any], ftype: str) -> Lineage:
    try:
        return Lineage.from_dict(_field(m, "lineage", ftype))
    except LineageError as exc:
        raise LinkProtocolError(f"{ftype} field 'lineage': {exc}") from None


def _decode_hello_ack(m: dict[Any, Any]) -> HelloAck:
    return HelloAck(
        version=_u64(m, "version", "HELLO_ACK"),
        compression=_text(m, "compression", "HELLO_ACK", 32),
        signature=_bool(m, "signature", "HELLO_ACK"),
        durable_seq=_u64(m, "durable", "HELLO_ACK"),
        requeue=_bool(m, "requeue", "HELLO_ACK") if "requeue" in m else False,
        barriers=_bool(m, "barriers", "HELLO_ACK") if "barriers" in m else False,
    )


def _decode_writes(m: dict[Any, Any]) -> Writes:
    batch_id = _u64(m, "batch", "WRITES")
    codec = _text(m, "codec", "WRITES", 32)
    recs = _list(m, "recs", "WRITES", MAX_WRITES_RECORDS)
    payload = _bytes(m, "payload", "WRITES")
    if not recs:
        raise LinkProtocolError("WRITES frame carries no records")
    headers: list[tuple[int, ...]] = []
    total = 0
    prev_seq = -1
    for i, rec in enumerate(recs):
        if (
            type(rec) is not list
            or len(rec) not in (4, 5, 6)
            or any(type(x) is not int or not 0 <= x <= MAX_U64 for x in rec)
        ):
            raise LinkProtocolError(
                f"WRITES record {i} must be [seq, ts, lbn, length], "
                f"[first, ts, 0, 0, last] or [seq, ts, flags, connection, cum, 1] of u64")
        if len(rec) == 6:
            seq, _ts, flags, _conn, _cum, kind = rec
            if kind != RECORD_BARRIER or flags > 0xFFFF:
                raise LinkProtocolError(
                    f"WRITES record {i}: a barrier must be [seq, ts, flags, connection, "
                    f"cum, {RECORD_BARRIER}] with 16-bit flags")
            # No seq of its own: it covers the write before it, or one of an earlier batch.
            if seq < prev_seq:
                raise LinkProtocolError(
                    f"WRITES record {i}: barrier seq {seq} is before {prev_seq}")
            prev_seq = seq
            headers.append(tuple(rec))
            continue
        seq, ts, lbn, length = rec[:4]
        last = rec[4] if len(rec) == 5 else 0
        if len(rec) == 5 and (lbn or length or not 0 < seq <= last):
            raise LinkProtocolError(
                f"WRITES record {i}: a skip must be [first, ts, 0, 0, last], 0 < first <= last")
        if seq <= prev_seq:
            raise LinkProtocolError(f"WRITES record {i}: seq {seq} does not follow {prev_seq}")
        prev_seq = last or seq
        total += length
        if total > MAX_BATCH_DATA:
            raise LinkProtocolError(f"WRITES batch data exceeds {MAX_BATCH_DATA} bytes")
        headers.append((seq, ts, lbn, length, last))
    data = decompress(codec, payload, total)
    records = []
    off = 0
    for h in headers:
        if len(h) == 6:
            seq, ts, flags, conn, cum, _ = h
            records.append(barrier_record(seq, ts, flags, conn, cum))
            continue
        seq, ts, lbn, length, last = h
        records.append(WriteRecord(seq=seq, lbn=lbn, data=data[off : off + length], ts=ts,
                                   skip_last=last))
        off += length
    return Writes(batch_id=batch_id, codec=codec, records=tuple(records))


def _decode_digest(m: dict[Any, Any]) -> Digest:
    digest = _bytes(m, "digest", "DIGEST")
    if len(digest) != DIGEST_SIZE:
        raise LinkProtocolError(f"DIGEST must be {DIGEST_SIZE} bytes, got {len(digest)}")
    return Digest(batch_id=_u64(m, "batch", "DIGEST"), digest=digest)


def _chunk_list(m: dict[Any, Any], ftype: str) -> tuple[int, ...]:
    chunks = _list(m, "chunks", ftype, MAX_DIGEST_CHUNKS)
    if any(type(c) is not int or not 0 <= c <= MAX_U64 for c in chunks):
        raise LinkProtocolError(f"{ftype} field 'chunks' must list chunk numbers")
    return tuple(chunks)


def _decode_resync_start(m: dict[Any, Any]) -> ResyncStart:
    chunk_size = _u64(m, "chunk", "RESYNC_START")
    if not 0 < chunk_size <= MAX_CHUNK_DATA:
        raise LinkProtocolError(f"RESYNC_START chunk size {chunk_size} outside 1..{MAX_CHUNK_DATA}")
    return ResyncStart(
        resync_id=_u64(m, "rid", "RESYNC_START"),
        verify=_bool(m, "verify", "RESYNC_START"),
        seq=_u64(m, "seq", "RESYNC_START"),
        chunk_size=chunk_size,
        chunk_total=_u64(m, "total", "RESYNC_START"),
    )


def _decode_chunk_digests(m: dict[Any, Any]) -> ChunkDigests:
    chunks = _chunk_list(m, "CHUNK_DIGESTS")
    blob = _bytes(m, "digests", "CHUNK_DIGESTS")
    if len(blob) != DIGEST_SIZE * len(chunks):
        raise LinkProtocolError(
            f"CHUNK_DIGESTS has {len(blob)} digest bytes for {len(chunks)} chunks"
        )
    return ChunkDigests(
        resync_id=_u64(m, "rid", "CHUNK_DIGESTS"),
        chunks=chunks,
        digests=tuple(blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in range(len(chunks))),
    )


def _decode_failback_start(m: dict[Any, Any]) -> FailbackStart:
    codecs = _list(m, "compression", "FAILBACK_START", 8)
    if any(type(c) is not str or len(c) > 32 for c in codecs):
        raise LinkProtocolError("FAILBACK_START field 'compression' must list codec names")
    return FailbackStart(_config_unit(m, "FAILBACK_START"), _lineage(m, "FAILBACK_START"),
                         tuple(codecs))


#: Largest volume a failback plan describes: its bitmaps must fit one frame.
MAX_PLAN_CHUNKS = (MAX_FRAME_BODY - 64 * 1024) // 2 * 8


def _decode_failback_plan(m: dict[Any, Any]) -> FailbackPlan:
    chunk_size = _u64(m, "chunk", "FAILBACK_PLAN")
    if not 0 < chunk_size <= MAX_CHUNK_DATA:
        raise LinkProtocolError(
            f"FAILBACK_PLAN chunk size {chunk_size} outside 1..{MAX_CHUNK_DATA}")
    count = _u64(m, "count", "FAILBACK_PLAN")
    if not 0 < count <= MAX_PLAN_CHUNKS:
        raise LinkProtocolError(f"FAILBACK_PLAN of {count} chunks, limit {MAX_PLAN_CHUNKS}")
    maps = []
    for key in ("changed", "dropped"):
        bits = _bytes(m, key, "FAILBACK_PLAN")
        if len(bits) != (count + 7) // 8:
            raise LinkProtocolError(
                f"FAILBACK_PLAN bitmap {key!r} of {len(bits)} bytes for {count} chunks")
        maps.append(bits)
    return FailbackPlan(
        resync_id=_u64(m, "rid", "FAILBACK_PLAN"), seq=_u64(m, "seq", "FAILBACK_PLAN"),
        lineage=_lineage(m, "FAILBACK_PLAN"), chunk_size=chunk_size, chunk_count=count,
        changed=maps[0], dropped=maps[1], codec=_text(m, "codec", "FAILBACK_PLAN", 32))


def _decode_chunk(m: dict[Any, Any]) -> ChunkData:
    length = _u64(m, "len", "CHUNK")
    if not 0 < length <= MAX_CHUNK_DATA:
        raise LinkProtocolError(f"CHUNK length {length} outside 1..{MAX_CHUNK_DATA}")
    codec = _text(m, "codec", "CHUNK", 32)
    return ChunkData(
        resync_id=_u64(m, "rid", "CHUNK"),
        chunk=_u64(m, "chunk", "CHUNK"),
        codec=codec,
        data=decompress(codec, _bytes(m, "data", "CHUNK"), length),
    )


def _config_unit(m: dict[Any, Any], ftype: str) -> str:
    unit = _text(m, "unit", ftype, 128)
    if not unit:
        raise LinkProtocolError(f"{ftype} field 'unit' must not be empty")
    return unit


def _config_blob(m: dict[Any, Any], ftype: str) -> bytes:
    blob = _bytes(m, "blob", ftype)
    if not 0 < len(blob) <= MAX_CONFIG_BLOB:
        raise LinkProtocolError(
            f"{ftype} blob of {len(blob)} bytes outside 1..{MAX_CONFIG_BLOB}")
    return blob


def _decode_config_blob(m: dict[Any, Any]) -> ConfigBlob:
    unit = _config_unit(m, "CONFIG_BLOB")
    if _field(m, "blob", "CONFIG_BLOB") is None:
        return ConfigBlob(unit, None)
    return ConfigBlob(unit, _config_blob(m, "CONFIG_BLOB"))


def _sized_bytes(m: dict[Any, Any], key: str, ftype: str, size: int) -> bytes:
    value = _bytes(m, key, ftype)
    if len(value) != size:
        raise LinkProtocolError(f"{ftype} field {key!r} must be {size} bytes")
    return value


def _small(m: dict[Any, Any], key: str, ftype: str, hi: int) -> int:
    value = _u64(m, key, ftype)
    if not 1 <= value <= hi:
        raise LinkProtocolError(f"{ftype} field {key!r} outside 1..{hi}")
    return value


def _decode_recover_hello(m: dict[Any, Any]) -> RecoverHello:
    if _field(m, "unit", "RECOVER_HELLO") is None:
        return RecoverHello(None)
    return RecoverHello(_config_unit(m, "RECOVER_HELLO"))


def _decode_recover_challenge(m: dict[Any, Any]) -> RecoverChallenge:
    f = "RECOVER_CHALLENGE"
    kdf = m.get("kdf", KDF_SCRYPT)
    if kdf == KDF_SCRYPT and "kdf" not in m:
        cost = (_small(m, "ln", f, 24), _small(m, "r", f, 64), _small(m, "p", f, 16))
    elif kdf == KDF_ARGON2ID:
        # Wire bounds only; the recovering unit checks the tighter ones of its KDF
        # (memory, passes) before it derives anything.
        cost = (_small(m, "m", f, MAX_RECOVER_KDF_KIB), _small(m, "t", f, 255),
                _small(m, "p", f, 16))
    else:
        raise LinkProtocolError(f"{f} names an unknown key derivation")
    return RecoverChallenge(
        unit_id=_config_unit(m, f), kdf=kdf, cost=cost,
        salt=_sized_bytes(m, "salt", f, RECOVER_SALT_BYTES),
        nonce=_sized_bytes(m, "nonce", f, RECOVER_NONCE_BYTES))


def _decode_pair_offer(m: dict[Any, Any]) -> PairOffer:
    cert = _bytes(m, "cert", "PAIR_OFFER")
    if not 0 < len(cert) <= MAX_PAIR_CERT:
        raise LinkProtocolError(
            f"PAIR_OFFER certificate of {len(cert)} bytes outside 1..{MAX_PAIR_CERT}")
    return PairOffer(_config_unit(m, "PAIR_OFFER"), cert)


_DECODERS: dict[str, Callable[[dict[Any, Any]], Frame]] = {
    "HELLO": _decode_hello,
    "HELLO_ACK": _decode_hello_ack,
    "WRITES": _decode_writes,
    "ACK": lambda m: Ack(durable_seq=_u64(m, "durable", "ACK")),
    "DIGEST": _decode_digest,
    "COMMIT": lambda m: Commit(batch_id=_u64(m, "batch", "COMMIT")),
    "ABORT": lambda m: Abort(
        batch_id=_u64(m, "batch", "ABORT"), reason=_text(m, "reason", "ABORT")
    ),
    "PING": lambda m: Ping(nonce=_u64(m, "nonce", "PING")),
    "PONG": lambda m: Pong(nonce=_u64(m, "nonce", "PONG")),
    "ERROR": lambda m: ErrorFrame(code=_text(m, "code", "ERROR", 64),
                                  text=_text(m, "text", "ERROR")),
    "BYE": lambda m: Bye(),
    "RESYNC_START": _decode_resync_start,
    "DIGEST_REQ": lambda m: DigestRequest(
        resync_id=_u64(m, "rid", "DIGEST_REQ"), chunks=_chunk_list(m, "DIGEST_REQ")
    ),
    "CHUNK_DIGESTS": _decode_chunk_digests,
    "CHUNK": _decode_chunk,
    "RESYNC_END": lambda m: ResyncEnd(
        resync_id=_u64(m, "rid", "RESYNC_END"), seq=_u64(m, "seq", "RESYNC_END")
    ),
    "CONFIG_PUT": lambda m: ConfigPut(_config_unit(m, "CONFIG_PUT"),
                                      _config_blob(m, "CONFIG_PUT")),
    "CONFIG_GET": lambda m: ConfigGet(_config_unit(m, "CONFIG_GET")),
    "CONFIG_BLOB": _decode_config_blob,
    "RECOVER_HELLO": _decode_recover_hello,
    "RECOVER_CHALLENGE": _decode_recover_challenge,
    "RECOVER_PROOF": lambda m: RecoverProof(
        _sized_bytes(m, "proof", "RECOVER_PROOF", RECOVER_PROOF_BYTES)),
    "PAIR_OFFER": _decode_pair_offer,
    "PAIRED": lambda m: Paired(_config_unit(m, "PAIRED")),
    "FAILBACK_START": _decode_failback_start,
    "SWITCHOVER_START": lambda m: SwitchoverStart(
        _config_unit(m, "SWITCHOVER_START"), _lineage(m, "SWITCHOVER_START"),
        _u64(m, "seq", "SWITCHOVER_START")),
    "SWITCHOVER_DONE": lambda m: SwitchoverDone(
        _config_unit(m, "SWITCHOVER_DONE"), _u64(m, "seq", "SWITCHOVER_DONE"),
        _lineage(m, "SWITCHOVER_DONE")),
    "FAILBACK_PLAN": _decode_failback_plan,
    "CHUNK_WANT": lambda m: ChunkWant(
        resync_id=_u64(m, "rid", "CHUNK_WANT"), chunks=_chunk_list(m, "CHUNK_WANT")),
    "FAILBACK_COMMIT": lambda m: FailbackCommit(
        resync_id=_u64(m, "rid", "FAILBACK_COMMIT"), seq=_u64(m, "seq", "FAILBACK_COMMIT"),
        lineage=_lineage(m, "FAILBACK_COMMIT")),
    "RESYNC_DONE": lambda m: ResyncDone(
        resync_id=_u64(m, "rid", "RESYNC_DONE"), seq=_u64(m, "seq", "RESYNC_DONE"),
        chunks_written=_u64(m, "written", "RESYNC_DONE"),
    ),
}


def decode_body(body: bytes) -> Frame:
    """Decode one CBOR body (CRC already checked) into a frame."""
    try:
        obj = _strict_loads(body, max_depth=MAX_BODY_DEPTH, max_items=MAX_BODY_ITEMS,
                            max_length=MAX_WRITES_RECORDS)
    except CborDecodeError as exc:
        raise LinkProtocolError(f"frame body is not valid CBOR: {exc}") from None
    if type(obj) is not dict:
        raise LinkProtocolError(f"frame body is a CBOR {type(obj).__name__}, not a map")
    ftype = obj.get("type")
    if type(ftype) is not str:
        raise LinkProtocolError("frame has no text 'type' field")
    decoder = _DECODERS.get(ftype)
    if decoder is None:
        raise LinkProtocolError(f"unknown frame type {ftype[:64]!r}")
    return decoder(obj)


class FrameDecoder:
    """Incremental decoder: feed any split of the byte stream, get whole frames back."""

    def __init__(self, max_body: int = MAX_FRAME_BODY) -> None:
        self._buf = bytearray()
        self._max_body = max_body
        self._error: LinkProtocolError | None = None
        self.frames_decoded = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                frame = self._next_frame()
                if frame is None:
                    break
                frames.append(frame)
        except LinkProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise
        return frames

    def _next_frame(self) -> Frame | None:
        if len(self._buf) < FRAME_LENGTH.size:
            return None
        (length,) = FRAME_LENGTH.unpack_from(self._buf, 0)
        if length == 0:
            raise LinkProtocolError(f"frame {self.frames_decoded} has an empty body")
        if length > self._max_body:
            raise LinkProtocolError(
                f"frame {self.frames_decoded} declares {length} bytes, limit {self._max_body}"
            )
        end = FRAME_LENGTH.size + length
        if len(self._buf) < end + FRAME_CRC.size:
            return None
        (crc,) = FRAME_CRC.unpack_from(self._buf, end)
        actual = crc32c.crc32c(bytes(self._buf[:end]))
        if crc != actual:
            raise LinkProtocolError(
                f"frame {self.frames_decoded} CRC32C mismatch "
                f"(wire {crc:08x}, computed {actual:08x})"
            )
        body = bytes(self._buf[FRAME_LENGTH.size : end])
        del self._buf[: end + FRAME_CRC.size]
        frame = decode_body(body)
        self.frames_decoded += 1
        return frame
