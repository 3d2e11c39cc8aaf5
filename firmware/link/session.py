"""Sans-IO state machines of the journey link: the sender (local) and receiver (remote).

Both are fed bytes with `receive_data()` and hand back events; the bytes they want on
the wire collect in `data_to_send()`.  Neither touches a socket or a clock: the shell
owns the connection, keepalive timing and reconnects.

Sequence numbers (`seq`) are the CBQ's: u64, strictly increasing, first one 1, and
seq 0 means "nothing yet".  The remote acknowledges only seqs its sink made durable;
after a reconnect the local resumes right after the remote's last durable seq, and
any seq the remote already applied is acknowledged and skipped, so a replay is
harmless.

With the signature option every batch waits in the remote's receive buffer: the
remote answers DIGEST (BLAKE3 of the decoded batch), the local compares it with its
own and answers COMMIT (apply it) or ABORT (drop it and everything after it; the local
rewinds and sends again).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from firmware.lineage import Lineage
from firmware.link.errors import LinkError, LinkProtocolError, LinkRefused, SourceGap
from firmware.link.frames import (
    CODEC_NONE,
    FRAME_OVERHEAD,
    MAX_DIGEST_CHUNKS,
    MAX_FRAME_BODY,
    PROTOCOL_VERSION,
    WRITES_HEADER_ALLOWANCE,
    Abort,
    Ack,
    Bye,
    ChunkData,
    ChunkDigests,
    ChunkWant,
    Commit,
    ConfigBlob,
    ConfigGet,
    ConfigPut,
    Digest,
    DigestRequest,
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
    ResyncDone,
    ResyncEnd,
    ResyncStart,
    SwitchoverDone,
    SwitchoverStart,
    WriteRecord,
    Writes,
    available_codecs,
    batch_digest,
    chunk_digest,
    encode_frame,
    skip_record,
)
from firmware.link.pacing import TokenBucket

# --------------------------------------------------------------------------- interfaces


class WriteSource(Protocol):
    """What the sender reads from: on the local unit, a CBQ consumer cursor.

    A source may also offer `head_seq() -> int`, the newest seq it holds: HELLO
    carries it so the peer can tell whether this copy wrote after a fork."""

    def next_batch(self, max_bytes: int) -> list[WriteRecord]:
        """Records after the last one returned (or after the rewind point), seqs strictly
        increasing, data totalling at most `max_bytes` except that a single record larger
        than that is still returned alone.  Empty when nothing is pending now."""
        ...

    def ack(self, seq: int) -> None:
        """The remote made every seq <= `seq` durable: those may be released."""
        ...

    def rewind_to(self, seq: int) -> None:
        """The next batch starts with the first record whose seq is > `seq`.
        Raises `SourceGap` if such records were already released."""
        ...


class WriteSink(Protocol):
    """What the receiver writes to: on the remote unit, the per-unit receive journal."""

    def apply(self, records: Sequence[WriteRecord]) -> int:
        """Apply records in order; return the last seq now durable.  A seq applied
        earlier but not yet durable may come again after a reconnect: re-applying it
        must be harmless (same seq, same lbn, same data)."""
        ...

    def last_durable_seq(self) -> int: ...

    def check_queue(self, queue_id: int | None) -> bool:
        """Called at HELLO with the sender's queue id (None: it sent none).  True when
        the sink holds another queue's seqs, so only a full resync may follow."""
        ...


@dataclass(frozen=True)
class ResyncPlan:
    """A checksum resync (or a verify) the source wants before streaming on.

    After it the remote equals the local volume as of right after `seq` once the
    writes after `seq` are applied; the source then streams from `seq`."""

    verify: bool
    seq: int
    chunks: tuple[int, ...]


class ResyncSource(Protocol):
    """A `WriteSource` that can also resync by checksum (the local volume + CBQ)."""

    chunk_size: int

    def resync_plan(self, remote_durable: int) -> ResyncPlan | None:
        """A plan if the remote needs a resync (or a verify was asked for) before
        streaming on from `remote_durable`; None to stream normally."""
        ...

    def read_chunk(self, chunk: int) -> bytes:
        """The local volume's current contents of one chunk."""
        ...

    # Optional (looked up with getattr, so a plain source needs none of them):
    #   prefetch_digests(chunks): the session has just asked the remote for these
    #     chunks' digests; the source may start computing its own (a bounded
    #     read-ahead in the service layer), so both ends digest at the same time.
    #   chunk_digests(chunks) -> {chunk: digest}: the source's digests of these chunks
    #     (hole-aware), instead of reading and hashing each one here.
    #   resync_progress(done, total, differing): called after every answer.

    def resync_finished(self, plan: ResyncPlan, differing: list[int], seq: int) -> None:
        """The remote confirmed the resync (or verify) of `plan`."""
        ...

    def require_full_resync(self, reason: str) -> None:
        """The remote cannot follow this queue's seqs: the next plan covers the whole
        volume, whatever the queue says."""
        ...


class ResyncSink(Protocol):
    """A `WriteSink` that can take part in a checksum resync (the remote unit store)."""

    @property
    def chunk_size(self) -> int: ...

    @property
    def chunk_count(self) -> int: ...

    def begin_resync(self) -> int: ...

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]: ...

    def write_chunk(self, chunk: int, data: bytes) -> bool: ...

    def resync_complete(self, seq: int) -> None: ...


class FailbackSource(Protocol):
    """A promoted copy that hands its role back (the remote unit store, through the
    server): opened for one FAILBACK_START, its host's writes already stopped."""

    @property
    def plan(self) -> FailbackPlan: ...

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]: ...

    def read_chunk(self, chunk: int) -> bytes: ...

    def commit(self, seq: int, lineage: Lineage) -> None:
        """The local holds this copy's image; follow it from `seq` as `lineage`."""

    def abort(self) -> None:
        """The exchange ended without a commit: this copy stays the primary."""


class ConfigBackups(Protocol):
    """Where a peer keeps the sealed config backups units hand it (one per unit)."""

    def put(self, unit_id: str, blob: bytes) -> None: ...

    def get(self, unit_id: str) -> bytes | None: ...


#: Chunks per DIGEST_REQ, and requests the sender keeps outstanding: enough to keep
#: a long link busy, few enough that the chunks one answer triggers stay small.
DIGEST_PIECE = 128
DIGEST_WINDOW = 4
#: A verify sends no chunks back, so its requests can name as many chunks as a frame
#: holds: a 200 GiB volume is 3,200 round trips instead of 25,600.
VERIFY_PIECE = MAX_DIGEST_CHUNKS


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Established:
    unit_id: str
    version: int
    compression: str
    signature: bool
    #: The remote's last durable seq when the session started.
    durable_seq: int


