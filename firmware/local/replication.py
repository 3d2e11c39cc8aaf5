"""The local unit's replication service: one CBQ consumer and one `LinkClient`
per configured remote, run as a service of the local unit process.

`CbqSource` adapts a CBQ consumer cursor to the sender's `WriteSource` (and
`ResyncSource`): records go out in seq order, only acknowledged seqs are released
in the CBQ, and when the consumer needs a checksum resync (CBQ overflow, a new
peer, a remote that lost its place) it plans one over the dirty chunks or the
whole volume.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.blockdev import DeviceState
from firmware.cbq import CircularBufferQueue
from firmware.cbq.errors import CbqError
from firmware.control.status import (
    ConsumerStats,
    LinkStatus,
    PeerLinkStatus,
    RefusalStatus,
    ResyncProgress,
)
from firmware.fsutil import write_atomic
from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.link.clients import FailbackClientSession, SwitchoverClientSession
from firmware.link.digests import sparse_chunk_digests
from firmware.link.errors import LinkError, LinkRefused, SourceGap
from firmware.link.frames import WriteRecord, barrier_record, codec_offer, skip_record
from firmware.link.session import (
    ERR_DIVERGED,
    ERR_FENCED,
    ERR_HANDED_BACK,
    ERR_SPLIT_BRAIN,
    LINEAGE_REFUSALS,
    BatchAborted,
    ConfigReceived,
    Established,
    PeerRefusal,
    ResyncFinished,
    ResyncPlan,
    SenderConfig,
    SessionEvent,
)
from firmware.link.shell import Backoff, LinkClient, failback_exchange, switchover_exchange
from firmware.link.tls import Identity, PeerStore
from firmware.local.failback import FailbackError, LocalFailback
from firmware.units import AddressError, fingerprint_hex, split_host_port

log = logging.getLogger("mirrorunit.link")

#: A marker file in the state dir: this peer must get a whole-volume resync (it was
#: added after the volume had data, so no dirty map covers what it lacks).
FULL_RESYNC_SUFFIX = ".full-resync"
#: Seq ranges discarded from the queue (`cbq discard`) that this peer has not yet
#: confirmed as skipped.  The CBQ forgets a discarded range once every consumer's
#: ack passed it, and lets an ack carry a consumer over discarded seqs right after
#: it, so only this ledger still explains the gap after a reconnect or a restart.
SKIPS_SUFFIX = ".skips.json"


def default_local_state_dir(buffer: Path) -> Path:
    """Where a local unit keeps its link identity, pins and replication state when no
    --state-dir is given: beside its CBQ."""
    return buffer.parent / (buffer.name + ".link")


def mark_full_resync(state_dir: Path, name: str, reason: str) -> None:
    """Leave the marker that peer `name` needs a whole-volume resync, durably: a
    restart that lost it would let the dirty map (which misses what the peer lacks)
    decide.  The marker holds the reason, for whoever looks at the state dir."""
    write_atomic(state_dir / (name + FULL_RESYNC_SUFFIX), (reason + "\n").encode(), 0o644)


def _covers(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the union of `ranges` contains every seq lo..hi."""
    for a, b in sorted(ranges):
        if a <= lo <= b:
            lo = b + 1
            if lo > hi:
                return True
    return lo > hi


#: Digest batches computed ahead of the remote's answers: the sender keeps
#: DIGEST_WINDOW requests outstanding, a few more cover a reconnect's leftovers.
DIGEST_AHEAD = 8


