"""The CBQ against a model: a rule-based state machine (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from firmware.cbq import (
    MIRROR_CONSUMER,
    CbqUsageError,
    CircularBufferQueue,
    Mode,
    NeedsReclaim,
    create,
)
from firmware.cbq.format import BARRIER_FLUSH, BARRIER_FUA
from firmware.cbq.queue import MAX_DISCARDS
from firmware.storage import CrashSimStorage

BS = 512
VOLUME_BLOCKS = 64
CHUNK = 1024
PEERS = ("a", "b")


class CbqMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.storage = CrashSimStorage(2 * 4096 + 4096 + 32 * 1024)
        create(self.storage, volume_blocks=VOLUME_BLOCKS, block_size=BS, chunk_size=CHUNK,
               align=512, consumers=PEERS, high_water=0.7, low_water=0.3)
        self.image = bytearray(VOLUME_BLOCKS * BS)  # what the volume holds now
        self.writes: dict[int, tuple[int, bytes]] = {}  # seq -> (lbn, data)
        self.next_read = {p: 1 for p in PEERS}  # next seq each peer expects
        self.acked = {p: 0 for p in PEERS}
        self.delivered: dict[str, list[int]] = {p: [] for p in PEERS}
        self.discarded: set[int] = set()
        self.durable = 0
        self.last_seq = 0
        self.must_be_dirty: set[int] = set()
        self.resync_pending: set[str] = set()
        self.barriers_made = 0
        self.barrier_seqs: set[int] = set()
        self.q = self._open()

    def _open(self) -> CircularBufferQueue:
        return CircularBufferQueue(self.storage, current_reader=self._current)

    def _current(self, lbn: int, n: int) -> bytes:
        return bytes(self.image[lbn * BS:(lbn + n) * BS])

    def _sync(self) -> None:
        self.durable = self.q.sync()
        self.q.ack(MIRROR_CONSUMER, self.durable)

    @rule(lbn=st.integers(0, VOLUME_BLOCKS - 1), n=st.integers(1, 4), fill=st.integers(0, 255))
    def write(self, lbn: int, n: int, fill: int) -> None:
        n = min(n, VOLUME_BLOCKS - lbn)
        data = bytes([fill, lbn & 0xFF]) * (n * BS // 2)
        was_overflow = self.q.mode is Mode.OVERFLOW
        try:
            enq = self.q.append_write(lbn, data)
        except NeedsReclaim:
            self._sync()
            enq = self.q.append_write(lbn, data)
        if enq.seq is None:
            assert self.q.mode is Mode.OVERFLOW or self.q.enqueue_paused
            if not was_overflow:
                # Entering overflow makes everything queued durable first.
                assert self.q.durable_seq == self.last_seq
                self.durable = self.last_seq
                # Everything peers had not acknowledged is now only in the dirty map.
                for seq, (w_lbn, w_data) in self.writes.items():
                    if seq > min(self.acked.values()):
                        self._dirty(w_lbn, len(w_data) // BS)
                for p in PEERS:
                    self.next_read[p] = self.q.last_seq + 1
                    self.acked[p] = self.q.last_seq
                    self.delivered[p] = []
                    self.resync_pending.add(p)
            self._dirty(lbn, n)
        else:
            assert enq.seq == self.last_seq + 1, "seqs must be dense and increasing"
            self.last_seq = enq.seq
            self.writes[enq.seq] = (lbn, data)
        self.image[lbn * BS:(lbn + n) * BS] = data

    def _dirty(self, lbn: int, n: int) -> None:
        for c in range(lbn * BS // CHUNK, ((lbn + n) * BS - 1) // CHUNK + 1):
            self.must_be_dirty.add(c)

    @rule()
    def sync(self) -> None:
        self._sync()

    @rule(flags=st.sampled_from((BARRIER_FLUSH, BARRIER_FUA)))
    def barrier(self, flags: int) -> None:
        got = self.q.append_barrier(flags)
        if got is not None:
            # A barrier covers every write so far and takes no seq of its own.
            assert got == self.last_seq
            self.barriers_made += 1
            self.barrier_seqs.add(got)

    @invariant()
    def barriers_in_order(self) -> None:
        seqs = [s for s, _, _ in self.q.barriers()]
        assert seqs == sorted(seqs)
        assert all(s <= self.durable or s <= self.last_seq for s in seqs)

    @rule(peer=st.sampled_from(PEERS), k=st.integers(1, 8), with_barriers=st.booleans())
    def read(self, peer: str, k: int, with_barriers: bool) -> None:
        got = self.q.read(peer, max_records=k, barriers=with_barriers)
        for w in got:
            if w.barrier:
                # Where it stands in the log: after the write it covers, before the next.
                assert with_barriers and w.seq in self.barrier_seqs
                assert w.seq < self.next_read[peer] and w.seq <= self.durable
                # (One of a discarded write may still come once the queue has forgotten
                # the discard: the remote skipped that write, the point stands after it.)
                assert not w.data and w.lbn == w.nblocks == 0
                continue
            expect = self.next_read[peer]
            while expect in self.discarded:
                self.delivered[peer].append(expect)  # walked over, never sent
                expect += 1
            assert w.seq == expect, f"{peer} got seq {w.seq}, expected {expect}"
            assert w.seq <= self.durable
            lbn, data = self.writes[w.seq]
            assert (w.lbn, w.nblocks) == (lbn, len(data) // BS)
            assert w.data == data, f"seq {w.seq} ({'compact' if w.compact else 'data'}) " \
                                   "does not carry what was written then"
            self.next_read[peer] = w.seq + 1
            self.delivered[peer].append(w.seq)
        if len(got) < k:
            # Nothing durable left for this peer, unless discards hide it.
            nxt = self.next_read[peer]
            while nxt in self.discarded and nxt <= self.durable:
                self.delivered[peer].append(nxt)
                nxt += 1
            self.next_read[peer] = nxt
            assert nxt > self.durable or self.q.dequeue_paused

    @rule(peer=st.sampled_from(PEERS), data=st.data())
    def ack(self, peer: str, data: st.DataObject) -> None:
        if not self.delivered[peer]:
            return
        seq = data.draw(st.sampled_from(self.delivered[peer]))
        self.q.ack(peer, seq)
        acked = max(self.acked[peer], seq)
        # Discarded writes walked over right after the ack go with it.
        while acked + 1 in self.discarded and acked + 1 in self.delivered[peer]:
            acked += 1
        self.acked[peer] = acked
        seq = acked
        self.delivered[peer] = [s for s in self.delivered[peer] if s > seq]

    @rule(peer=st.sampled_from(PEERS))
    def rewind(self, peer: str) -> None:
        assert self.q.rewind(peer) == self.acked[peer]
        self.next_read[peer] = self.acked[peer] + 1
        self.delivered[peer] = []

    @rule()
    def reopen(self) -> None:
        self._sync()
        self.q.close()
        self.q = self._open()
        for p in PEERS:
            self.next_read[p] = self.acked[p] + 1
            self.delivered[p] = []

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        lo_bound = min(self.acked.values()) + 1
        if lo_bound > self.q.last_seq:
            return
        lo = data.draw(st.integers(lo_bound, self.q.last_seq))
        hi = data.draw(st.integers(lo, self.q.last_seq))
        if len(self.q.discards) >= MAX_DISCARDS - 1:
            with pytest.raises(CbqUsageError):
                self.q.discard(lo, hi) if (lo, hi) not in self.q.discards else \
                    self.q.discard(0, 0)
            return
        self.q.discard(lo, hi)
        self.discarded.update(range(lo, hi + 1))

    @precondition(lambda self: self.q.mode is Mode.OVERFLOW)
    @rule()
    def resync(self) -> None:
        chunks = set(self.q.begin_resync())
        assert self.must_be_dirty <= chunks, "dirty map misses changed chunks"
        for p in PEERS:
            self.q.resync_done(p)
        self.must_be_dirty.clear()
        self.resync_pending.clear()
        assert self.q.dirty_chunks() == []

    @invariant()
    def consistent(self) -> None:
        s = self.q.stats()
        assert 0 <= s["used_bytes"] <= s["ring_bytes"]
        assert s["last_seq"] == self.last_seq >= s["durable_seq"] == self.durable
        for p in PEERS:
            c = s["consumers"][p]
            assert c["acked_seq"] == self.acked[p]
            assert c["needs_resync"] == (p in self.resync_pending)
        if self.q.mode is Mode.OVERFLOW:
            assert self.must_be_dirty <= set(self.q.dirty_chunks())


CbqMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCbqModel = CbqMachine.TestCase
