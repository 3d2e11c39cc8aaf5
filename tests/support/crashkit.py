"""Workloads and checks for power-cut tests of the local data path."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from firmware.blockdev import FrontEnd, HostCommand
from firmware.cbq import CircularBufferQueue, create
from firmware.storage import CrashSimStorage, PowerCut, PowerRail
from firmware.volume import CacheMode, Volume

BS = 512


@dataclass
class Geometry:
    volume_blocks: int = 128
    cbq_bytes: int = 3 * 4096 + 48 * 1024
    align: int = 512
    chunk: int = 4096


@dataclass
class Run:
    """What the host did and was told before the cut."""

    issued: list[tuple[int, bytes]] = field(default_factory=list)  # in host order
    seqs: list[int | None] = field(default_factory=list)  # CBQ seq of each completed write
    flushed: int = 0  # every write up to this many is promised durable
    cut: bool = False
    #: The CBQ left normal mode (compact records, dirty map) at some point.
    degraded: bool = False
    #: With barriers: the seq each barrier covers, in the order the host sent them,
    #: and how many of them had completed before the cut.
    barriers: list[int] = field(default_factory=list)
    barriers_done: int = 0
    #: Per barrier: a flush acknowledged before its own sync (write-through; it may be
    #: lost at a cut, if no later record became durable).
    deferrable: list[bool] = field(default_factory=list)
    #: Flush barriers the volume acknowledged without syncing them.
    deferred: int = 0


#: The commands a barrier workload sends (an NBD FLUSH, a SCSI WRITE(10) with FUA).
FLUSH_COMMAND = HostCommand(FrontEnd.NBD, 3, connection=1)
FUA_COMMAND = HostCommand(FrontEnd.SCSI, 0x2A, fua=True)


def random_workload(rng: random.Random, geo: Geometry, n_ops: int) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.7:
            n = rng.choice([1, 1, 2, 3, 8, 16])
            lbn = rng.randrange(0, geo.volume_blocks - n + 1)
            ops.append(("write", lbn, n, rng.randrange(1 << 30), rng.random() < 0.15))
        elif r < 0.85:
            ops.append(("flush",))
        else:
            ops.append(("drain",))
    return ops


def fill(lbn: int, n: int, seed: int) -> bytes:
    return random.Random(seed * 7919 + lbn).randbytes(n * BS)


def open_unit(cbq_st: CrashSimStorage, mirror_st: CrashSimStorage,
              mode: CacheMode) -> tuple[CircularBufferQueue, Volume]:
    q = CircularBufferQueue(cbq_st)
    vol = Volume(mirror_st, q, cache_mode=mode, cache_limit=16 * BS,
                 mirror_checkpoint_bytes=8 * BS)
    return q, vol


def new_unit(geo: Geometry, rail: PowerRail) -> tuple[CrashSimStorage, CrashSimStorage]:
    cbq_st = CrashSimStorage(geo.cbq_bytes, rail=rail)
    mirror_st = CrashSimStorage(geo.volume_blocks * BS, rail=rail)
    create(cbq_st, volume_blocks=geo.volume_blocks, block_size=BS, chunk_size=geo.chunk,
           align=geo.align, consumers=("peer",))
    rail.ops = 0
    return cbq_st, mirror_st


def run_workload(ops: list[tuple], geo: Geometry, mode: CacheMode,
                 cut_after: int | None, barriers: bool = False,
                 ) -> tuple[Run, CrashSimStorage, CrashSimStorage, int]:
    """Run `ops` until the power cut; with `barriers`, flushes and FUA writes go through
    the barrier-recording calls a front end makes."""
    rail = PowerRail()
    cbq_st, mirror_st = new_unit(geo, rail)
    rail.cut_after_writes = cut_after
    run = Run()
    q: CircularBufferQueue | None = None
    try:
        q, vol = open_unit(cbq_st, mirror_st, mode)
        for op in ops:
            if op[0] == "write":
                _, lbn, n, seed, fua = op
                data = fill(lbn, n, seed)
                run.issued.append((lbn, data))
                before = q.last_seq
                if barriers and fua:
                    # The barrier covers the seq this write will take, if it is queued.
                    run.barriers.append(q.last_seq + 1)
                    run.deferrable.append(False)
                    vol.pwrite_barrier(lbn * BS, data, FUA_COMMAND)
                    run.barriers_done = len(run.barriers)
                else:
                    vol.pwrite(lbn * BS, data, fua=fua)
                run.seqs.append(q.last_seq if q.last_seq != before else None)
                if fua or mode is CacheMode.WRITE_THROUGH:
                    run.flushed = len(run.issued)
            elif op[0] == "flush":
                if barriers:
                    run.barriers.append(q.last_seq)
                    run.deferrable.append(False)
                    deferred = vol.counters["barriers_deferred"]
                    vol.flush_barrier(FLUSH_COMMAND)
                    run.barriers_done = len(run.barriers)
                    run.deferrable[-1] = vol.counters["barriers_deferred"] > deferred
                    run.deferred += run.deferrable[-1]
                else:
                    vol.flush()
                run.flushed = len(run.issued)
            else:
                got = q.read("peer", max_records=1000)
                if got:
                    q.ack("peer", got[-1].seq)
    except PowerCut:
        run.cut = True
    run.degraded = q is not None and (bool(q.transitions) or q.dirty_active)
    return run, cbq_st, mirror_st, rail.ops


def replay_image(issued: list[tuple[int, bytes]], upto: int, blocks: int) -> bytes:
    image = bytearray(blocks * BS)
    for lbn, data in issued[:upto]:
        image[lbn * BS:lbn * BS + len(data)] = data
    return bytes(image)


def check_recovery(run: Run, cbq_st: CrashSimStorage, mirror_st: CrashSimStorage,
                   geo: Geometry, mode: CacheMode, rng: random.Random) -> int:
    """Cut power, recover, and check the promises; returns the recovered last seq."""
    cbq_img = CrashSimStorage.from_image(bytes(cbq_st.crash_image(rng)))
    mirror_img = CrashSimStorage.from_image(bytes(mirror_st.crash_image(rng)))
    # Offline inspection of the raw image, before anything is replayed.
    offline = CircularBufferQueue(cbq_img, read_only=True)
    report = offline.verify()
    assert report["clean"], report
    if run.barriers and not run.degraded:
        check_barriers(run, offline, offline.last_seq)
    q, vol = open_unit(cbq_img, mirror_img, mode)
    if run.degraded:
        check_promises(run, q, vol, geo)
        return q.last_seq
    last = q.last_seq
    assert run.flushed <= last <= len(run.issued), (run.flushed, last, len(run.issued))
    # The volume equals the in-order application of exactly the recovered writes.
    expect = replay_image(run.issued, last, geo.volume_blocks)
    got = vol.pread(0, geo.volume_blocks * BS)
    if got != expect:
        bad = next(i for i in range(0, len(got), BS) if got[i:i + BS] != expect[i:i + BS])
        raise AssertionError(f"volume differs at block {bad // BS} after recovery "
                             f"(recovered seq {last}, flushed {run.flushed})")
    # A peer is sent every recovered write after its ack, in order, with its data.
    acked = q.consumers["peer"].acked_seq
    seen = acked
    while True:
        batch = q.read("peer", max_records=1000)
        if not batch:
            break
        for w in batch:
            assert w.seq == seen + 1
            lbn, data = run.issued[w.seq - 1]
            assert (w.lbn, w.data) == (lbn, data), f"seq {w.seq} differs after recovery"
            seen = w.seq
    assert seen == last
    assert q.verify()["clean"]
    if run.barriers:
        check_barriers(run, q, last)
    return last


def check_barriers(run: Run, q: CircularBufferQueue, last: int) -> None:
    """Recovered barriers are whole ones the host sent, in its order, none past the
    recovered writes, and none that completed before the cut is lost, but for flush
    barriers acknowledged before their own sync (write-through) that no recovered
    write follows: the host's data is all there, only that last point is gone."""
    got = [seq for seq, _, _ in q.barriers()]
    assert all(s <= last for s in got), (got, last)
    sent = run.barriers
    must = run.barriers_done
    while must and run.deferrable[must - 1] and sent[must - 1] >= last:
        must -= 1
    if got:
        k = next((i for i in range(len(sent)) if sent[i:i + len(got)] == got), None)
        assert k is not None, f"recovered barriers {got} are not a run of those sent {sent}"
        # Barriers still queued are those after the tail; a completed one past the
        # first recovered is never missing.
        assert k + len(got) >= must, (got, sent, run.barriers_done, must)