@dataclass(frozen=True)
class Acknowledged:
    durable_seq: int


@dataclass(frozen=True)
class BatchApplied:
    first_seq: int
    last_seq: int
    #: Records skipped because their seq was already applied.
    duplicates: int


@dataclass(frozen=True)
class BatchAborted:
    batch_id: int
    first_seq: int
    reason: str


@dataclass(frozen=True)
class Refused:
    """This side refused the peer (an ERROR frame is queued; close after sending it)."""

    code: str
    text: str


@dataclass(frozen=True)
class PeerRefusal:
    """The peer sent ERROR: it refused us or failed."""

    code: str
    text: str


@dataclass(frozen=True)
class PeerClosed:
    pass


@dataclass(frozen=True)
class PongReceived:
    nonce: int


@dataclass(frozen=True)
class ResyncStarted:
    resync_id: int
    verify: bool
    seq: int
    chunks: int


@dataclass(frozen=True)
class ResyncFinished:
    resync_id: int
    verify: bool
    seq: int
    chunks_compared: int
    #: Chunks whose digests differed (sent, unless verifying).
    differing: tuple[int, ...]
    #: Uncompressed chunk bytes sent (0 for a verify).
    bytes_sent: int


@dataclass(frozen=True)
class FailbackStarted:
    unit_id: str
    chunks_changed: int


@dataclass(frozen=True)
class FailbackCommitted:
    unit_id: str
    seq: int
    chunks_sent: int
    bytes_sent: int


@dataclass(frozen=True)
class SwitchedOver:
    unit_id: str
    seq: int


@dataclass(frozen=True)
class ConfigReceived:
    """The peer handed over its sealed config backup (CONFIG_PUT) to keep."""

    unit_id: str
    blob: bytes


@dataclass(frozen=True)
class ConfigServed:
    """A CONFIG_GET was answered (blob None: none held)."""

    unit_id: str
    found: bool


SessionEvent = (
    Established | Acknowledged | BatchApplied | BatchAborted | Refused | PeerRefusal | PeerClosed
    | PongReceived | ResyncStarted | ResyncFinished | ConfigReceived | ConfigServed
    | FailbackStarted | FailbackCommitted | SwitchedOver
)


