"""The local volume: reads from the local mirror, every write to the mirror and the CBQ.

The CBQ is the write-ahead log and the mirror is its checkpointed image:

- a write is appended to the CBQ and held in a RAM cache (visible to reads);
- at commit (FUA, FLUSH, write-through, the cache limit or the flush timer) the
  CBQ group is synced, then the cached writes are applied to the mirror;
- the mirror is fdatasync'ed lazily; afterwards the internal consumer
  MIRROR_CONSUMER acknowledges what it now holds durably, which lets the CBQ
  reuse that space once every peer has acknowledged it too;
- writes whose data is not in the CBQ (compact mode, dirty map) are synced to
  the mirror before their commit completes.

After a crash, DATA records after the mirror's acknowledgement are redone onto
the mirror (the newest record of each block wins, so a later compact write
already durable in the mirror is never overwritten by an older record).

A commit that fails (the background committer's above all: nobody is waiting on
it) turns the write cache off for good: from then on every write is committed
before it completes, so a failing mirror fails the writes themselves, and the
next FLUSH reports the failure, as a disk reports a deferred error for cached
data it could not write.  Status names the failure.

The mirror may live on a disk that can go away (a USB or NVMe SSD named by its
identity).  When it does (`medium_lost()`, from a udev remove or an I/O error that
the `medium_check` hook confirms), the volume goes OFFLINE without touching the
mirror again: the host gets NOT READY / MEDIUM NOT PRESENT, the writes it was told
are complete are in the CBQ (or still in the RAM cache, which is kept), and nothing
is dropped.  When the same disk is back (`medium_returned()`), the CBQ's records
after the mirror's acknowledgement are redone onto it, the RAM cache is applied, the
mirror is synced, and the volume returns to the state it had; the front ends report
that once as a unit attention (not ready to ready).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..blockdev import (
    BlockDeviceError,
    DeviceState,
    HostCommand,
    MediumError,
    MediumNotPresent,
    NotReady,
    OutOfRange,
    WriteProtected,
)
from ..cbq import MIRROR_CONSUMER, CircularBufferQueue, NeedsReclaim, RecordKind
from ..cbq.format import BARRIER_FLUSH, BARRIER_FUA, barrier_flags
from ..control.status import VolumeStatus
from ..storage import ReadIntoStorage, Storage

log = logging.getLogger("mirrorunit.volume")


#: Seconds a barrier appended without a sync may wait for a write's group commit before
#: the background committer syncs it.
BARRIER_IDLE_SYNC = 0.1


class VolumeError(BlockDeviceError):
    pass


class CacheMode(enum.Enum):
    #: A write completes once its CBQ record is durable.
    WRITE_THROUGH = "write-through"
    #: A write completes from RAM; durable at FLUSH/FUA, on the timer or on flush_cache().
    WRITE_BACK = "write-back"


@dataclass
class _CachedWrite:
    offset: int
    data: bytes
    seq: int | None
    mirror_sync: bool  # data is not in the CBQ: the mirror copy must be synced


def _lay_over(buffer: bytearray | memoryview, offset: int,
              writes: Iterable[_CachedWrite]) -> None:
    """Copy what `writes` hold of [offset, offset+len(buffer)) over `buffer`, in order."""
    end = offset + len(buffer)
    for w in writes:
        lo, hi = max(offset, w.offset), min(end, w.offset + len(w.data))
        if lo < hi:
            buffer[lo - offset:hi - offset] = w.data[lo - w.offset:hi - w.offset]


class Volume:
    """A BlockDevice over a mirror Storage and an open CBQ."""

    def __init__(self, mirror: Storage, cbq: CircularBufferQueue, *,
                 cache_mode: CacheMode = CacheMode.WRITE_BACK,
                 cache_limit: int = 32 << 20, flush_interval: float = 1.0,
                 mirror_checkpoint_bytes: int | None = None,
                 read_only: bool = False, state: DeviceState = DeviceState.READY,
                 on_state_change: Callable[[DeviceState], None] | None = None,
                 medium_check: Callable[[], bool] | None = None) -> None:
        self.mirror = mirror
        #: Called after a failed mirror access: whether the disk is still there (its
        #: watcher calls medium_lost() when not), so an I/O error on a vanished disk takes
        #: the volume offline instead of failing commands one by one.
        self.medium_check = medium_check
        #: Why the mirror's disk is missing; None while it is present.
        self._medium_lost: str | None = None
        self._state_before_loss = state
        self.medium_losses = 0
        self._probing = threading.Lock()
        # Decided once: a protocol isinstance() check costs too much on every read.
        self._read_into = mirror if isinstance(mirror, ReadIntoStorage) else None
        self.cbq = cbq
        g = cbq.geo
        self._block_size = g.block_size
        self._size = g.volume_blocks * g.block_size
        if mirror.size < self._size:
            raise VolumeError(f"mirror holds {mirror.size} bytes, volume needs {self._size}")
        self.cache_mode = cache_mode
        self.cache_limit = cache_limit
        self.flush_interval = flush_interval
        self.mirror_checkpoint_bytes = mirror_checkpoint_bytes or max(
            1 << 20, min(g.ring_size // 8, 64 << 20))
        self._read_only = read_only
        self._state = state
        self._on_state_change = on_state_change
        # Lock order: _lock (appends: CBQ order = cache order) -> _commit_lock (commits and
        # mirror checkpoints, one at a time) -> _cache_lock (the cache list, for readers).
        self._lock = threading.RLock()
        self._commit_lock = threading.RLock()
        self._cache_lock = threading.Lock()
        self._kick = threading.Event()
        self._cache: list[_CachedWrite] = []
        self._cache_bytes = 0
        self._applied_seq = cbq.consumers[MIRROR_CONSUMER].acked_seq
        self._applied_since_checkpoint = 0
        self._last_mirror_checkpoint = time.monotonic()
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        #: The first commit that failed; once set, no write is acknowledged from RAM.
        self._commit_failure: str | None = None
        #: A failed commit not yet reported to a FLUSH (a deferred error).
        self._deferred_error: BaseException | None = None
        self._mirror_sync_failed = False
        # Reads are served here and only counted: read-nature commands never reach the
        # queue, nor the remote.
        self.counters = {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                         "flushes": 0, "commits": 0, "barriers": 0, "barriers_unrecorded": 0,
                         # Flush barriers acknowledged before their own sync (write-through).
                         "barriers_deferred": 0}
        #: A barrier was appended without a sync: the committer syncs it when idle.
        self._barrier_pending = False
        cbq.current_reader = self._read_current
        self.redone_records = self._redo()

    # ---------------------------------------------------------------- BlockDevice

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def state(self) -> DeviceState:
        return self._state

    def set_state(self, state: DeviceState) -> None:
        if self._medium_lost is not None:
            # Kept for when the disk is back; until then the volume stays offline.
            self._state_before_loss = state
            return
        if state is self._state:
            return
        if state is not DeviceState.READY:
            # Not flush(): an error deferred from an earlier commit is the host's to see.
            self._commit()
        log.warning("volume: state %s -> %s", self._state.value, state.value)
        self._state = state
        if self._on_state_change:
            self._on_state_change(state)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def write_cache_enabled(self) -> bool:
        return self.cache_mode is CacheMode.WRITE_BACK and self._commit_failure is None

    #: The host's flushes become barriers in the queue (consistent points on the
    #: remote) in every cache mode, so the SCSI target asks the host for them.
    records_flushes = True

    @property
    def commit_failure(self) -> str | None:
        """Why the write cache was turned off, if a commit failed."""
        return self._commit_failure

    @property
    def supports_trim(self) -> bool:
        return False

    @property
    def medium_present(self) -> bool:
        """False while the mirror's disk is gone (SCSI: MEDIUM NOT PRESENT)."""
        return self._medium_lost is None

    def _check(self, offset: int, length: int) -> None:
        if self._medium_lost is not None:
            raise MediumNotPresent(f"volume is offline: {self._medium_lost}")
        if self._state is not DeviceState.READY:
            raise NotReady(f"volume is {self._state.value}")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(f"range {offset}+{length} outside volume of {self._size} bytes")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        data = self._read(offset, length)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += length
        return data

    def pread_into(self, offset: int, buffer: memoryview) -> None:
        """pread() into the caller's buffer (blockdev.ReadInto)."""
        length = len(buffer)
        self._check(offset, length)
        if self._read_into is None:
            buffer[:] = self._read(offset, length)
        else:
            try:
                with self._cache_lock:
                    self._read_into.preadinto(offset, buffer)
                    _lay_over(buffer, offset, self._cache)
            except OSError as e:
                self._probe_medium_later()
                raise MediumError(f"mirror read failed: {e}", e.errno) from e
        self.counters["reads"] += 1
        self.counters["bytes_read"] += length

    def _read(self, offset: int, length: int) -> bytes:
        try:
            with self._cache_lock:
                overlays = [w for w in self._cache
                            if w.offset < offset + length and offset < w.offset + len(w.data)]
                data = self.mirror.pread(offset, length)
        except OSError as e:
            self._probe_medium_later()
            raise MediumError(f"mirror read failed: {e}", getattr(e, "errno", None)) from e
        if not overlays:
            return data
        buf = bytearray(data)
        _lay_over(buf, offset, overlays)
        return bytes(buf)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Where [offset, offset + length) of the volume may hold data: the mirror
        file's data extents plus every write still in the RAM cache (not yet on the
        mirror); None when the mirror cannot tell (a block device)."""
        probe = getattr(self.mirror, "data_extents", None)
        if probe is None:
            return None
        # Under the cache lock: a commit writes the mirror before it drops a write from
        # the cache, so each write is seen in one place or the other.
        with self._cache_lock:
            try:
                extents = probe(offset, length)
            except OSError as e:
                raise MediumError(f"mirror extents failed: {e}", e.errno) from e
            if extents is None:
                return None
            end = offset + length
            extents = list(extents) + [
                (w.offset, len(w.data)) for w in self._cache
                if w.offset < end and offset < w.offset + len(w.data)]
        return extents

    def will_need(self, offset: int, length: int) -> None:
        """Hint the mirror to read ahead (a verify digests the range next)."""
        hint = getattr(self.mirror, "will_need", None)
        if hint is not None:
            try:
                hint(offset, length)
            except OSError:
                pass  # only a hint

    def _read_current(self, lbn: int, nblocks: int) -> bytes:
        return self._read(lbn * self._block_size, nblocks * self._block_size)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._pwrite(offset, data, fua, None)

    def pwrite_barrier(self, offset: int, data: bytes | memoryview,
                       command: HostCommand) -> None:
        """A FUA write whose completion the queue records as a barrier (RecordsBarriers)."""
        self._pwrite(offset, data, True, command)

    def flush_barrier(self, command: HostCommand) -> None:
        """The host's FLUSH / SYNCHRONIZE CACHE, recorded as a barrier (RecordsBarriers).

        The barrier is appended before the commit, under the append lock: it follows
        every write appended so far (all those the host saw complete, maybe a few more
        still in flight, which is still a prefix of the write order), and the commit's
        one sync makes data and barrier durable together.

        When every write appended so far is already durable (write-through: each one
        was committed before it completed) the flush has nothing to make durable, and
        the barrier is not synced on its own: it only marks a consistent point, and
        the host loses nothing if a power cut takes it.  It becomes durable with the
        next group commit (the CBQ writes its pending records in log order and syncs
        them at once, and recovery keeps the log's longest valid prefix, so a durable
        later record implies a durable barrier), or from the committer after
        BARRIER_IDLE_SYNC seconds.  Until then no peer reads it (peers read only the
        durable log)."""
        with self._lock:
            self._append_barrier(command, BARRIER_FLUSH)
            deferred = self._all_durable()
        if not deferred:
            self.flush()
            return
        self.counters["flushes"] += 1
        self.counters["barriers_deferred"] += 1
        if self._medium_lost is not None:
            raise MediumNotPresent(f"volume is offline: {self._medium_lost}")
        self._barrier_pending = True
        if self._timer is not None:
            self._kick.set()

    def _all_durable(self) -> bool:
        """Under _lock: every write appended so far is durable and on the mirror (or in
        the CBQ), so a FLUSH has nothing to do.  Only in write-through, without a
        failure to report: write-back's flush keeps its commit (it syncs the cache)."""
        if (self.cache_mode is not CacheMode.WRITE_THROUGH or self._commit_failure is not None
                or self._deferred_error is not None or self._medium_lost is not None):
            return False
        with self._cache_lock:
            if self._cache:
                return False  # a write still in flight, or one whose commit failed
        return self.cbq.durable_seq >= self.cbq.last_seq

    def _append_barrier(self, command: HostCommand, kind: int) -> None:
        flags = barrier_flags(kind | (BARRIER_FUA if command.fua else 0),
                              int(command.front_end), command.opcode & 0xFF)
        self.counters["barriers"] += 1
        if self.cbq.append_barrier(flags, command.connection) is None:
            self.counters["barriers_unrecorded"] += 1

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool,
                barrier: HostCommand | None) -> None:
        self._check(offset, len(data))
        if self._read_only:
            raise WriteProtected("volume is read-only")
        bs = self._block_size
        if offset % bs or len(data) % bs:
            # Front ends speak in whole blocks; a partial block is merged here so the
            # CBQ only ever holds whole blocks.
            lo = offset - offset % bs
            hi = -(-(offset + len(data)) // bs) * bs
            with self._lock:
                merged = bytearray(self._read(lo, hi - lo))
                merged[offset - lo:offset - lo + len(data)] = data
                self._write_blocks(lo, bytes(merged))
                if barrier is not None:
                    self._append_barrier(barrier, BARRIER_FUA)
            self._after_write(fua)
            return
        with self._lock:
            self._write_blocks(offset, bytes(data))
            if barrier is not None:
                # Right after its data, before the commit that makes both durable.
                self._append_barrier(barrier, BARRIER_FUA)
        self._after_write(fua)

    def read_own(self, offset: int, length: int) -> bytes:
        """Read for the unit itself, whatever the state the host sees (a failback
        comparing chunks while the host is kept out)."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRange(f"range {offset}+{length} outside volume of {self._size} bytes")
        return self._read(offset, length)

    def pwrite_own(self, offset: int, data: bytes) -> None:
        """Write for the unit itself, whatever the state the host sees (a failback
        taking the promoted copy's chunks): whole blocks, through the queue like a host
        write, durable when this returns."""
        bs = self._block_size
        if offset % bs or len(data) % bs or offset < 0 or offset + len(data) > self._size:
            raise OutOfRange(f"range {offset}+{len(data)} is not whole blocks inside the "
                             f"volume of {self._size} bytes")
        with self._lock:
            self._write_blocks(offset, bytes(data))
        self._commit()

    def _write_blocks(self, offset: int, data: bytes) -> None:
        lbn = offset // self._block_size
        for attempt in range(3):
            try:
                enq = self.cbq.append_write(lbn, data)
                break
            except NeedsReclaim as e:
                # The ring is held only by what the mirror has not yet made durable.
                self._commit()
                self._mirror_checkpoint()
                if attempt == 2:
                    if self._mirror_sync_failed:
                        raise MediumError("the CBQ is full: the mirror cannot be synced "
                                          "since a sync failed") from e
                    raise
        with self._cache_lock:
            self._cache.append(_CachedWrite(offset, data, enq.seq, not enq.carries_data))
            self._cache_bytes += len(data)
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(data)

    def _after_write(self, fua: bool) -> None:
        if fua or not self.write_cache_enabled:
            self._commit()
        elif self._cache_bytes >= self.cache_limit:
            self._commit()  # back-pressure: the writer waits for the cache to drain
        elif self._cache_bytes >= self.cache_limit // 2 and self._timer is not None:
            self._kick.set()  # the background committer drains it while writes go on

    def flush(self) -> None:
        self.counters["flushes"] += 1
        if self._medium_lost is not None:
            raise MediumNotPresent(f"volume is offline: {self._medium_lost}")
        with self._commit_lock:
            try:
                self._commit_locked()
            finally:
                # A failure of this commit is reported by its own exception.
                deferred, self._deferred_error = self._deferred_error, None
        if deferred is not None:
            raise MediumError(f"an earlier commit of cached writes failed: {deferred}",
                              getattr(deferred, "errno", None)) from deferred

    def trim(self, offset: int, length: int) -> None:
        raise VolumeError("trim is not supported by this volume")

    # ---------------------------------------------------------------- commit

    def _commit(self) -> None:
        """Make every completed write durable and apply it to the mirror."""
        with self._commit_lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        if self._medium_lost is not None:
            # The cache is kept (its writes are in the CBQ too) until the disk is back.
            raise MediumNotPresent(f"volume is offline: {self._medium_lost}")
        try:
            self._apply_cache_locked()
        except Exception as e:
            gone = self._medium_gone()
            if gone is not None:
                # Not a failure of the data path: the disk went, the writes wait for it.
                raise MediumNotPresent(f"volume is offline: {gone}") from e
            self._commit_failed(e)
            raise

    def _commit_failed(self, exc: BaseException) -> None:
        self._deferred_error = exc
        self._cache_off(f"commit failed: {type(exc).__name__}: {exc}", exc)

    def _cache_off(self, reason: str, exc: BaseException | None = None) -> None:
        if self._commit_failure is not None:
            return
        self._commit_failure = reason
        trace = "".join(traceback.format_exception(exc)).rstrip() if exc else ""
        log.critical("volume: %s; the write cache is off, every write now reaches the "
                     "mirror before it completes%s", reason, "\n" + trace if trace else "")

    def _apply_cache_locked(self) -> None:
        try:
            # Snapshot first: everything in it was appended before the sync below, so
            # it is in the log before it reaches the mirror (write-ahead).
            with self._cache_lock:
                batch = list(self._cache)
            self.cbq.sync()
            if not batch:
                return
            need_sync = False
            for w in batch:
                self.mirror.pwrite(w.offset, w.data)
                need_sync |= w.mirror_sync
            if need_sync:
                self.mirror.sync()
            with self._cache_lock:
                del self._cache[:len(batch)]
                self._cache_bytes -= sum(len(w.data) for w in batch)
        except OSError as e:
            raise MediumError(f"commit failed: {e}", getattr(e, "errno", None)) from e
        self.counters["commits"] += 1
        seqs = [w.seq for w in batch if w.seq is not None]
        if seqs:
            self._applied_seq = max(self._applied_seq, max(seqs))
        self._applied_since_checkpoint += sum(len(w.data) for w in batch)
        if need_sync:
            self._ack_mirror()
        elif self._applied_since_checkpoint >= self.mirror_checkpoint_bytes:
            self._mirror_checkpoint_locked()

    def _mirror_checkpoint(self) -> None:
        with self._commit_lock:
            self._mirror_checkpoint_locked()

    def _mirror_checkpoint_locked(self) -> None:
        if self._medium_lost is not None:
            raise MediumNotPresent(f"volume is offline: {self._medium_lost}")
        try:
            self.mirror.sync()
        except OSError as e:
            gone = self._medium_gone()
            if gone is not None:
                raise MediumNotPresent(f"volume is offline: {gone}") from e
            # The kernel may drop the pages it could not write, and a later sync then
            # succeeds without them: the CBQ keeps what the mirror was sent, for the redo
            # at the next start.
            self._mirror_sync_failed = True
            err = MediumError(f"mirror sync failed: {e}", e.errno)
            self._commit_failed(err)
            raise err from e
        self._ack_mirror()

    def _ack_mirror(self) -> None:
        # Everything applied is in the mirror file and the file was just synced.
        if not self._mirror_sync_failed:
            self.cbq.ack(MIRROR_CONSUMER, min(self._applied_seq, self.cbq.durable_seq))
        self._applied_since_checkpoint = 0
        self._last_mirror_checkpoint = time.monotonic()

    def flush_cache(self) -> float:
        """Flush the RAM write cache to stable storage (the UPS calls this); seconds taken."""
        t0 = time.monotonic()
        with self._commit_lock:
            self._commit_locked()
            self._mirror_checkpoint_locked()
        return time.monotonic() - t0

    # ---------------------------------------------------------------- medium

    def _medium_gone(self) -> str | None:
        """After a failed mirror access: why the disk is gone, or None if it is there.
        The check's answer counts, not only its medium_lost() call: the watcher's own
        thread may have seen the disk go first and be waiting for the commit lock this
        thread holds to say so."""
        if self._medium_lost is None and self.medium_check is not None:
            try:
                present = self.medium_check()
            except Exception:  # the check itself failed: the error stands as a medium error
                log.exception("volume: checking the mirror's disk failed")
                present = True
            if present is False and self._medium_lost is None:
                return "the disk is gone (its loss is being reported)"
        return self._medium_lost

    def _probe_medium(self) -> None:
        self._medium_gone()

    def _probe_medium_later(self) -> None:
        """_probe_medium() from another thread: a reader may hold locks (the CBQ's, when it
        reads current data) that must not wait for the commit lock medium_lost() takes."""
        if self.medium_check is None or self._medium_lost is not None:
            return
        if not self._probing.acquire(blocking=False):
            return  # one look at a time, however many reads fail

        def probe() -> None:
            try:
                self._probe_medium()
            finally:
                self._probing.release()

        threading.Thread(target=probe, name="volume-medium-check", daemon=True).start()

    def medium_lost(self, reason: str) -> None:
        """The mirror's disk is gone: OFFLINE, the mirror is closed and not touched again
        until medium_returned().  The RAM cache and the CBQ keep every write."""
        with self._commit_lock:
            if self._medium_lost is not None:
                return
            self._medium_lost = reason
            self.medium_losses += 1
            self._state_before_loss = self._state
            old_state, self._state = self._state, DeviceState.OFFLINE
            log.error("volume: state %s -> offline: %s; %d cached bytes and the CBQ keep "
                      "the writes until the disk is back", old_state.value, reason,
                      self._cache_bytes)
            # Readers hold the cache lock while they use the mirror: wait for them, so
            # no read uses the descriptor after it is closed (and maybe reused).
            with self._cache_lock:
                try:
                    self.mirror.close()
                except OSError:
                    pass  # it is gone anyway
        if self._on_state_change:
            self._on_state_change(DeviceState.OFFLINE)

    def medium_returned(self, mirror: Storage) -> int:
        """The disk is back as `mirror` (the caller checked its identity): redo what the
        CBQ holds past the mirror's acknowledgement, apply the RAM cache, sync, and go
        back to the state before the loss.  Returns the number of writes redone; raises
        (and stays offline) when the disk does not take them."""
        with self._lock, self._commit_lock:
            if self._medium_lost is None:
                mirror.close()
                return 0
            if mirror.size < self._size:
                raise VolumeError(f"the returned disk holds {mirror.size} bytes, the "
                                  f"volume needs {self._size}; staying offline")
            with self._cache_lock:
                self.mirror = mirror
                self._read_into = mirror if isinstance(mirror, ReadIntoStorage) else None
            try:
                self._mirror_sync_failed = False
                redone = self._redo()
                self._apply_cache_locked()
                self.mirror.sync()
            except Exception:
                log.exception("volume: the returned disk failed while the CBQ was redone "
                              "onto it; staying offline")
                raise
            self._ack_mirror()
            # Everything acknowledged is on the disk again: the failures of the disk that
            # went do not describe this one.
            self._commit_failure = None
            self._deferred_error = None
            reason, self._medium_lost = self._medium_lost, None
            state = self._state = self._state_before_loss
        log.warning("volume: offline -> %s: the disk is back (%s before); %d writes redone "
                    "from the CBQ", state.value, reason, redone)
        if self._on_state_change:
            self._on_state_change(state)
        return redone

    # ---------------------------------------------------------------- recovery

    def _redo(self) -> int:
        """Bring the mirror in line with the CBQ after a crash."""
        records = list(self.cbq.replay(MIRROR_CONSUMER))
        if not records:
            return 0
        bs = self._block_size
        claimed: set[int] = set()
        writes: list[tuple[int, bytes]] = []
        last_seq = self._applied_seq
        for _, h, payload in reversed(records):
            if h.kind not in (RecordKind.DATA, RecordKind.COMPACT):
                continue
            last_seq = max(last_seq, h.seq)
            if h.kind is RecordKind.DATA:
                run_start = None
                for b in range(h.lbn, h.lbn + h.nblocks + 1):
                    free = b < h.lbn + h.nblocks and b not in claimed
                    if free and run_start is None:
                        run_start = b
                    elif not free and run_start is not None:
                        i, j = run_start - h.lbn, b - h.lbn
                        writes.append((run_start * bs, payload[i * bs:j * bs]))
                        run_start = None
            claimed.update(range(h.lbn, h.lbn + h.nblocks))
        for off, data in reversed(writes):
            self.mirror.pwrite(off, data)
        self.mirror.sync()
        self._applied_seq = last_seq
        self.cbq.ack(MIRROR_CONSUMER, min(last_seq, self.cbq.durable_seq))
        log.info("volume: redid %d writes from the CBQ onto the mirror", len(writes))
        return len(writes)

    # ---------------------------------------------------------------- background

    def start(self) -> None:
        """Start the write-back timer and the periodic mirror checkpoint."""
        if self._timer is not None:
            return
        self._stop.clear()
        self._timer = threading.Thread(target=self._run_timer, name="volume-flush",
                                       daemon=True)
        self._timer.start()

    def _run_timer(self) -> None:
        try:
            self._commit_in_background()
        finally:
            if not self._stop.is_set():
                # Nothing drains the cache now: no write may wait in RAM for it.
                with self._commit_lock:
                    self._cache_off("the background committer stopped")
                log.critical("volume: the background committer stopped")

    def _commit_in_background(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.flush_interval)
            self._kick.clear()
            if self._medium_lost is not None:
                continue  # the cache waits for the disk
            if self._barrier_pending:
                # A deferred barrier: the next write's sync usually carries it; if the
                # host stays idle, sync it here so the point reaches the peers promptly.
                if self._stop.wait(BARRIER_IDLE_SYNC):
                    break
                self._barrier_pending = False
                try:
                    self.cbq.sync()  # a no-op when a write's commit already carried it
                except OSError as e:
                    # The host's data is durable already; the next write's commit meets
                    # (and reports) the same error.
                    log.error("volume: syncing a flush barrier failed: %s", e)
                except Exception:  # the storage is gone (power cut): writers see it themselves
                    return
            try:
                with self._commit_lock:
                    if self._cache:
                        self._commit_locked()
                    if (self._applied_since_checkpoint
                            and time.monotonic() - self._last_mirror_checkpoint > 5.0):
                        self._mirror_checkpoint_locked()
            except BlockDeviceError as e:
                # Recorded by the commit; the writes left in the cache are tried again, by
                # the next write or here, until the mirror takes them.
                log.error("volume: background commit failed, to be retried: %s", e)
            except Exception:  # the storage is gone (power cut): writers see it themselves
                return

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        with self._lock, self._commit_lock:
            if self._medium_lost is not None:
                # The mirror is gone: the CBQ keeps every write for the redo at the next
                # start (write-back's cached ones become durable in it here).
                log.warning("volume: closing while the disk is missing (%s); the CBQ keeps "
                            "%d cached bytes for the next start", self._medium_lost,
                            self._cache_bytes)
                self.cbq.close()
                return
            self._commit_locked()
            self._mirror_checkpoint_locked()
            self.cbq.close()

    def status(self) -> VolumeStatus:
        with self._cache_lock:
            cached = self._cache_bytes
        c = self.counters
        return VolumeStatus(
            size=self._size, block_size=self._block_size, state=self._state.value,
            read_only=self._read_only, cache_mode=self.cache_mode.value, cache_bytes=cached,
            cache_limit=self.cache_limit, applied_seq=self._applied_seq,
            write_cache_enabled=self.write_cache_enabled, commit_failure=self._commit_failure,
            reads=c["reads"], writes=c["writes"], bytes_read=c["bytes_read"],
            bytes_written=c["bytes_written"], flushes=c["flushes"], commits=c["commits"],
            barriers=c["barriers"], barriers_unrecorded=c["barriers_unrecorded"],
            medium_present=self._medium_lost is None, medium_lost=self._medium_lost,
            medium_losses=self.medium_losses)