class DigestAhead:
    """Computes the local digests of the chunks the remote was just asked about, in a
    thread of its own, while the request and the answer cross the link and the remote
    digests its side: both ends read at once instead of one after the other.  Bounded:
    at most DIGEST_AHEAD batches are kept, the oldest dropped first (recomputed if
    asked for)."""

    def __init__(self, compute: Callable[[Sequence[int]], dict[int, bytes]],
                 limit: int = DIGEST_AHEAD) -> None:
        self._compute = compute
        self._limit = limit
        self._jobs: OrderedDict[tuple[int, ...], Future[dict[int, bytes]]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, chunks: Sequence[int]) -> None:
        key = tuple(chunks)
        with self._lock:
            if key in self._jobs:
                return
            while len(self._jobs) >= self._limit:
                _, old = self._jobs.popitem(last=False)
                old.cancel()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="digest-ahead")
            self._jobs[key] = self._pool.submit(self._compute, key)

    def take(self, chunks: Sequence[int]) -> dict[int, bytes]:
        with self._lock:
            job = self._jobs.pop(tuple(chunks), None)
        if job is None or job.cancelled():
            return self._compute(chunks)
        return job.result()

    def clear(self) -> None:
        """Drop what was computed for an earlier exchange (its chunks may have changed)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel()
            self._jobs.clear()

    def close(self) -> None:
        self.clear()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class CbqSource:
    """`WriteSource` + `ResyncSource` over one consumer of the local CBQ.

    Records handed to the sender but not yet acknowledged stay in memory (the
    sender's window bounds them), so a rewind within the window costs no re-read."""

    def __init__(self, cbq: CircularBufferQueue, name: str, volume: Any,
                 state_dir: Path, read_records: int = 256) -> None:
        self.cbq = cbq
        self.name = name
        self.volume = volume
        self.state_dir = state_dir
        self.chunk_size = cbq.geo.chunk_size
        self.block_size = cbq.geo.block_size
        self._read_records = read_records
        self._lock = threading.Lock()
        self._handed: deque[WriteRecord] = deque()
        self._stash: deque[WriteRecord] = deque()
        self._skip_upto = 0
        #: The seq the next record handed to the sender must start at.
        self._next_seq = cbq.consumers[name].acked_seq + 1
        self._ledger: list[tuple[int, int]] = self._load_ledger()
        self.skips_sent = 0
        self._verify_requested = False
        self.last_verify: dict[str, Any] | None = None
        self.resync: ResyncProgress | None = None
        self._resync_t0 = 0.0
        self._ahead = DigestAhead(self._digest_chunks)
        self.resyncs_done = 0
        self.resync_bytes_sent = 0
        #: Logical blocks of queued writes handed to the link (a resend after a reconnect
        #: counts again) and acknowledged by the remote as durable; resync chunks apart.
        self.blocks_sent = 0
        self.blocks_acked = 0

    # ---------------------------------------------------------------- WriteSource

    def head_seq(self) -> int:
        """The newest seq this copy holds (sent in HELLO)."""
        return self.cbq.last_seq

    def _consumer_needs_resync(self) -> bool:
        c = self.cbq.consumers.get(self.name)
        return c is not None and c.needs_resync

    # ---------------------------------------------------------------- skips

    @property
    def _ledger_path(self) -> Path:
        return self.state_dir / (self.name + SKIPS_SUFFIX)

    def _load_ledger(self) -> list[tuple[int, int]]:
        try:
            raw = json.loads(self._ledger_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("%s: skip ledger %s unreadable (%s); discarded ranges the remote "
                      "has not confirmed will need a resync", self.name, self._ledger_path, exc)
            return []
        return [(int(a), int(b)) for a, b in raw]

    def _save_ledger(self) -> None:
        # Before an ack releases the discarded seqs, or a restart could forget them.
        write_atomic(self._ledger_path, json.dumps([list(r) for r in self._ledger]).encode(),
                     0o644)

    def _note_gaps(self, prev: int, seqs: list[int], read_upto: int) -> None:
        """Seqs the queue walked past without returning them were discarded: keep them
        in the ledger before an ack can carry the consumer (and the CBQ's memory of
        the discard) past them."""
        gaps = []
        p = prev
        for seq in [*seqs, read_upto + 1]:
            if seq > p + 1:
                gaps.append((p + 1, seq - 1))
            p = max(p, seq)
        if not gaps:
            return
        discards = [(int(a), int(b)) for a, b in self.cbq.discards]
        for lo, hi in gaps:
            if not _covers(discards, lo, hi):
                raise LinkError(f"{self.name}: the queue skipped seqs {lo}..{hi}, which "
                                "are not discarded")
        merged: list[tuple[int, int]] = []
        for a, b in sorted(self._ledger + gaps):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._ledger = merged
        self._save_ledger()

    def _skipped(self, lo: int, hi: int) -> bool:
        return _covers(self._ledger + [(int(a), int(b)) for a, b in self.cbq.discards], lo, hi)

    def _skip_to(self, hi: int) -> WriteRecord:
        lo = self._next_seq
        if not self._skipped(lo, hi):
            raise LinkError(f"{self.name}: seqs {lo}..{hi} are missing from the queue and "
                            "were not discarded")
        self.skips_sent += 1
        log.warning("%s: seqs %d..%d were discarded here; the remote is told to skip them",
                    self.name, lo, hi)
        return skip_record(lo, hi, time.time_ns())

    # ---------------------------------------------------------------- WriteSource

    def next_batch(self, max_bytes: int) -> list[WriteRecord]:
        with self._lock:
            if self._consumer_needs_resync():
                return []  # the queue overflowed: stop streaming, resync next
            out: list[WriteRecord] = []
            total = 0
            while True:
                if not self._stash:
                    c = self.cbq.consumers[self.name]
                    prev = c.read_seq
                    got = self.cbq.read(self.name, max_records=self._read_records,
                                        max_bytes=max(max_bytes, 1 << 20), barriers=True)
                    if not c.needs_resync:
                        self._note_gaps(prev, [q.seq for q in got if not q.barrier],
                                        c.read_seq)
                    if not got:
                        # Discarded seqs at the end of what is queued: a skip alone.
                        upto = max(c.read_seq, c.acked_seq)
                        if upto >= self._next_seq and not c.needs_resync:
                            skip = self._skip_to(upto)
                            out.append(skip)
                            self._next_seq = skip.last_seq + 1
                        break
                    self._stash.extend(
                        barrier_record(q.seq, q.timestamp_ns, q.flags, q.connection,
                                       q.cum_blocks) if q.barrier
                        else WriteRecord(seq=q.seq, lbn=q.lbn, data=q.data, ts=q.timestamp_ns)
                        for q in got if q.seq > self._skip_upto
                        or (q.barrier and q.seq == self._skip_upto))
                    continue
                r = self._stash[0]
                if r.barrier:
                    # It covers the write before it; one older than the last write handed
                    # out was resent by the queue after a rewind of ours.
                    self._stash.popleft()
                    if r.seq >= self._next_seq - 1:
                        out.append(r)
                    continue
                if r.seq < self._next_seq:
                    self._stash.popleft()  # resent by the queue after a rewind of ours
                    continue
                if r.seq > self._next_seq:
                    skip = self._skip_to(r.seq - 1)
                    out.append(skip)
                    self._next_seq = skip.last_seq + 1
                if out and total + len(r.data) > max_bytes:
                    break
                out.append(self._stash.popleft())
                self._next_seq = r.seq + 1
                total += len(r.data)
                if total >= max_bytes:
                    break
            self._handed.extend(out)
            self.blocks_sent += sum(len(r.data) for r in out) // self.block_size
            return out

    def ack(self, seq: int) -> None:
        with self._lock:
            seq = min(seq, self.cbq.durable_seq)
            try:
                self.cbq.ack(self.name, seq)
            except CbqError as exc:
                raise LinkError(f"CBQ refused ack {seq} for {self.name}: {exc}") from None
            # A barrier at the acknowledged seq itself stays: it may have gone in a later
            # batch than its write, and a rewind to `seq` must send it again.
            while self._handed and (self._handed[0].seq < seq if self._handed[0].barrier
                                    else self._handed[0].last_seq <= seq):
                self.blocks_acked += len(self._handed.popleft().data) // self.block_size
            if self._ledger and self._ledger[0][0] <= seq:
                self._ledger = [(max(a, seq + 1), b) for a, b in self._ledger if b > seq]
                self._save_ledger()

    def rewind_to(self, seq: int) -> None:
        with self._lock:
            acked = self.cbq.consumers[self.name].acked_seq
            # The CBQ's ack carries a consumer over discarded seqs right after the
            # acked one; the remote may not have had their skip yet.
            if seq < acked and not self._skipped(seq + 1, acked):
                raise SourceGap(f"{self.name}: seqs up to {acked} are released, "
                                f"cannot resend from {seq + 1}")
            # Skips are not put back: they are cut afresh from the gap they leave.  A
            # barrier at `seq` itself goes back: the remote may not have it yet.
            def resent(r: WriteRecord) -> bool:
                return r.seq >= seq if r.barrier else r.seq > seq

            back = [r for r in self._handed if resent(r) and not r.is_skip]
            keep = [r for r in self._handed if r.last_seq <= seq and not resent(r)]
            self._handed = deque(keep)
            self._stash = deque(r for r in [*back, *self._stash] if resent(r))
            self._skip_upto = max(self._skip_upto, seq)
            self._next_seq = seq + 1

    # ---------------------------------------------------------------- ResyncSource

    @property
    def _full_marker(self) -> Path:
        return self.state_dir / (self.name + FULL_RESYNC_SUFFIX)

    def request_verify(self) -> None:
        self._verify_requested = True

    def require_full_resync(self, reason: str) -> None:
        with self._lock:
            if not self._full_marker.exists():
                log.warning("%s: %s; it gets a whole-volume checksum resync", self.name, reason)
                mark_full_resync(self.state_dir, self.name, reason)

    def _all_chunks(self) -> tuple[int, ...]:
        return tuple(range(self.cbq.geo.chunks))

    def resync_plan(self, remote_durable: int) -> ResyncPlan | None:
        with self._lock:
            c = self.cbq.consumers[self.name]
            # Behind the consumer's ack without an overflow to explain it, the remote
            # lost writes (a new or restored store): no dirty map covers that.
            full = self._full_marker.exists() or (
                remote_durable < c.acked_seq and not c.needs_resync
                and not self._skipped(remote_durable + 1, c.acked_seq))
            if c.needs_resync or full:
                dirty = self.cbq.begin_resync()
                # The consumer's acked seq is where streaming resumes: every write after
                # it is still queued for this peer.
                seq = self.cbq.consumers[self.name].acked_seq
                chunks = self._all_chunks() if full else tuple(dirty)
                if full and not self._full_marker.exists():
                    # A restart mid-resync must not fall back to the (partial) dirty map.
                    mark_full_resync(self.state_dir, self.name,
                                     f"remote at seq {remote_durable}, behind the ack "
                                     f"{c.acked_seq}")
                self._handed.clear()
                self._stash.clear()
                self.cbq.rewind(self.name)
                self._skip_upto = seq
                self._next_seq = seq + 1
                self._begin_progress("full" if full else "dirty", len(chunks), seq)
                log.warning("%s: checksum resync over %d %s chunks (remote at seq %d, "
                            "local resumes after %d)", self.name, len(chunks),
                            "volume" if full else "dirty", remote_durable, seq)
                return ResyncPlan(verify=False, seq=seq, chunks=chunks)
            # Nothing in flight but barriers kept back at the acknowledged seq (see ack).
            idle = all(r.barrier and r.seq <= c.acked_seq for r in self._handed)
            if self._verify_requested and idle and not self._stash:
                self._verify_requested = False
                self._begin_progress("verify", self.cbq.geo.chunks, remote_durable)
                return ResyncPlan(verify=True, seq=remote_durable, chunks=self._all_chunks())
            return None

    def _begin_progress(self, kind: str, chunks: int, seq: int) -> None:
        self._ahead.clear()
        self._resync_t0 = time.monotonic()
        self.resync = ResyncProgress(
            kind=kind, chunks=chunks, chunk_bytes=self.chunk_size, seq=seq,
            started_ns=time.time_ns(), chunks_done=0, chunks_differing=0,
            chunks_per_s=0.0, mib_per_s=0.0, eta_s=None)

    def read_chunk(self, chunk: int) -> bytes:
        off = chunk * self.chunk_size
        n = min(self.chunk_size, self.volume.size - off)
        return bytes(self.volume.pread(off, n))

    def _digest_chunks(self, chunks: Sequence[int]) -> dict[int, bytes]:
        # Holes of the mirror file (and no write of them in the RAM cache) are zero
        # chunks: not read.  A volume that cannot tell (a block device) reads them all.
        return sparse_chunk_digests(chunks, self.chunk_size, self.volume.size,
                                    self.volume.pread,
                                    getattr(self.volume, "data_extents", None),
                                    getattr(self.volume, "will_need", None))

    def prefetch_digests(self, chunks: Sequence[int]) -> None:
        """The session asked the remote for these chunks: digest them meanwhile."""
        self._ahead.submit(chunks)

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        return self._ahead.take(chunks)

    def resync_progress(self, done: int, total: int, differing: int) -> None:
        r = self.resync
        if r is None:
            return
        secs = max(time.monotonic() - self._resync_t0, 1e-6)
        rate = done / secs
        self.resync = ResyncProgress(
            kind=r["kind"], chunks=total, chunk_bytes=r["chunk_bytes"], seq=r["seq"],
            started_ns=r["started_ns"], chunks_done=done, chunks_differing=differing,
            chunks_per_s=round(rate, 1),
            mib_per_s=round(rate * self.chunk_size / (1 << 20), 1),
            eta_s=round((total - done) / rate, 1) if rate > 0 else None)

    def close(self) -> None:
        self._ahead.close()

    def resync_finished(self, plan: ResyncPlan, differing: list[int], seq: int) -> None:
        with self._lock:
            now = time.time_ns()
            if plan.verify:
                self.last_verify = {"finished_ns": now, "seq": seq,
                                    "chunks_compared": len(plan.chunks),
                                    "differing_chunks": differing}
                log.warning("%s: verify compared %d chunks, %d differ%s", self.name,
                            len(plan.chunks), len(differing),
                            f": {differing[:16]}" if differing else "")
            else:
                c = self.cbq.consumers[self.name]
                if not (c.needs_resync and c.acked_seq > plan.seq):
                    # Unless the queue overflowed again meanwhile, this peer is whole.
                    self.cbq.resync_done(self.name)
                    self._full_marker.unlink(missing_ok=True)
                self.resyncs_done += 1
                self.resync_bytes_sent += len(differing) * self.chunk_size
            self.resync = None


# --------------------------------------------------------------------------- lineage


def load_local_lineage(state_dir: Path, *, queue_used: bool) -> Lineage | None:
    """The local copy's lineage.  With no lineage file, a copy whose queue never held a
    write is new and gets a first generation as the primary.  One whose queue already
    holds seqs is a copy from before lineages, or one whose state directory was lost and
    rebuilt (a replaced card whose data and queue survived): it sends no lineage, and
    each remote decides from its own record of this copy, as for an older local;
    making up a new generation would make it unrelated to every remote that knows it."""
    path = state_dir / lineage_store.FILE_NAME
    try:
        lineage = lineage_store.load(path)
    except lineage_store.LineageCorruption as exc:
        # The host is still served.  A stand-in that is never saved shares no generation
        # with a remote that met this copy before, so such a remote refuses it (nothing
        # moves) until the file is looked at; the damaged file stays as it is.
        log.error("local copy: %s; replication is refused until it is repaired", exc)
        return Lineage.first(Role.PRIMARY, time.time(), random.SystemRandom())
    if lineage is None and queue_used:
        log.warning("local copy: no lineage file in %s while the queue holds seqs: the "
                    "remotes decide from their own record of this copy", state_dir)
        return None
    if lineage is None:
        state_dir.mkdir(parents=True, exist_ok=True)
        lineage = Lineage.first(Role.PRIMARY, time.time(), random.SystemRandom())
        lineage_store.save(path, lineage)
        log.info("local copy: first generation %016x", lineage.generation)
    return lineage


# --------------------------------------------------------------------------- service


@dataclass
class RemoteSpec:
    name: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RemoteSpec:
        name, sep, addr = text.partition("=")
        try:
            host, port = split_host_port(addr)
        except AddressError as exc:
            raise ValueError(f"--remote {text!r}: expected NAME=HOST:PORT ({exc})") from None
        if not sep or not name:
            raise ValueError(f"--remote {text!r}: expected NAME=HOST:PORT")
        return cls(name, host, port)


@dataclass
class _Peer:
    spec: RemoteSpec
    source: CbqSource
    client: LinkClient | None = None
    paused: bool = False
    events: int = 0
    aborted: int = 0
    last_resync: dict[str, Any] | None = None
    #: The remote refused this copy on the two lineages: {"code", "reason", "since_ns"}.
    #: Kept until a session is established again; the host is served meanwhile and
    #: its writes keep queueing.
    refused: RefusalStatus | None = None


class LinkService:
    """Runs one `LinkClient` per remote; status and control ops for each."""

    name = "link"

    def __init__(self, *, cbq: CircularBufferQueue, volume: Any, identity: Identity,
                 peers: PeerStore, unit_id: str, remotes: list[RemoteSpec], state_dir: Path,
                 bandwidth: float | None = None, compression: str = "auto",
                 keepalive: float = 5.0, dead_after: float = 20.0,
                 backoff_max: float = 10.0, signature: bool = False,
                 config_path: Path | None = None) -> None:
        self.cbq = cbq
        self.volume = volume
        self.identity = identity
        self.peers = peers
        self.unit_id = unit_id
        self.state_dir = state_dir
        #: The cap of each remote's link in bytes/s (None: none); `set_bandwidth`.
        self.bandwidth = bandwidth or None
        #: auto, zstd, zlib or none, and the codecs offered for it; `set_compression`.
        self.compression_setting = compression
        self.compression = codec_offer(compression)
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.backoff_max = backoff_max
        #: Ask every remote for the digest handshake (DIGEST / COMMIT / ABORT).
        self.signature = signature
        #: The unit's config partition, sealed for the peers by `seal_config`.
        self.config_path = config_path
        self._backup_cache: tuple[tuple[int, int] | None, bytes | None] = (None, None)
        #: Seals each new config generation for the peers, unattended.
        self.sealer: Any = None
        if config_path is not None:
            from firmware.config.peer_backup import AutoSealer
            from firmware.config.store import open_store

            self.sealer = AutoSealer(open_store(config_path), self.own_backup_path,
                                     self._sealed_identity, on_sealed=self._backup_sealed)
        #: Who may receive this unit's sealed config (its `backup.keepers`).
        self.keepers: Any = None
        if config_path is not None:
            from firmware.config.peer_backup import BackupKeepers
            from firmware.config.store import open_store

            self.keepers = BackupKeepers(open_store(config_path))
        #: This copy's generations, in the state dir beside the queue (the CBQ's own
        #: superblock keeps no lineage); None when unknown (see load_local_lineage).
        self.lineage = load_local_lineage(
            state_dir, queue_used=cbq.last_seq > 0
            or any(c.acked_seq > 0 for c in cbq.consumers.values()))
        self._peers: dict[str, _Peer] = {}
        for spec in remotes:
            if spec.name not in cbq.consumers:
                # A peer added to a volume that may already hold data: only a
                # whole-volume resync can bring it level.
                cbq.add_consumer(spec.name)
                mark_full_resync(state_dir, spec.name, "added to a volume that may hold data")
                log.warning("remote %s is new: added as CBQ consumer; it gets a full resync",
                            spec.name)
            self._peers[spec.name] = _Peer(spec, CbqSource(cbq, spec.name, volume, state_dir))

    def _make_client(self, peer: _Peer) -> LinkClient:
        config = SenderConfig(
            unit_id=self.unit_id, volume_size=self.volume.size,
            block_size=self.volume.block_size,
            resume_seq=self.cbq.consumers[peer.spec.name].acked_seq,
            compression=self.compression, signature=self.signature,
            queue_id=self.cbq.geo.salt, lineage=self.lineage, barriers=True)
        client = LinkClient((peer.spec.host, peer.spec.port), self.identity, self.peers,
                            peer.spec.name, config, peer.source, bandwidth=self.bandwidth,
                            backoff=Backoff(maximum=self.backoff_max),
                            keepalive=self.keepalive, dead_after=self.dead_after)

        def on_event(event: SessionEvent) -> None:
            peer.events += 1
            if isinstance(event, ResyncFinished):
                peer.last_resync = {"verify": event.verify, "seq": event.seq,
                                    "chunks_compared": event.chunks_compared,
                                    "differing": len(event.differing),
                                    "bytes_sent": event.bytes_sent,
                                    "finished_ns": time.time_ns()}
            elif isinstance(event, BatchAborted):
                peer.aborted += 1
            elif isinstance(event, ConfigReceived):
                self._keep_peer_backup(peer.spec.name, event.blob)
            elif isinstance(event, PeerRefusal) and event.code in LINEAGE_REFUSALS:
                self._refused(peer, event.code, event.text)
            elif isinstance(event, Established) and peer.refused is not None:
                log.warning("remote %s takes this copy's writes again", peer.spec.name)
                peer.refused = None

        client.listeners.append(on_event)
        name = peer.spec.name

        def backup_for_peer() -> bytes | None:
            # The blob holds this unit's TLS key: only a named keeper receives it.
            if self.keepers is None or not self.keepers.allows(name):
                return None
            return self.own_backup()

        client.config_backup = backup_for_peer
        return client

    def _refused(self, peer: _Peer, code: str, text: str) -> None:
        old = peer.refused
        if old is None or (old["code"], old["reason"]) != (code, text):
            peer.refused = {"code": code, "reason": text, "since_ns": time.time_ns()}
            what = {ERR_FENCED: "FENCED by", ERR_SPLIT_BRAIN: "in SPLIT BRAIN with"}.get(
                code, "REFUSED by")
            log.error("this copy is %s remote %s: %s; the host is still served and its "
                      "writes keep queueing, nothing is sent until an operator acts",
                      what, peer.spec.name, text)

    # ---------------------------------------------------------------- config backups

    @property
    def own_backup_path(self) -> Path:
        from firmware.config.peer_backup import OWN_BACKUP_NAME

        return self.state_dir / OWN_BACKUP_NAME

    def own_backup(self) -> bytes | None:
        """This unit's sealed config as last written (re-read when the file changes)."""
        try:
            st = self.own_backup_path.stat()
        except FileNotFoundError:
            return None
        # Blobs are replaced by rename: a new inode even within one mtime tick.
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._backup_cache[0]:
            self._backup_cache = (stamp, self.own_backup_path.read_bytes() or None)
        return self._backup_cache[1]

    def _sealed_identity(self) -> Any:
        from firmware.config.seal import SealedIdentity
        from firmware.link.tls import export_identity

        return SealedIdentity(*export_identity(self.identity, self.peers.path))

    def _backup_sealed(self, blob: bytes) -> None:
        # The clients compare the blob with what they sent; wake them to do it now.
        for peer in self._peers.values():
            if peer.client is not None:
                peer.client.wakeup()

    def _keep_peer_backup(self, name: str, blob: bytes) -> None:
        from firmware.config.peer_backup import peer_backup_name, read_blob, write_blob

        path = self.state_dir / peer_backup_name(name)
        if read_blob(path) != blob:
            write_blob(path, blob)
            log.info("kept remote %s's sealed config backup (%d bytes)", name, len(blob))

    def seal_config(self, password: str) -> dict[str, Any]:
        """Seal the unit's config under the admin password (checked) for the peers;
        each connected peer gets it at once, the others when they connect.  A config
        without seal key material gets it stored, so later changes seal unattended."""
        from firmware.config.peer_backup import seal_config, write_blob
        from firmware.config.store import open_store

        if self.config_path is None:
            raise ValueError("this unit was started without --config: no config to seal")
        blob = seal_config(open_store(self.config_path), password, self._sealed_identity())
        write_blob(self.own_backup_path, blob)
        if self.sealer is not None:
            self.sealer.poll()  # takes note of the generation that stored the key
        self._backup_sealed(blob)
        log.warning("config sealed for the peers (%d bytes)", len(blob))
        return {"bytes": len(blob), "peers": sorted(self._peers)}

    # ---------------------------------------------------------------- Service

    @property
    def standby(self) -> bool:
        """This copy follows its remote's generation since a switchover: the remote is
        the primary, the host here sees NOT READY, nothing is sent."""
        return self.lineage is not None and not self.lineage.writer

    def start(self) -> None:
        if self.sealer is not None:
            self.sealer.start()
        if self.standby:
            assert self.lineage is not None
            self.volume.set_state(DeviceState.STANDBY)
            log.warning("this copy is the standby of its remote's generation %016x since a "
                        "switchover: its host sees NOT READY until `mirrorunit role "
                        "switchover` makes it the primary again", self.lineage.generation)
            return
        for peer in self._peers.values():
            if not peer.paused:
                peer.client = self._make_client(peer)
                peer.client.start()

    def stop(self) -> None:
        if self.sealer is not None:
            self.sealer.stop()
        for peer in self._peers.values():
            if peer.client is not None:
                peer.client.stop()
                peer.client = None
            peer.source.close()

    def _peer(self, name: str) -> _Peer:
        try:
            return self._peers[name]
        except KeyError:
            raise ValueError(f"no remote named {name!r}; known: "
                             + ", ".join(sorted(self._peers))) from None

    def pause(self, name: str) -> PeerLinkStatus:
        peer = self._peer(name)
        peer.paused = True
        if peer.client is not None:
            peer.client.stop()
            peer.client = None
        log.warning("link to %s paused by the operator", name)
        return self.peer_status(name)

    def resume(self, name: str) -> PeerLinkStatus:
        peer = self._peer(name)
        if peer.paused:
            peer.paused = False
            peer.client = self._make_client(peer)
            peer.client.start()
            log.warning("link to %s resumed by the operator", name)
        return self.peer_status(name)

    def failback(self, name: str) -> dict[str, Any]:
        """Give up this copy's writes since remote `name` was promoted off it (they are
        kept as a conflict image), take the remote's image moving only the chunks that
        differ, and become the primary again with the remote following this copy
        (docs/failover.md).  The host sees NOT READY while it runs."""
        peer = self._peer(name)
        refused = peer.refused
        if self.lineage is None:
            raise FailbackError("this copy's lineage is unknown (see the log): no failback")
        if not self.standby and (refused is None or refused["code"] not in (
                ERR_FENCED, ERR_SPLIT_BRAIN, ERR_DIVERGED)):
            state = self.peer_status(name)["state"]
            raise FailbackError(f"remote {name} does not refuse this copy (its link is "
                                f"{state}): there is nothing to fail back")
        others = sorted(n for n in self._peers if n != name)
        if others:
            raise FailbackError(f"this copy also replicates to {', '.join(others)}: a "
                                "failback with more than one remote is not supported")
        if peer.client is not None:
            peer.client.stop()
            peer.client = None
        fb = LocalFailback(volume=self.volume, cbq=self.cbq, consumer=name,
                           lineage=self.lineage, state_dir=self.state_dir)
        t0 = time.monotonic()
        fb.stop_host()
        session = FailbackClientSession(self.unit_id, self.lineage, self.compression, fb)
        try:
            result = failback_exchange((peer.spec.host, peer.spec.port), self.identity,
                                       self.peers, name, session)
        except LinkRefused as exc:
            pending = fb.pending()
            if exc.code != ERR_HANDED_BACK or pending is None:
                self._failback_failed(peer, fb)
                raise FailbackError(f"remote {name} refused the failback: {exc.code}: "
                                    f"{exc.text}") from None
            # The remote took the commit of an earlier failback whose answer was lost.
            fb.committed(pending.current.fork_seq, pending)
            self.lineage = pending
            log.warning("failback: remote %s had already taken this copy's commit", name)
            return self._failback_done(peer, {"seq": pending.current.fork_seq,
                                              "generation": f"{pending.generation:016x}",
                                              "completed_earlier": True}, t0)
        except (OSError, LinkError, CbqError, FailbackError) as exc:
            self._failback_failed(peer, fb)
            kept = fb.chunks_taken > 0 or fb.new_lineage is not None
            raise FailbackError(
                f"failback from {name} did not complete: {exc}; " + (
                    "this copy already took some of the remote's chunks, so the host stays "
                    "kept out (NOT READY): run the failback again" if kept else
                    "nothing changed here and the host is served again")) from None
        self.lineage = result.lineage
        conflict = fb.conflict.describe() if fb.conflict is not None else None
        return self._failback_done(peer, {
            "seq": result.seq, "generation": f"{result.lineage.generation:016x}",
            "chunks_compared": result.chunks_compared, "chunks_moved": result.chunks_moved,
            "bytes_moved": result.bytes_moved,
            "chunks_changed_remote": result.chunks_changed_remote,
            "chunks_changed_here": result.chunks_changed_here,
            "conflict": conflict, "completed_earlier": False}, t0)

    def switchover(self, name: str, drain_timeout: float = 600.0) -> dict[str, Any]:
        """Planned role reversal with remote `name` (docs/failover.md).  From the primary:
        stop the host (NOT READY), drain the queue, have the remote promoted at exactly
        the drained seq, and follow it as its standby; nothing is resynced.  From the
        standby: take the remote's changes since (a failback with nothing of this copy's
        to keep) and become the primary again."""
        peer = self._peer(name)
        if self.lineage is None:
            raise FailbackError("this copy's lineage is unknown (see the log): no switchover")
        if self.standby:
            report = self.failback(name)
            report["direction"] = "to-here"
            return report
        others = sorted(n for n in self._peers if n != name)
        if others:
            raise FailbackError(f"this copy also replicates to {', '.join(others)}: a "
                                "switchover with more than one remote is not supported")
        if peer.refused is not None or peer.paused or peer.client is None \
                or not peer.client.connected:
            raise FailbackError(f"remote {name} is not following this copy now (its link is "
                                f"{self.peer_status(name)['state']}): a switchover needs "
                                "a connected remote; after a promotion, see failback")
        t0 = time.monotonic()
        before = self.cbq.stats()["consumers"][name]
        fb = LocalFailback(volume=self.volume, cbq=self.cbq, consumer=name,
                           lineage=self.lineage, state_dir=self.state_dir)
        fb.stop_host()
        last = self.cbq.last_seq
        deadline = t0 + drain_timeout
        while self.cbq.consumers[name].acked_seq < last:
            if time.monotonic() > deadline:
                fb.resume_host()
                raise FailbackError(f"remote {name} did not take the queue up to seq {last} "
                                    f"within {drain_timeout:.0f} s; the host is served again")
            time.sleep(0.02)
        drained = time.monotonic()
        peer.client.stop()
        peer.client = None
        session = SwitchoverClientSession(self.unit_id, self.lineage, last)
        try:
            done = switchover_exchange((peer.spec.host, peer.spec.port), self.identity,
                                       self.peers, name, session)
        except (LinkError, OSError) as exc:
            fb.resume_host()
            peer.client = self._make_client(peer)
            peer.client.start()
            raise FailbackError(f"remote {name} did not take the primary role: {exc}; this "
                                "copy stays the primary and serves its host again") from None
        lineage = self.lineage.adopt(done.lineage)
        lineage_store.save(self.state_dir / lineage_store.FILE_NAME, lineage)
        self.lineage = lineage
        report = {"direction": "to-remote", "seq": last,
                  "generation": f"{lineage.generation:016x}",
                  "records_moved": before["pending_records"],
                  "bytes_moved": before["pending_bytes"],
                  "drain_seconds": round(drained - t0, 3),
                  "seconds": round(time.monotonic() - t0, 3)}
        log.warning("switchover to %s done in %.2f s: the remote is the primary from seq %d; "
                    "this copy is its standby (%s)", name, report["seconds"], last,
                    json.dumps(report))
        return report

    def _failback_failed(self, peer: _Peer, fb: LocalFailback) -> None:
        if fb.chunks_taken == 0 and fb.new_lineage is None:
            fb.resume_host()
        if self.standby:
            return
        peer.client = self._make_client(peer)
        peer.client.start()

    def _failback_done(self, peer: _Peer, report: dict[str, Any], t0: float) -> dict[str, Any]:
        peer.refused = None
        peer.client = self._make_client(peer)
        peer.client.start()
        report["seconds"] = round(time.monotonic() - t0, 3)
        log.warning("failback from %s done in %.1f s: %s", peer.spec.name, report["seconds"],
                    json.dumps(report))
        return report

    def set_peers(self, peers: list[dict[str, Any]]) -> dict[str, list[str]]:
        """The config's `peers`, taken up while the unit runs (the host keeps its disk): a
        peer whose address changed reconnects there, a new one is added (a full resync
        follows, as for any peer added to a volume that may hold data), one no longer
        listed is dropped with its queue consumer.  A peer whose listed fingerprint is not
        the certificate pinned for it is reported `unpaired`: pair it (`mirrorunit pair`)
        and its link connects."""
        wanted: dict[str, tuple[RemoteSpec, str]] = {}
        for p in peers:
            host, port = split_host_port(str(p["address"]))
            wanted[str(p["name"])] = (RemoteSpec(str(p["name"]), host, port),
                                      fingerprint_hex(str(p["fingerprint"])))
        report: dict[str, list[str]] = {"changed": [], "added": [], "removed": [],
                                        "unpaired": [], "unchanged": []}
        for name in [n for n in self._peers if n not in wanted]:
            gone = self._peers.pop(name)
            if gone.client is not None:
                gone.client.stop()
            self.cbq.remove_consumer(name)
            report["removed"].append(name)
            log.warning("remote %s removed from the config: its link and queue consumer "
                        "are gone", name)
        for name, (spec, fp) in wanted.items():
            self.peers.refresh()
            pinned = self.peers.get(name)
            if pinned is None or fingerprint_hex(pinned.fingerprint) != fp:
                report["unpaired"].append(name)
            found = self._peers.get(name)
            if found is None:
                if name not in self.cbq.consumers:
                    self.cbq.add_consumer(name)
                    mark_full_resync(self.state_dir, name,
                                     "added to a volume that may hold data")
                peer = self._peers[name] = _Peer(
                    spec, CbqSource(self.cbq, name, self.volume, self.state_dir))
                report["added"].append(name)
                log.warning("remote %s added from the config at %s:%d", name, spec.host,
                            spec.port)
            elif (found.spec.host, found.spec.port) == (spec.host, spec.port):
                report["unchanged"].append(name)
                continue
            else:
                peer = found
                log.warning("remote %s: address %s:%d -> %s:%d from the config", name,
                            peer.spec.host, peer.spec.port, spec.host, spec.port)
                peer.spec = spec
                if peer.client is not None:
                    peer.client.stop()
                    peer.client = None
                report["changed"].append(name)
            if not peer.paused and not self.standby and peer.client is None:
                peer.client = self._make_client(peer)
                peer.client.start()
        return report

    def set_bandwidth(self, bandwidth: float | None) -> dict[str, Any]:
        """The config's `link.bandwidth`, taken up while the unit runs: every remote's
        link is capped at `bandwidth` bytes/s (0 or None: no cap) from its next frame,
        without reconnecting."""
        if bandwidth is not None and (isinstance(bandwidth, bool)
                                      or not isinstance(bandwidth, int | float)
                                      or bandwidth < 0):
            raise ValueError(f"bandwidth must be a number of bytes per second, not "
                             f"{bandwidth!r}")
        self.bandwidth = bandwidth or None
        for peer in self._peers.values():
            if peer.client is not None:
                peer.client.set_bandwidth(self.bandwidth)
        log.warning("link bandwidth %s for every remote", f"capped at {self.bandwidth:.0f} "
                    "bytes/s" if self.bandwidth else "not capped")
        return {"bandwidth": self.bandwidth}

    def set_compression(self, compression: str) -> dict[str, Any]:
        """The config's `link.compression`, taken up while the unit runs: the next batch
        uses it if the link's session negotiated it (or it is none); otherwise that link
        alone reconnects to offer it, after a running resync.  The host keeps its disk."""
        offer = codec_offer(str(compression))
        self.compression_setting, self.compression = str(compression), offer
        for peer in self._peers.values():
            if peer.client is not None:
                peer.client.set_codecs(offer)
        log.warning("link compression %s (offering %s)", compression, ", ".join(offer))
        return {"compression": self.compression_setting, "offered": list(offer)}

    def verify(self, name: str) -> PeerLinkStatus:
        self._peer(name).source.request_verify()
        return self.peer_status(name)

    def peer_status(self, name: str) -> PeerLinkStatus:
        peer = self._peer(name)
        stats = self.cbq.stats()
        c: ConsumerStats | None = stats["consumers"].get(name)
        client = peer.client
        session = client.session if client is not None else None
        refused = peer.refused
        if self.standby:
            state = "standby"
        elif peer.paused:
            state = "paused"
        elif refused is not None:
            state = str(refused["code"])
        elif client is not None and client.connected:
            state = "resyncing" if peer.source.resync is not None else "connected"
        else:
            state = "retrying"
        # a peer whose consumer is not (yet) in the queue has nothing pending
        oldest = c["oldest_pending_ns"] if c is not None else None
        pending = c["pending_records"] if c is not None else 0
        acked = c["acked_seq"] if c is not None else None
        return {
            "remote": f"{peer.spec.host}:{peer.spec.port}",
            "state": state,
            "last_error": client.stats.last_error if client is not None else None,
            "connects": client.stats.connects if client is not None else 0,
            "sessions": client.stats.sessions if client is not None else 0,
            "pair_offers": client.stats.pair_offers if client is not None else 0,
            "pairings": client.stats.pairings if client is not None else 0,
            "wire_bytes_sent": client.stats.bytes_sent if client is not None else 0,
            "bandwidth": self.bandwidth,
            "compression": client.codec if client is not None else None,
            "compression_offered": list(self.compression),
            "write_data_bytes": client.stats.write_data_bytes if client is not None else 0,
            "write_wire_bytes": client.stats.write_wire_bytes if client is not None else 0,
            "signature": session.signature if session is not None else self.signature,
            "batches_aborted": peer.aborted,
            "skips_sent": peer.source.skips_sent,
            "blocks_sent": peer.source.blocks_sent,
            "blocks_acked": peer.source.blocks_acked,
            "sent_seq": session.last_sent_seq if session is not None else acked,
            "acked_seq": acked,
            "last_seq": stats["last_seq"],
            "lag_seqs": pending,
            "lag_bytes": c["pending_bytes"] if c is not None else 0,
            "lag_seconds": round((time.time_ns() - oldest) / 1e9, 3)
            if pending and oldest else 0.0,
            "needs_resync": c["needs_resync"] if c is not None else False,
            "resync": peer.source.resync,
            "resyncs_done": peer.source.resyncs_done,
            "last_resync": peer.last_resync,
            "last_verify": peer.source.last_verify,
            "fenced": refused["reason"] if refused and refused["code"] == ERR_FENCED else None,
            "split_brain": refused["reason"]
            if refused and refused["code"] == ERR_SPLIT_BRAIN else None,
            "refused": RefusalStatus(**refused) if refused is not None else None,
        }

    def status(self) -> LinkStatus:
        lin = self.lineage
        fenced = [p.refused["reason"] for p in self._peers.values()
                  if p.refused and p.refused["code"] == ERR_FENCED]
        split = [p.refused["reason"] for p in self._peers.values()
                 if p.refused and p.refused["code"] == ERR_SPLIT_BRAIN]
        return {"unit_id": self.unit_id, "fingerprint": self.identity.fingerprint,
                "role": lin.current.role.value if lin is not None else "primary",
                "generation": f"{lin.generation:016x}" if lin is not None else None,
                "lineage": lin.to_dict() if lin is not None else None,
                "fenced": fenced[0] if fenced else None,
                "split_brain": split[0] if split else None,
                "config_backup": {"sealed_generation": self.sealer.sealed_generation
                                  if self.sealer is not None else None},
                "peers": {name: self.peer_status(name) for name in self._peers}}

    def handlers(self) -> dict[str, Any]:
        return {
            "link.status": self.status,
            "link.pause": self.pause,
            "link.resume": self.resume,
            "link.verify": self.verify,
            "link.failback": self.failback,
            "link.switchover": self.switchover,
            "link.set_peers": self.set_peers,
            "link.set_bandwidth": self.set_bandwidth,
            "link.set_compression": self.set_compression,
            "link.seal_config": self.seal_config,
        }