def check_promises(run: Run, q: CircularBufferQueue, vol: Volume, geo: Geometry) -> None:
    """What holds in every mode: flushed data is there, and peers get flushed writes exactly.

    Compact records carry no data and dirty-map writes have no record, so the
    exact-replay check does not apply; a block written after the last flush may
    hold either value (or a torn mix of them, as on any disk).
    """
    got = vol.pread(0, geo.volume_blocks * BS)
    last_writer: dict[int, int] = {}
    for i, (lbn, data) in enumerate(run.issued):
        for b in range(lbn, lbn + len(data) // BS):
            last_writer[b] = i
    for b, i in last_writer.items():
        if i < run.flushed:
            lbn, data = run.issued[i]
            off = (b - lbn) * BS
            assert got[b * BS:(b + 1) * BS] == data[off:off + BS], \
                f"flushed write {i} lost at block {b}"
    by_seq = {seq: run.issued[i] for i, seq in enumerate(run.seqs) if seq is not None}
    flushed_seqs = {run.seqs[i] for i in range(min(run.flushed, len(run.seqs)))}
    prev = q.consumers["peer"].acked_seq
    while True:
        batch = q.read("peer", max_records=1000)
        if not batch:
            break
        for w in batch:
            assert w.seq > prev
            prev = w.seq
            if w.seq in flushed_seqs:
                assert (w.lbn, w.data) == by_seq[w.seq], f"seq {w.seq} differs after recovery"
    assert q.verify()["clean"]