class SessionState(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "hello-sent"
    AWAIT_HELLO = "await-hello"
    STREAMING = "streaming"
    #: the receiver hands its role back to the sender (FAILBACK_START .. FAILBACK_COMMIT)
    FAILBACK = "failback"
    CLOSED = "closed"
    FAILED = "failed"


class Role(enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


# Which frames each role accepts in each state; anything else is a protocol error.
_ALLOWED: dict[tuple[Role, SessionState], tuple[type, ...]] = {
    (Role.SENDER, SessionState.HELLO_SENT): (HelloAck, ErrorFrame, Ping, Pong, Bye),
    (Role.SENDER, SessionState.STREAMING): (
        Ack, Digest, ChunkDigests, ResyncDone, ConfigPut, ErrorFrame, Ping, Pong, Bye,
    ),
    # CONFIG_GET before HELLO: a unit recovering its config has no volume to announce.
    # FAILBACK_START before HELLO too: a fenced local is refused at HELLO.
    (Role.RECEIVER, SessionState.AWAIT_HELLO): (Hello, ConfigGet, FailbackStart,
                                                SwitchoverStart, ErrorFrame, Ping, Bye),
    (Role.RECEIVER, SessionState.FAILBACK): (DigestRequest, ChunkWant, FailbackCommit,
                                             ErrorFrame, Ping, Pong, Bye),
    (Role.RECEIVER, SessionState.STREAMING): (
        Writes, Commit, Abort, ResyncStart, DigestRequest, ChunkData, ResyncEnd,
        ConfigPut, ConfigGet, ErrorFrame, Ping, Pong, Bye,
    ),
}

# Error codes carried in ERROR frames.
ERR_PROTOCOL = "protocol"
ERR_VERSION = "version"
ERR_UNKNOWN_UNIT = "unknown-unit"
ERR_IDENTITY = "identity"
ERR_RESYNC = "resync-needed"
ERR_ABORTS = "too-many-aborts"
#: The peer refused this copy's writes on their two lineages (firmware.lineage): it was
#: promoted while this copy was away, both became writable on their own, they share no
#: history, or they diverged in a way only a failback or a manual resolve settles.
ERR_FENCED = "fenced"
ERR_SPLIT_BRAIN = "split-brain"
ERR_UNRELATED = "unrelated"
ERR_DIVERGED = "diverged"
#: A failback the peer cannot do now (the unit is not promoted, busy, or not the
#: descendant of the asking copy's generation).
ERR_FAILBACK = "failback"
#: FAILBACK_START for a unit that already handed its role back to the asking copy's
#: line: the copy missed the answer to its FAILBACK_COMMIT and may complete it.
ERR_HANDED_BACK = "handed-back"
LINEAGE_REFUSALS = frozenset({ERR_FENCED, ERR_SPLIT_BRAIN, ERR_UNRELATED, ERR_DIVERGED})


class _Session:
    role: Role

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self._decoder = FrameDecoder()
        self._out = bytearray()

    # -- shell-facing

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def is_finished(self) -> bool:
        return self.state in (SessionState.CLOSED, SessionState.FAILED)

    def receive_data(self, data: bytes) -> list[SessionEvent]:
        """Feed bytes from the peer.  Raises `LinkProtocolError` (after queueing an ERROR
        frame for the peer) on anything the protocol does not allow."""
        if self.state is SessionState.FAILED:
            return []  # closing anyway; late bytes do not matter
        events: list[SessionEvent] = []
        try:
            for frame in self._decoder.receive_data(data):
                events.extend(self._dispatch(frame))
                if self.state is SessionState.FAILED:
                    break
        except LinkProtocolError as exc:
            self._fail_with(ERR_PROTOCOL, exc.reason)
            raise
        return events

    def ping(self, nonce: int) -> None:
        self._send(Ping(nonce=nonce))

    def close(self) -> None:
        """Say BYE; the shell closes after flushing `data_to_send()`."""
        if not self.is_finished:
            self._send(Bye())
            self.state = SessionState.CLOSED

    # -- internals

    def _send(self, frame: Frame) -> None:
        self._out += encode_frame(frame)

    def _fail_with(self, code: str, text: str) -> None:
        if self.state is not SessionState.FAILED:
            self._send(ErrorFrame(code=code, text=text))
            self.state = SessionState.FAILED

    def _dispatch(self, frame: Frame) -> list[SessionEvent]:
        allowed = _ALLOWED.get((self.role, self.state), ())
        if not isinstance(frame, allowed):
            raise LinkProtocolError(
                f"{type(frame).__name__} frame not allowed while {self.role.value} is "
                f"{self.state.value}"
            )
        if isinstance(frame, Ping):
            self._send(Pong(nonce=frame.nonce))
            return []
        if isinstance(frame, Pong):
            return [PongReceived(nonce=frame.nonce)]
        if isinstance(frame, ErrorFrame):
            self.state = SessionState.FAILED
            return [PeerRefusal(code=frame.code, text=frame.text)]
        if isinstance(frame, Bye):
            self.state = SessionState.CLOSED
            return [PeerClosed()]
        return self._handle(frame)

    def _handle(self, frame: Frame) -> list[SessionEvent]:
        raise NotImplementedError


# --------------------------------------------------------------------------- sender


@dataclass(frozen=True)
class SenderConfig:
    unit_id: str
    volume_size: int
    block_size: int
    #: Last seq the local believes the remote made durable.
    resume_seq: int = 0
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    #: Codecs offered, best first; "none" is always acceptable.
    compression: tuple[str, ...] = field(default_factory=available_codecs)
    signature: bool = False
    #: The source queue's identity, sent in HELLO (see `Hello.queue_id`).
    queue_id: int | None = None
    #: This copy's generations, sent in HELLO (see `Hello.lineage`).
    lineage: Lineage | None = None
    #: Uncompressed record bytes sent but not yet acknowledged.
    window_bytes: int = 4 * 1024 * 1024
    batch_bytes: int = 1024 * 1024
    #: Digest mismatches tolerated for one seq before the session gives up.
    max_aborts: int = 3
    #: Offer BARRIER records (the source hands them out); sent only to a remote that
    #: takes them, dropped for one that does not.
    barriers: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.batch_bytes <= MAX_FRAME_BODY - WRITES_HEADER_ALLOWANCE:
            raise ValueError(f"batch_bytes must be 1..{MAX_FRAME_BODY - WRITES_HEADER_ALLOWANCE}")
        if self.window_bytes < self.batch_bytes:
            raise ValueError("window_bytes must be at least batch_bytes")


@dataclass
class _SenderResync:
    resync_id: int
    plan: ResyncPlan
    todo: list[int]
    outstanding: int = 0
    compared: int = 0
    differing: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    end_sent: bool = False


@dataclass
class _InFlight:
    batch_id: int
    first_seq: int
    last_seq: int
    nbytes: int
    digest: bytes
    committed: bool = False


class SenderSession(_Session):
    """With a `pacer`, WRITES batches and resync chunks go out only as fast as it
    allows (the shell waits `send_delay()` before pumping again); every other frame
    (acks' answers, pings, digest requests) is small and goes at once."""

    role = Role.SENDER

    def __init__(self, config: SenderConfig, source: WriteSource, *,
                 pacer: TokenBucket | None = None) -> None:
        super().__init__(SessionState.IDLE)
        self.config = config
        self._source = source
        self.pacer = pacer
        #: The codec of the next WRITES batch or chunk: the one HELLO_ACK chose, or
        #: none (see `prefer_codecs`).
        self.compression = CODEC_NONE
        #: The codec HELLO_ACK chose; the remote takes it or none for this session.
        self.negotiated = CODEC_NONE
        #: Resync chunks waiting for the pacer, in order.
        self._chunks_out: deque[ChunkData] = deque()
        #: Uncompressed record bytes and frame bytes of the WRITES sent.
        self.writes_data_bytes = 0
        self.writes_wire_bytes = 0
        self.signature = False
        #: The remote takes BARRIER records (HELLO_ACK said so).
        self.barriers = False
        self.acked_seq = config.resume_seq
        self.last_sent_seq = config.resume_seq
        self._in_flight: list[_InFlight] = []
        self._discarded_batches: set[int] = set()
        self._next_batch_id = 1
        self._aborts: dict[int, int] = {}
        self.bytes_sent_payload = 0
        self._resync: _SenderResync | None = None
        self._next_resync_id = 1
        self._pending_events: list[SessionEvent] = []
        #: The seq of the last ACK frame on this connection (-1: none yet).
        self._last_ack = -1

    @property
    def resync_active(self) -> bool:
        return self._resync is not None

    def _resync_source(self) -> ResyncSource | None:
        src = self._source
        return src if hasattr(src, "resync_plan") else None  # type: ignore[return-value]

    def _start_resync(self, plan: ResyncPlan) -> None:
        src = self._resync_source()
        assert src is not None
        rid = self._next_resync_id
        self._next_resync_id += 1
        self._resync = _SenderResync(rid, plan, list(reversed(plan.chunks)))
        self._send(ResyncStart(resync_id=rid, verify=plan.verify, seq=plan.seq,
                               chunk_size=src.chunk_size, chunk_total=len(plan.chunks)))
        self._pending_events.append(
            ResyncStarted(rid, plan.verify, plan.seq, len(plan.chunks)))

    def _release_chunks(self) -> None:
        pacer = self.pacer
        while self._chunks_out and (pacer is None or pacer.delay() == 0.0):
            wire = encode_frame(self._chunks_out.popleft())
            self._out += wire
            if pacer is not None:
                pacer.spend(len(wire))

    def _pump_resync(self) -> None:
        r = self._resync
        assert r is not None
        self._release_chunks()
        # Chunks held back by the pacer bound what more answers may add to them.
        while r.todo and r.outstanding < DIGEST_WINDOW and len(self._chunks_out) <= DIGEST_PIECE:
            size = VERIFY_PIECE if r.plan.verify else DIGEST_PIECE
            piece = tuple(r.todo.pop() for _ in range(min(size, len(r.todo))))
            prefetch = getattr(self._source, "prefetch_digests", None)
            if prefetch is not None:
                prefetch(piece)
            self._send(DigestRequest(resync_id=r.resync_id, chunks=piece))
            r.outstanding += 1
        if not r.todo and r.outstanding == 0 and not r.end_sent and not self._chunks_out:
            self._send(ResyncEnd(resync_id=r.resync_id, seq=r.plan.seq))
            r.end_sent = True

    def put_config(self, blob: bytes) -> None:
        """Hand the remote this unit's sealed config backup to keep."""
        if self.state is not SessionState.STREAMING:
            raise LinkError("a config backup goes out only on an established session")
        self._send(ConfigPut(unit_id=self.config.unit_id, blob=blob))

    def take_events(self) -> list[SessionEvent]:
        """Events that arose in `pump()` rather than from received bytes."""
        out, self._pending_events = self._pending_events, []
        return out

    @property
    def in_flight_bytes(self) -> int:
        return sum(b.nbytes for b in self._in_flight)

    def send_delay(self) -> float:
        """Seconds the pacer holds the next WRITES batch or chunk back (0.0: none)."""
        return self.pacer.delay() if self.pacer is not None else 0.0

    def prefer_codecs(self, codecs: Sequence[str]) -> bool:
        """Compress the next batches with the first of `codecs` this session can use:
        the codec HELLO_ACK chose, or none (a remote takes either); codecs the remote
        passed over at HELLO are skipped.  False when a codec before those is one only
        a new HELLO can offer: the caller reconnects with `codecs` as the offer."""
        if self.state is not SessionState.STREAMING:
            raise LinkError("the codec changes only on an established session")
        offered = self.config.compression
        passed_over = offered[:offered.index(self.negotiated)] \
            if self.negotiated in offered else offered
        for codec in codecs:
            if codec in (CODEC_NONE, self.negotiated):
                self.compression = codec
                return True
            if codec not in passed_over:
                return False
        self.compression = CODEC_NONE
        return True

    def start(self) -> None:
        if self.state is not SessionState.IDLE:
            raise LinkError("sender session already started")
        c = self.config
        head = getattr(self._source, "head_seq", None)
        self._send(
            Hello(
                versions=c.versions,
                unit_id=c.unit_id,
                volume_size=c.volume_size,
                block_size=c.block_size,
                resume_seq=c.resume_seq,
                compression=c.compression,
                signature=c.signature,
                queue_id=c.queue_id,
                lineage=c.lineage,
                last_seq=head() if head is not None else None,
                barriers=c.barriers,
            )
        )
        self.state = SessionState.HELLO_SENT

    def pump(self) -> int:
        """Pull batches from the source while the window has room; returns how many
        batches were queued for sending."""
        queued = 0
        if self.state is SessionState.STREAMING and self._resync is None and not self._in_flight:
            src = self._resync_source()
            plan = src.resync_plan(self.acked_seq) if src is not None else None
            if plan is not None:
                self._start_resync(plan)
        if self._resync is not None:
            if self.state is SessionState.STREAMING:
                self._pump_resync()
            return 0
        while self.state is SessionState.STREAMING:
            if self.send_delay() > 0.0:
                break
            room = self.config.window_bytes - self.in_flight_bytes
            if room <= 0:
                break
            limit = min(room, self.config.batch_bytes)
            if self.pacer is not None:
                limit = self.pacer.batch_bytes(limit)
            records = self._source.next_batch(limit)
            if not records:
                break
            if not self.barriers:
                records = [r for r in records if not r.barrier]
                if not records:
                    continue
            if self._in_flight and sum(len(r.data) for r in records) > room:
                # A lone record bigger than the room left: put it back until acks make
                # room, so the window stays a bound (it is only exceeded by one record
                # larger than the whole window, sent when nothing else is in flight).
                self._source.rewind_to(self.last_sent_seq)
                break
            self._queue_batch(records)
            queued += 1
        return queued

    def _queue_batch(self, records: list[WriteRecord]) -> None:
        prev = self.last_sent_seq
        for r in records:
            # A barrier has no seq of its own: it covers the last write before it.
            if r.seq < prev if r.barrier else r.seq <= prev:
                raise LinkError(f"source returned seq {r.seq} after {prev}")
            prev = r.last_seq
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        frame = Writes(batch_id=batch_id, codec=self.compression, records=tuple(records))
        wire = encode_frame(frame)
        nbytes = sum(len(r.data) for r in records)
        self._out += wire
        self.bytes_sent_payload += len(wire) - FRAME_OVERHEAD
        self.writes_data_bytes += nbytes
        self.writes_wire_bytes += len(wire)
        if self.pacer is not None:
            self.pacer.spend(len(wire))
        self._in_flight.append(
            _InFlight(
                batch_id=batch_id,
                first_seq=records[0].seq,
                last_seq=records[-1].last_seq,
                nbytes=nbytes,
                digest=batch_digest(records) if self.signature else b"",
            )
        )
        self.last_sent_seq = max(self.last_sent_seq, records[-1].last_seq)

    def _handle(self, frame: Frame) -> list[SessionEvent]:
        if isinstance(frame, HelloAck):
            return self._on_hello_ack(frame)
        if isinstance(frame, Ack):
            return self._on_ack(frame)
        if isinstance(frame, Digest):
            return self._on_digest(frame)
        if isinstance(frame, ChunkDigests):
            return self._on_chunk_digests(frame)
        if isinstance(frame, ResyncDone):
            return self._on_resync_done(frame)
        if isinstance(frame, ConfigPut):
            return [ConfigReceived(frame.unit_id, frame.blob)]
        raise AssertionError(frame)  # _ALLOWED keeps other frames out

    def _on_chunk_digests(self, frame: ChunkDigests) -> list[SessionEvent]:
        r = self._resync
        if r is None or frame.resync_id != r.resync_id or r.outstanding == 0:
            raise LinkProtocolError(f"CHUNK_DIGESTS for resync {frame.resync_id}, not running")
        src = self._resync_source()
        assert src is not None
        r.outstanding -= 1
        digests = getattr(src, "chunk_digests", None)
        mine = digests(frame.chunks) if digests is not None else None
        for chunk, remote_digest in zip(frame.chunks, frame.digests, strict=True):
            r.compared += 1
            if mine is not None:
                if mine[chunk] == remote_digest:
                    continue
                data = b"" if r.plan.verify else src.read_chunk(chunk)
            else:
                data = src.read_chunk(chunk)
                if chunk_digest(data) == remote_digest:
                    continue
            r.differing.append(chunk)
            if not r.plan.verify:
                self._chunks_out.append(ChunkData(resync_id=r.resync_id, chunk=chunk,
                                                  codec=self.compression, data=data))
                r.bytes_sent += len(data)
        self._release_chunks()
        progress = getattr(src, "resync_progress", None)
        if progress is not None:
            progress(r.compared, len(r.plan.chunks), len(r.differing))
        return []

    def _on_resync_done(self, frame: ResyncDone) -> list[SessionEvent]:
        r = self._resync
        if r is None or frame.resync_id != r.resync_id or not r.end_sent:
            raise LinkProtocolError(f"RESYNC_DONE for resync {frame.resync_id}, not ending")
        src = self._resync_source()
        assert src is not None
        self._resync = None
        events: list[SessionEvent] = [ResyncFinished(
            r.resync_id, r.plan.verify, frame.seq, r.compared, tuple(sorted(r.differing)),
            r.bytes_sent)]
        src.resync_finished(r.plan, sorted(r.differing), frame.seq)
        if r.plan.verify:
            return events
        if frame.seq != r.plan.seq:
            raise LinkProtocolError(f"RESYNC_DONE at seq {frame.seq}, asked for {r.plan.seq}")
        self.acked_seq = self.last_sent_seq = frame.seq
        events.append(Acknowledged(durable_seq=frame.seq))
        try:
            self._source.rewind_to(frame.seq)
        except SourceGap:
            # The queue overflowed again while the resync ran: go round once more.
            plan = src.resync_plan(frame.seq)
            if plan is None:
                raise
            self._start_resync(plan)
        return events

    def _on_hello_ack(self, ack: HelloAck) -> list[SessionEvent]:
        c = self.config
        if ack.version not in c.versions:
            raise LinkProtocolError(f"remote chose version {ack.version}, offered {c.versions}")
        if ack.compression != CODEC_NONE and ack.compression not in c.compression:
            raise LinkProtocolError(f"remote chose codec {ack.compression!r}, not offered")
        if ack.signature != c.signature:
            raise LinkProtocolError(
                f"remote answered signature={ack.signature} to a request of {c.signature}"
            )
        if ack.barriers and not c.barriers:
            raise LinkProtocolError("remote answered barriers to a HELLO that offered none")
        self.compression = self.negotiated = ack.compression
        self.signature = ack.signature
        self.barriers = ack.barriers
        durable = ack.durable_seq
        self.acked_seq = durable
        self.last_sent_seq = durable
        src = self._resync_source()
        if ack.requeue:
            if src is None:
                text = "remote holds another queue's seqs and this source cannot resync"
                self._fail_with(ERR_RESYNC, text)
                return [Refused(code=ERR_RESYNC, text=text)]
            src.require_full_resync(
                f"the remote holds seqs of another queue than {c.queue_id}")
        plan = src.resync_plan(durable) if src is not None else None
        if plan is not None:
            self.state = SessionState.STREAMING
            self._start_resync(plan)
            return [Established(c.unit_id, ack.version, ack.compression, ack.signature,
                                durable)]
        try:
            self._source.ack(durable)
            self._source.rewind_to(durable)
        except SourceGap as exc:
            text = f"remote resumes after seq {durable}, the local queue cannot: {exc}"
            self._fail_with(ERR_RESYNC, text)
            return [Refused(code=ERR_RESYNC, text=text)]
        self.acked_seq = durable
        self.last_sent_seq = durable
        self.state = SessionState.STREAMING
        return [
            Established(
                unit_id=c.unit_id,
                version=ack.version,
                compression=ack.compression,
                signature=ack.signature,
                durable_seq=durable,
            )
        ]

    def _on_ack(self, ack: Ack) -> list[SessionEvent]:
        seq = ack.durable_seq
        # Durability never goes backwards on one connection.
        if seq < self._last_ack:
            raise LinkProtocolError(f"ACK seq {seq} goes backwards from {self._last_ack}")
        self._last_ack = seq
        if seq > self.last_sent_seq:
            raise LinkProtocolError(f"ACK for seq {seq}, only {self.last_sent_seq} was sent")
        if seq <= self.acked_seq:
            # A batch of barriers alone covers no new seq; its ACK repeats the last one.
            while (self._in_flight and self._in_flight[0].last_seq <= seq
                   and (self._in_flight[0].committed or not self.signature)):
                self._in_flight.pop(0)
            return []
        if self.signature:
            for b in self._in_flight:
                if b.first_seq <= seq and not b.committed:
                    raise LinkProtocolError(f"ACK {seq} covers batch {b.batch_id} not committed")
        self.acked_seq = seq
        self._source.ack(seq)
        while self._in_flight and self._in_flight[0].last_seq <= seq:
            self._in_flight.pop(0)
        return [Acknowledged(durable_seq=seq)]

    def _on_digest(self, digest: Digest) -> list[SessionEvent]:
        if not self.signature:
            raise LinkProtocolError("DIGEST without the signature option")
        if digest.batch_id in self._discarded_batches:
            return []  # answer to a batch we already aborted; it was dropped remotely
        i = next((i for i, b in enumerate(self._in_flight) if b.batch_id == digest.batch_id), -1)
        if i < 0:
            raise LinkProtocolError(f"DIGEST for unknown batch {digest.batch_id}")
        batch = self._in_flight[i]
        if batch.committed:
            raise LinkProtocolError(f"second DIGEST for batch {digest.batch_id}")
        if digest.digest == batch.digest:
            batch.committed = True
            self._send(Commit(batch_id=batch.batch_id))
            return []
        reason = "digest mismatch"
        self._send(Abort(batch_id=batch.batch_id, reason=reason))
        count = self._aborts.get(batch.first_seq, 0) + 1
        self._aborts[batch.first_seq] = count
        if count > self.config.max_aborts:
            text = f"batch at seq {batch.first_seq} aborted {count} times"
            self._fail_with(ERR_ABORTS, text)
            return [
                BatchAborted(batch.batch_id, batch.first_seq, reason),
                Refused(ERR_ABORTS, text),
            ]
        # The remote drops this batch and every later one; resend from its first seq.
        for dropped in self._in_flight[i:]:
            self._discarded_batches.add(dropped.batch_id)
        del self._in_flight[i:]
        self._source.rewind_to(batch.first_seq - 1)
        self.last_sent_seq = batch.first_seq - 1
        return [BatchAborted(batch.batch_id, batch.first_seq, reason)]


# --------------------------------------------------------------------------- receiver


def _after(records: Sequence[WriteRecord], seq: int) -> tuple[WriteRecord, ...]:
    """The records (or parts of skips) past `seq`: a replay after a reconnect may
    resend what is already here, and a skip may have been re-cut at another seq.
    A barrier at `seq` itself is kept: it may follow the last write it covers in a
    later batch (the sink keeps one point per seq, so a resent one is harmless)."""
    out = []
    for r in records:
        if r.barrier:
            if r.seq >= seq:
                out.append(r)
            continue
        if r.last_seq <= seq:
            continue
        if r.is_skip and r.seq <= seq:
            r = skip_record(seq + 1, r.skip_last, r.ts)
        out.append(r)
    return tuple(out)



@dataclass(frozen=True)
class ReceiverConfig:
    known_units: Collection[str]
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    compression: tuple[str, ...] = field(default_factory=available_codecs)
    allow_signature: bool = True
    #: Refuse a seq that does not follow the last one by exactly 1 (a lost write).
    require_contiguous: bool = True
    #: Bytes of batches held in the receive buffer awaiting COMMIT.
    max_pending_bytes: int = 64 * 1024 * 1024
    #: Take BARRIER records when HELLO offers them (the sink must know them).
    barriers: bool = False


@dataclass
class _Pending:
    batch_id: int
    records: tuple[WriteRecord, ...]
    nbytes: int


class ReceiverSession(_Session):
    role = Role.RECEIVER

    def __init__(
        self,
        config: ReceiverConfig,
        open_sink: Callable[[Hello], WriteSink],
        authenticated_unit: str | None = None,
        *,
        backups: ConfigBackups | None = None,
        own_backup: tuple[str, bytes] | None = None,
        open_failback: Callable[[FailbackStart], FailbackSource] | None = None,
        switchover: Callable[[SwitchoverStart], SwitchoverDone] | None = None,
        relays: Collection[str] = (),
    ) -> None:
        """`open_sink` resolves the unit's sink (and may claim it); it raises
        `LinkRefused` to turn the peer away.  `authenticated_unit` is the unit id the
        TLS layer bound to the peer's certificate, None when there is no TLS.
        `relays`: the further units that certificate may stream (a remote relaying
        them here); only replication, never a failback or a switchover of them.
        `open_failback` opens a promoted unit for a FAILBACK_START the same way; None:
        this side hands no role back."""
        super().__init__(SessionState.AWAIT_HELLO)
        self.config = config
        self._open_sink = open_sink
        #: Keeps the peers' config backups; None: this side keeps none.
        self.backups = backups
        #: (unit id, sealed blob) of this side's own config, handed to the peer.
        self.own_backup = own_backup
        self.authenticated_unit = authenticated_unit
        self.relays = frozenset(relays)
        self.sink: WriteSink | None = None
        self.hello: Hello | None = None
        self.compression = CODEC_NONE
        self.signature = False
        self.barriers = False
        self._applied = 0  # highest seq handed to the sink
        self._high = 0  # highest seq accepted (applied or pending)
        self._acked = -1
        self._last_batch_id = 0
        self._pending: list[_Pending] = []
        #: (resync id, verify, chunks written) while a resync or verify runs.
        self._resync: tuple[int, bool] | None = None
        self._chunks_written = 0
        #: The sink holds another queue's seqs: nothing but a full resync until done.
        self.requeue = False
        self._open_failback = open_failback
        self._switchover = switchover
        #: The promoted unit handing its role back, while a failback runs.
        self.failback: FailbackSource | None = None
        self.failback_unit = ""
        self._failback_sent = (0, 0)

    def _handle(self, frame: Frame) -> list[SessionEvent]:
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if isinstance(frame, FailbackStart):
            return self._on_failback_start(frame)
        if isinstance(frame, SwitchoverStart):
            return self._on_switchover(frame)
        if self.state is SessionState.FAILBACK:
            return self._on_failback_frame(frame)
        if isinstance(frame, Writes):
            return self._on_writes(frame)
        if isinstance(frame, Commit):
            return self._on_commit(frame)
        if isinstance(frame, Abort):
            return self._on_abort(frame)
        if isinstance(frame, ResyncStart):
            return self._on_resync_start(frame)
        if isinstance(frame, DigestRequest | ChunkData | ResyncEnd):
            return self._on_resync_frame(frame)
        if isinstance(frame, ConfigPut | ConfigGet):
            return self._on_config(frame)
        raise AssertionError(frame)

    def _on_config(self, frame: ConfigPut | ConfigGet) -> list[SessionEvent]:
        # A unit stores and fetches only its own backup: the one TLS vouches for.
        own = self.authenticated_unit or (self.hello.unit_id if self.hello else None)
        if own is None:
            if frame.unit_id not in self.config.known_units:
                return self._refuse(ERR_UNKNOWN_UNIT, f"unit {frame.unit_id!r} is not known here")
            own = frame.unit_id
        if frame.unit_id != own:
            return self._refuse(ERR_IDENTITY, f"unit {own!r} asked for the config backup "
                                              f"of unit {frame.unit_id!r}")
        if self.backups is None:
            raise LinkProtocolError(f"{type(frame).__name__}: this peer keeps no config backups")
        if isinstance(frame, ConfigPut):
            self.backups.put(frame.unit_id, frame.blob)
            return [ConfigReceived(frame.unit_id, frame.blob)]
        blob = self.backups.get(frame.unit_id)
        self._send(ConfigBlob(frame.unit_id, blob))
        return [ConfigServed(frame.unit_id, blob is not None)]

    def put_own_backup(self, unit_id: str, blob: bytes) -> None:
        """Hand the peer this side's (re-sealed) config backup again."""
        if self.state is not SessionState.STREAMING:
            raise LinkError("a config backup goes out only on an established session")
        self.own_backup = (unit_id, blob)
        self._send(ConfigPut(unit_id=unit_id, blob=blob))

    def _resync_sink(self) -> ResyncSink:
        sink = self.sink
        if sink is None or not hasattr(sink, "write_chunk"):
            raise LinkProtocolError("this remote's store cannot take part in a resync")
        return sink  # type: ignore[return-value]

    def _on_resync_start(self, frame: ResyncStart) -> list[SessionEvent]:
        sink = self._resync_sink()
        if self._resync is not None:
            raise LinkProtocolError(f"RESYNC_START {frame.resync_id} while one runs")
        if self._pending:
            raise LinkProtocolError("RESYNC_START while batches await COMMIT")
        if frame.chunk_size != sink.chunk_size:
            raise LinkProtocolError(
                f"resync chunk size {frame.chunk_size}, this store uses {sink.chunk_size}")
        if not frame.verify:
            sink.begin_resync()
        self._resync = (frame.resync_id, frame.verify)
        self._chunks_written = 0
        return [ResyncStarted(frame.resync_id, frame.verify, frame.seq, frame.chunk_total)]

    def _on_resync_frame(self, frame: DigestRequest | ChunkData | ResyncEnd) -> list[SessionEvent]:
        sink = self._resync_sink()
        if self._resync is None or self._resync[0] != frame.resync_id:
            raise LinkProtocolError(
                f"{type(frame).__name__} for resync {frame.resync_id}, which is not running")
        verify = self._resync[1]
        if isinstance(frame, DigestRequest):
            for c in frame.chunks:
                if c >= sink.chunk_count:
                    raise LinkProtocolError(f"chunk {c} outside 0..{sink.chunk_count - 1}")
            digests = sink.chunk_digests(frame.chunks)
            self._send(ChunkDigests(resync_id=frame.resync_id, chunks=frame.chunks,
                                    digests=tuple(digests[c] for c in frame.chunks)))
            return []
        if isinstance(frame, ChunkData):
            if verify:
                raise LinkProtocolError("CHUNK during a verify")
            if frame.codec not in (self.compression, CODEC_NONE):
                raise LinkProtocolError(f"CHUNK codec {frame.codec!r}, negotiated "
                                        f"{self.compression!r}")
            if frame.chunk >= sink.chunk_count:
                raise LinkProtocolError(f"chunk {frame.chunk} outside the volume")
            if sink.write_chunk(frame.chunk, frame.data):
                self._chunks_written += 1
            return []
        self._resync = None
        if verify:
            self._send(ResyncDone(frame.resync_id, self._applied, 0))
            return [ResyncFinished(frame.resync_id, True, self._applied, 0, (), 0)]
        if frame.seq < self._applied:
            raise LinkProtocolError(
                f"resync ends at seq {frame.seq}, before seq {self._applied} already here")
        sink.resync_complete(frame.seq)
        self.requeue = False
        self._applied = self._high = self._acked = frame.seq
        self._send(ResyncDone(frame.resync_id, frame.seq, self._chunks_written))
        return [ResyncFinished(frame.resync_id, False, frame.seq, 0, (), 0)]

    def _refuse(self, code: str, text: str) -> list[SessionEvent]:
        self._fail_with(code, text)
        return [Refused(code=code, text=text)]

    # -- failback: the receiver's promoted copy goes back to the sender, which pulls
    #    the chunks that differ (docs/failover.md)

    def _on_failback_start(self, frame: FailbackStart) -> list[SessionEvent]:
        if frame.unit_id not in self.config.known_units:
            return self._refuse(ERR_UNKNOWN_UNIT, f"unit {frame.unit_id!r} is not known here")
        if self.authenticated_unit is not None and frame.unit_id != self.authenticated_unit:
            return self._refuse(ERR_IDENTITY, f"certificate belongs to unit "
                                f"{self.authenticated_unit!r}, FAILBACK_START claims "
                                f"{frame.unit_id!r}")
        if self._open_failback is None:
            return self._refuse(ERR_FAILBACK, "this peer hands no role back")
        try:
            source = self._open_failback(frame)
        except LinkRefused as exc:
            return self._refuse(exc.code, exc.text)
        self.failback, self.failback_unit = source, frame.unit_id
        self.state = SessionState.FAILBACK
        plan = source.plan
        self._send(plan)
        changed = sum(bin(b).count("1") for b in plan.changed)
        return [FailbackStarted(frame.unit_id, changed)]

    def _on_switchover(self, frame: SwitchoverStart) -> list[SessionEvent]:
        if frame.unit_id not in self.config.known_units:
            return self._refuse(ERR_UNKNOWN_UNIT, f"unit {frame.unit_id!r} is not known here")
        if self.authenticated_unit is not None and frame.unit_id != self.authenticated_unit:
            return self._refuse(ERR_IDENTITY, f"certificate belongs to unit "
                                f"{self.authenticated_unit!r}, SWITCHOVER_START claims "
                                f"{frame.unit_id!r}")
        if self._switchover is None:
            return self._refuse(ERR_FAILBACK, "this peer takes no switchover")
        try:
            done = self._switchover(frame)
        except LinkRefused as exc:
            return self._refuse(exc.code, exc.text)
        self._send(done)
        self.state = SessionState.CLOSED
        return [SwitchedOver(frame.unit_id, done.seq)]

    def _on_failback_frame(self, frame: Frame) -> list[SessionEvent]:
        source = self.failback
        assert source is not None
        plan = source.plan
        if not isinstance(frame, DigestRequest | ChunkWant | FailbackCommit):
            raise AssertionError(frame)
        if frame.resync_id != plan.resync_id:
            raise LinkProtocolError(f"{type(frame).__name__} for failback {frame.resync_id}, "
                                    f"this one is {plan.resync_id}")
        if isinstance(frame, DigestRequest | ChunkWant):
            for c in frame.chunks:
                if c >= plan.chunk_count:
                    raise LinkProtocolError(f"chunk {c} outside 0..{plan.chunk_count - 1}")
        if isinstance(frame, DigestRequest):
            digests = source.chunk_digests(frame.chunks)
            self._send(ChunkDigests(resync_id=plan.resync_id, chunks=frame.chunks,
                                    digests=tuple(digests[c] for c in frame.chunks)))
            return []
        if isinstance(frame, ChunkWant):
            n, nbytes = self._failback_sent
            for c in frame.chunks:
                data = source.read_chunk(c)
                self._send(ChunkData(resync_id=plan.resync_id, chunk=c, codec=plan.codec,
                                     data=data))
                n, nbytes = n + 1, nbytes + len(data)
            self._failback_sent = (n, nbytes)
            return []
        if frame.seq < plan.seq:
            raise LinkProtocolError(f"failback commits at seq {frame.seq}, before this "
                                    f"copy's seq {plan.seq}")
        source.commit(frame.seq, frame.lineage)
        self.failback = None
        self._send(ResyncDone(plan.resync_id, frame.seq, self._failback_sent[0]))
        self.state = SessionState.CLOSED
        return [FailbackCommitted(self.failback_unit, frame.seq, *self._failback_sent)]

    def _on_hello(self, hello: Hello) -> list[SessionEvent]:
        common = set(hello.versions) & set(self.config.versions)
        if not common:
            return self._refuse(
                ERR_VERSION,
                f"no common protocol version: {hello.versions} vs {self.config.versions} "
                "(both units need firmware speaking the same link protocol)",
            )
        relayed = hello.unit_id in self.relays
        if hello.unit_id not in self.config.known_units and not relayed:
            return self._refuse(ERR_UNKNOWN_UNIT, f"unit {hello.unit_id!r} is not known here")
        if self.authenticated_unit is not None and hello.unit_id != self.authenticated_unit \
                and not relayed:
            return self._refuse(
                ERR_IDENTITY,
                f"certificate belongs to unit {self.authenticated_unit!r}, "
                f"HELLO claims {hello.unit_id!r}",
            )
        if hello.block_size == 0 or hello.volume_size % hello.block_size:
            raise LinkProtocolError(
                f"volume size {hello.volume_size} is not a multiple of "
                f"block size {hello.block_size}"
            )
        try:
            sink = self._open_sink(hello)
        except LinkRefused as exc:
            return self._refuse(exc.code, exc.text)
        self.sink = sink
        self.hello = hello
        # The sender's preference order decides among codecs both sides have.
        self.compression = next(
            (c for c in hello.compression if c in self.config.compression), CODEC_NONE
        )
        self.signature = hello.signature and self.config.allow_signature
        self.barriers = hello.barriers and self.config.barriers
        self.requeue = sink.check_queue(hello.queue_id)
        # While re-queued the sink's seqs mean nothing to this queue: the resync
        # starts from scratch, and it will accept the resync's seq whatever it is.
        durable = 0 if self.requeue else sink.last_durable_seq()
        self._applied = self._high = durable
        self._acked = durable
        self.state = SessionState.STREAMING
        version = max(common)
        self._send(
            HelloAck(
                version=version,
                compression=self.compression,
                signature=self.signature,
                durable_seq=durable,
                requeue=self.requeue,
                barriers=self.barriers,
            )
        )
        if self.own_backup is not None:
            self._send(ConfigPut(unit_id=self.own_backup[0], blob=self.own_backup[1]))
        return [Established(hello.unit_id, version, self.compression, self.signature, durable)]

    def _check_batch(self, writes: Writes) -> tuple[WriteRecord, ...]:
        """Validate a batch; return its records with a seq not yet accepted."""
        assert self.hello is not None
        if writes.codec not in (self.compression, CODEC_NONE):
            raise LinkProtocolError(
                f"WRITES codec {writes.codec!r}, negotiated {self.compression!r}"
            )
        if writes.batch_id <= self._last_batch_id:
            raise LinkProtocolError(
                f"batch id {writes.batch_id} does not follow {self._last_batch_id}"
            )
        bs, size = self.hello.block_size, self.hello.volume_size
        for r in writes.records:
            if r.barrier and not self.barriers:
                raise LinkProtocolError(f"seq {r.seq}: a barrier, which HELLO_ACK refused")
            if not r.is_write:
                continue  # the codec checked its shape; it carries no blocks
            if not r.data or len(r.data) % bs:
                raise LinkProtocolError(
                    f"seq {r.seq}: {len(r.data)} data bytes is not a whole number of blocks"
                )
            if r.lbn * bs + len(r.data) > size:
                raise LinkProtocolError(f"seq {r.seq}: lbn {r.lbn} + {len(r.data)} bytes past end")
        fresh = _after(writes.records, self._high)
        if self.config.require_contiguous:
            expect = self._high + 1
            for r in fresh:
                if r.barrier:
                    if r.seq >= expect:
                        raise LinkProtocolError(
                            f"barrier at seq {r.seq} covers a write not received yet")
                    continue
                if r.seq != expect:
                    raise LinkProtocolError(f"seq {r.seq} arrived where {expect} was due")
                expect = r.last_seq + 1
        return fresh

    def _apply(self, records: tuple[WriteRecord, ...]) -> list[SessionEvent]:
        assert self.sink is not None
        fresh = _after(records, self._applied)
        events: list[SessionEvent] = []
        if fresh:
            self.sink.apply(fresh)
            self._applied = max(self._applied, fresh[-1].last_seq)
            events.append(BatchApplied(fresh[0].seq, fresh[-1].last_seq,
                                       len(records) - len(fresh)))
        # A batch of barriers alone moves no seq: its ACK repeats the last one, so the
        # sender can let the batch go.
        self._ack_durable(force=not any(r.is_write or r.is_skip for r in fresh))
        return events

    def _ack_durable(self, force: bool = False) -> None:
        assert self.sink is not None
        # Never claim more than was handed over, whatever the sink says.
        durable = min(self.sink.last_durable_seq(), self._applied)
        if durable > self._acked or (force and durable >= self._acked):
            self._acked = durable
            self._send(Ack(durable_seq=durable))

    def poll_durable(self) -> None:
        """Acknowledge seqs the sink made durable since the last call (group commit)."""
        if self.state is SessionState.STREAMING:
            self._ack_durable()

    def _on_writes(self, writes: Writes) -> list[SessionEvent]:
        if self._resync is not None:
            raise LinkProtocolError("WRITES while a resync runs")
        if self.requeue:
            raise LinkProtocolError("WRITES before the full resync a new queue needs")
        fresh = self._check_batch(writes)
        self._last_batch_id = writes.batch_id
        if fresh:
            self._high = max(self._high, fresh[-1].last_seq)
        if not self.signature:
            return self._apply(fresh)
        nbytes = sum(len(r.data) for r in writes.records)
        if sum(p.nbytes for p in self._pending) + nbytes > self.config.max_pending_bytes:
            raise LinkProtocolError(f"receive buffer over {self.config.max_pending_bytes} bytes")
        self._pending.append(_Pending(writes.batch_id, fresh, nbytes))
        self._send(Digest(batch_id=writes.batch_id, digest=batch_digest(writes.records)))
        return []

    def _on_commit(self, commit: Commit) -> list[SessionEvent]:
        if not self._pending or self._pending[0].batch_id != commit.batch_id:
            oldest = self._pending[0].batch_id if self._pending else None
            raise LinkProtocolError(f"COMMIT {commit.batch_id}, oldest pending batch is {oldest}")
        return self._apply(self._pending.pop(0).records)

    def _on_abort(self, abort: Abort) -> list[SessionEvent]:
        i = next((i for i, p in enumerate(self._pending) if p.batch_id == abort.batch_id), -1)
        if i < 0:
            raise LinkProtocolError(f"ABORT for batch {abort.batch_id}, which is not pending")
        p = self._pending[i]
        first = p.records[0].seq if p.records else self._high + 1
        del self._pending[i:]
        self._high = max(
            [self._applied] + [q.records[-1].last_seq for q in self._pending if q.records]
        )
        return [BatchAborted(abort.batch_id, first, abort.reason)]
