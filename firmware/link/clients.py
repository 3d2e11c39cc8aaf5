"""Sans-IO client sides of the journey link's short exchanges, each one connection
long, beside the long-running `SenderSession`:

- `ConfigFetchSession`: a unit with its identity asks a peer for its sealed config
  backup (CONFIG_GET before any HELLO; the server side is `ReceiverSession`).
- `RecoveryClientSession`: a replaced unit without a certificate proves the admin
  password for its backup (recovery.py has the exchange and its server side).
- `PairOfferSession`: a local offers its certificate to a remote (pairing.py).
- `FailbackClientSession`: a fenced local gives up its writes since the remote's
  promotion and pulls the chunks that differ, so that it holds the remote's image
  and becomes the primary again (docs/failover.md).

Like the other sessions they are fed bytes (`receive_data`) and queue bytes
(`data_to_send`); the shell owns the socket.  An ERROR answer raises `LinkRefused`
with its code; a frame the exchange does not allow raises `LinkProtocolError`.
Once `is_finished`, `result` holds what the exchange brought back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from firmware.lineage import Lineage
from firmware.link.errors import LinkError, LinkProtocolError, LinkRefused
from firmware.link.frames import (
    MAX_DIGEST_CHUNKS,
    Bye,
    ChunkData,
    ChunkDigests,
    ChunkWant,
    ConfigBlob,
    ConfigGet,
    DigestRequest,
    ErrorFrame,
    FailbackCommit,
    FailbackPlan,
    FailbackStart,
    Frame,
    FrameDecoder,
    Paired,
    PairOffer,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    ResyncDone,
    encode_frame,
)

T = TypeVar("T")


class _ShortClient(Generic[T]):
    def __init__(self, first: Frame) -> None:
        self._decoder = FrameDecoder()
        self._out = bytearray(encode_frame(first))
        self._result: T | None = None
        self._finished = False

    @property
    def is_finished(self) -> bool:
        return self._finished

    @property
    def result(self) -> T:
        if not self._finished:
            raise LinkError("the exchange has not finished")
        return self._result  # type: ignore[return-value]

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed the peer's bytes; frames after the one that finished are ignored."""
        for frame in self._decoder.receive_data(data):
            if self._finished:
                return
            if isinstance(frame, ErrorFrame):
                raise LinkRefused(frame.code, frame.text)
            self._on_frame(frame)

    def _send(self, frame: Frame) -> None:
        self._out += encode_frame(frame)

    def _finish(self, result: T) -> None:
        self._result = result
        self._finished = True

    def _on_frame(self, frame: Frame) -> None:
        raise NotImplementedError


class ConfigFetchSession(_ShortClient[bytes | None]):
    """Asks for unit `unit_id`'s sealed config backup; `result` is the blob, None
    when the peer keeps none."""

    def __init__(self, unit_id: str) -> None:
        super().__init__(ConfigGet(unit_id))
        self.unit_id = unit_id

    def _on_frame(self, frame: Frame) -> None:
        # Anything else the peer may say first is not an answer to this question.
        if isinstance(frame, ConfigBlob) and frame.unit_id == self.unit_id:
            self._finish(frame.blob)


class RecoveryClientSession(_ShortClient[tuple[str, bytes | None]]):
    """Recovers unit `unit_id`'s backup (None: the only unit the peer keeps).
    `prove` turns the challenge into the proof (see recovery.py); without it the
    exchange says BYE after the challenge.  `result` is (unit id, blob or None)."""

    def __init__(self, unit_id: str | None,
                 prove: Callable[[RecoverChallenge], bytes] | None) -> None:
        super().__init__(RecoverHello(unit_id))
        self._prove = prove
        self._challenge: RecoverChallenge | None = None

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, RecoverChallenge) and self._challenge is None:
            self._challenge = frame
            if self._prove is None:
                self._send(Bye())
                self._finish((frame.unit_id, None))
            else:
                self._send(RecoverProof(self._prove(frame)))
        elif isinstance(frame, ConfigBlob) and self._challenge is not None \
                and frame.unit_id == self._challenge.unit_id and frame.blob:
            self._finish((frame.unit_id, frame.blob))
        else:
            raise LinkProtocolError(
                f"unexpected {type(frame).__name__} in the recovery exchange")


class PairOfferSession(_ShortClient[str]):
    """Offers this unit's certificate; `result` is the name the peer pinned it under."""

    def __init__(self, unit_id: str, cert_der: bytes) -> None:
        super().__init__(PairOffer(unit_id, cert_der))

    def _on_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Paired):
            raise LinkProtocolError(
                f"unexpected {type(frame).__name__} in answer to PAIR_OFFER")
        self._finish(frame.unit_id)


def bitmap_chunks(bits: bytes, count: int) -> set[int]:
    """The chunks set in a plan's bitmap (chunk c in byte c // 8, bit c % 8)."""
    out = set()
    for i, b in enumerate(bits):
        while b:
            low = b & -b
            c = i * 8 + low.bit_length() - 1
            if c < count:
                out.add(c)
            b ^= low
    return out


class FailbackTarget(Protocol):
    """The local copy that takes the remote's image (firmware/local/failback.py)."""

    def prepare(self, plan: FailbackPlan) -> set[int]:
        """Check the plan against this copy, keep this copy's writes that the remote's
        image lacks (the conflict image), and return the chunks they touch."""

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]: ...

    def chunk_length(self, chunk: int) -> int:
        """Bytes in chunk `chunk` (the last one of a volume may be short)."""

    def take_chunk(self, chunk: int, data: bytes) -> None:
        """Make chunk `chunk` hold `data`, durably."""

    def commit_point(self, plan: FailbackPlan) -> tuple[int, Lineage]:
        """The seq from which this copy's queue goes on, and its new lineage."""

    def committed(self, seq: int, lineage: Lineage) -> None:
        """The remote follows this copy now: record the lineage, serve the host."""


@dataclass(frozen=True)
class FailbackResult:
    seq: int
    lineage: Lineage
    #: chunks whose digests were compared (the union of both sides' changes)
    chunks_compared: int
    #: chunks that differed and were pulled, and their bytes
    chunks_moved: int
    bytes_moved: int
    #: chunks the remote's host changed, and chunks of this copy's own writes
    chunks_changed_remote: int
    chunks_changed_here: int


class FailbackClientSession(_ShortClient[FailbackResult]):
    """Pulls the remote's image: digests of every chunk either side changed since the
    fork, then the contents of those that differ, then FAILBACK_COMMIT.  At most
    `window` DIGEST_REQ batches are in flight."""

    def __init__(self, unit_id: str, lineage: Lineage, codecs: tuple[str, ...],
                 target: FailbackTarget, window: int = 2) -> None:
        super().__init__(FailbackStart(unit_id, lineage, codecs))
        self.target = target
        self.window = window
        self.plan: FailbackPlan | None = None
        self._todo: deque[int] = deque()
        self._asked: deque[tuple[int, ...]] = deque()
        self._wanted: set[int] = set()
        self._compared = self._moved = self._bytes = 0
        self._remote = self._here = 0
        self._committing = False
        self._commit: tuple[int, Lineage] = (0, lineage)

    def _on_frame(self, frame: Frame) -> None:
        plan = self.plan
        if isinstance(frame, FailbackPlan) and plan is None:
            self.plan = frame
            remote = bitmap_chunks(frame.changed, frame.chunk_count) | \
                bitmap_chunks(frame.dropped, frame.chunk_count)
            here = self.target.prepare(frame)
            self._remote, self._here = len(remote), len(here)
            self._todo.extend(sorted(remote | here))
            self._pump()
            return
        if plan is None:
            raise LinkProtocolError(f"unexpected {type(frame).__name__} before FAILBACK_PLAN")
        if isinstance(frame, ChunkDigests) and frame.resync_id == plan.resync_id \
                and self._asked and frame.chunks == self._asked[0]:
            self._asked.popleft()
            mine = self.target.chunk_digests(frame.chunks)
            differ = tuple(c for c, d in zip(frame.chunks, frame.digests, strict=True)
                           if mine[c] != d)
            self._compared += len(frame.chunks)
            if differ:
                self._wanted.update(differ)
                self._send(ChunkWant(plan.resync_id, differ))
        elif isinstance(frame, ChunkData) and frame.resync_id == plan.resync_id \
                and frame.chunk in self._wanted:
            want = self.target.chunk_length(frame.chunk)
            if len(frame.data) != want:
                raise LinkProtocolError(f"CHUNK {frame.chunk} of {len(frame.data)} bytes, "
                                        f"the chunk holds {want}")
            self.target.take_chunk(frame.chunk, frame.data)
            self._wanted.discard(frame.chunk)
            self._moved += 1
            self._bytes += len(frame.data)
        elif isinstance(frame, ResyncDone) and self._committing \
                and frame.resync_id == plan.resync_id:
            seq, lineage = self._commit
            self.target.committed(seq, lineage)
            self._finish(FailbackResult(seq, lineage, self._compared, self._moved,
                                        self._bytes, self._remote, self._here))
            return
        else:
            raise LinkProtocolError(f"unexpected {type(frame).__name__} in the failback")
        self._pump()

    def _pump(self) -> None:
        plan = self.plan
        assert plan is not None
        while self._todo and len(self._asked) < self.window:
            batch = tuple(self._todo.popleft()
                          for _ in range(min(MAX_DIGEST_CHUNKS, len(self._todo))))
            self._asked.append(batch)
            self._send(DigestRequest(plan.resync_id, batch))
        if not self._todo and not self._asked and not self._wanted and not self._committing:
            self._commit = self.target.commit_point(plan)
            self._committing = True
            self._send(FailbackCommit(plan.resync_id, *self._commit))
