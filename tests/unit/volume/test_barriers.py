"""Barrier capture: FLUSH, SYNCHRONIZE CACHE and FUA writes leave BARRIER records in the
queue right after the data they cover, with the front end, opcode and connection."""

from __future__ import annotations

import struct
import time

import pytest

from firmware.blockdev import FrontEnd, HostCommand
from firmware.cbq import CbqFormatError, CircularBufferQueue, create
from firmware.cbq.format import (
    BARRIER_FLUSH,
    BARRIER_FUA,
    BARRIER_IN_RESYNC,
    SUPERBLOCK_SLOT,
    split_barrier_flags,
)
from firmware.nbd.protocol import NBD_CMD_FLUSH, NBD_CMD_WRITE
from firmware.nbd.server import write_range
from firmware.record import HeaderFormat
from firmware.scsi import LogicalUnit, ScsiTarget, Status
from firmware.scsi import target as T
from firmware.storage import CrashSimStorage
from firmware.volume import CacheMode, Volume

BS = 512
BLOCKS = 256


def _volume(mode: CacheMode = CacheMode.WRITE_BACK) -> tuple[CrashSimStorage, Volume]:
    cbq_st = CrashSimStorage(3 * 4096 + 128 * 1024)
    create(cbq_st, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512,
           consumers=("peer",))
    vol = Volume(CrashSimStorage(BLOCKS * BS), CircularBufferQueue(cbq_st), cache_mode=mode,
                 flush_interval=3600.0)
    return cbq_st, vol


def _log(vol: Volume) -> list[tuple[str, int, int]]:
    """(kind, seq, flags or lbn) of the peer's view of the queue, barriers included."""
    out = []
    while got := vol.cbq.read("peer", max_records=1000, barriers=True):
        for q in got:
            out.append(("barrier", q.seq, q.flags) if q.barrier else ("write", q.seq, q.lbn))
        vol.cbq.ack("peer", got[-1].seq)
    return out


def _rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def _rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def test_nbd_flush_and_fua_write_follow_their_data() -> None:
    _, vol = _volume()
    write_range(vol, 0, b"a" * BS)
    write_range(vol, BS, b"b" * BS)
    vol.flush_barrier(HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH, connection=7))
    write_range(vol, 2 * BS, b"c" * 2 * BS, fua=True,
                command=HostCommand(FrontEnd.NBD, NBD_CMD_WRITE, True, 9))
    vol.flush()  # a flush without a command records nothing
    log = _log(vol)
    assert [(k, s) for k, s, _ in log] == [
        ("write", 1), ("write", 2), ("barrier", 2), ("write", 3), ("barrier", 3)]
    assert split_barrier_flags(log[2][2]) == (BARRIER_FLUSH, FrontEnd.NBD, NBD_CMD_FLUSH)
    assert split_barrier_flags(log[4][2]) == (BARRIER_FUA, FrontEnd.NBD, NBD_CMD_WRITE)
    # Durable with the data: a reopened queue still holds them, with connection ids.
    got = [(s, f) for s, _, f in vol.cbq.barriers()]
    assert got == [(2, log[2][2]), (3, log[4][2])]
    assert vol.status()["barriers"] == 2


def test_scsi_synchronize_cache_and_fua_writes() -> None:
    _, vol = _volume()
    target = ScsiTarget([LogicalUnit(vol, serial="MU0000")], power_on_unit_attention=False)
    # A WRITE(10) with FUA of 64 blocks arrives in several pieces: one barrier, after all.
    payload = bytes(range(256)) * (64 * BS // 256)
    assert target.execute(0, _rw10(T.WRITE_10, 8, 64, flags=0x08), payload).status is Status.GOOD
    assert target.execute(0, _rw10(T.WRITE_10, 100, 1), b"x" * BS).status is Status.GOOD
    assert target.execute(0, _rw10(T.SYNCHRONIZE_CACHE_10, 0, 0)).status is Status.GOOD
    assert target.execute(0, _rw16(T.WRITE_16, 120, 2, flags=0x08),
                          b"y" * 2 * BS).status is Status.GOOD
    assert target.execute(0, _rw16(T.SYNCHRONIZE_CACHE_16, 0, 0)).status is Status.GOOD
    # Reads are served, counted, and never queued.
    assert target.execute(0, _rw10(T.READ_10, 8, 64)).data_in == payload
    log = _log(vol)
    kinds = [k for k, _, _ in log]
    writes = [i for i, k in enumerate(kinds) if k == "write"]
    barriers = [(s, split_barrier_flags(f)) for k, s, f in log if k == "barrier"]
    last_fua_piece = max(i for i in writes if log[i][2] < 100)
    assert kinds[last_fua_piece + 1] == "barrier"
    assert barriers == [
        (log[last_fua_piece][1], (BARRIER_FUA, FrontEnd.SCSI, T.WRITE_10)),
        (log[last_fua_piece][1] + 1, (BARRIER_FLUSH, FrontEnd.SCSI, T.SYNCHRONIZE_CACHE_10)),
        (log[last_fua_piece][1] + 2, (BARRIER_FUA, FrontEnd.SCSI, T.WRITE_16)),
        (log[last_fua_piece][1] + 2, (BARRIER_FLUSH, FrontEnd.SCSI, T.SYNCHRONIZE_CACHE_16)),
    ]
    assert vol.status()["reads"] >= 1


def test_barriers_in_compact_mode_and_overflow() -> None:
    cbq_st = CrashSimStorage(3 * 4096 + 64 * 1024)
    create(cbq_st, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512,
           consumers=("peer",), high_water=0.3)
    vol = Volume(CrashSimStorage(BLOCKS * BS), CircularBufferQueue(cbq_st),
                 cache_mode=CacheMode.WRITE_BACK, flush_interval=3600.0)
    flush = HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH)
    for i in range(40):  # 40 x 2 KiB: past the high-water mark, into compact mode
        vol.pwrite((i % 60) * 4 * BS, bytes([i]) * 4 * BS)
        vol.flush_barrier(flush)
    assert vol.cbq.mode.value == "compact"
    assert len(vol.cbq.barriers()) == 40  # compact mode keeps every barrier
    for i in range(400):  # compact records, then overflow: the dirty map takes over
        vol.pwrite((i % 60) * 4 * BS, bytes([i]) * 4 * BS)
        if vol.cbq.mode.value == "overflow":
            break
    assert vol.cbq.mode.value == "overflow"
    vol.flush_barrier(flush)
    assert vol.status()["barriers_unrecorded"] == 1  # no log to hold it; counted
    vol.cbq.begin_resync()  # queuing resumes while the peer resyncs
    vol.pwrite(0, b"z" * BS)
    vol.flush_barrier(flush)
    seq, _, flags = vol.cbq.barriers()[-1]
    assert seq == vol.cbq.last_seq and flags & BARRIER_IN_RESYNC


def test_superblock_version_two_refuses_older_readers_and_reads_version_one() -> None:
    cbq_st, vol = _volume()
    vol.pwrite(0, b"q" * BS)
    vol.flush_barrier(HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH))
    vol.close()
    raw = [cbq_st.pread(i * SUPERBLOCK_SLOT, SUPERBLOCK_SLOT) for i in (0, 1)]
    # Every slot is version 2: a reader of version 1 finds no superblock it accepts.
    v1 = HeaderFormat("superblock", struct.Struct("<8sHHQII"), b"MUCBQSB1", 1)
    for slot in raw:
        assert struct.unpack_from("<8sH", slot)[1] == 2
        with pytest.raises(Exception, match="unsupported superblock format 2"):
            v1.unpack(slot)
    # A queue written as version 1 opens here, and is upgraded in both slots.
    old = CrashSimStorage(3 * 4096 + 128 * 1024)
    create(old, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512)
    for i in (0, 1):
        slot = bytearray(old.pread(i * SUPERBLOCK_SLOT, SUPERBLOCK_SLOT))
        if not any(slot):
            continue
        _, _, flags, gen, blen, _ = struct.unpack_from("<8sHHQII", slot)
        head, _ = v1.pack(flags, gen, blen, payload=bytes(slot[28:28 + blen]))
        slot[:28] = head
        old.pwrite(i * SUPERBLOCK_SLOT, bytes(slot))
    q = CircularBufferQueue(old)
    assert q.append_write(0, b"w" * BS).seq == 1
    assert all(struct.unpack_from("<8sH", old.pread(i * SUPERBLOCK_SLOT, 16))[1] == 2
               for i in (0, 1))
    # A version this code does not know is refused by name.
    future = bytearray(old.pread(0, SUPERBLOCK_SLOT))
    struct.pack_into("<H", future, 8, 3)
    other = bytearray(old.pread(SUPERBLOCK_SLOT, SUPERBLOCK_SLOT))
    struct.pack_into("<H", other, 8, 3)
    old.pwrite(0, bytes(future))
    old.pwrite(SUPERBLOCK_SLOT, bytes(other))
    with pytest.raises(CbqFormatError, match="unsupported superblock format 3"):
        CircularBufferQueue(old)


def test_a_reopened_volume_redoes_writes_around_barriers() -> None:
    cbq_st = CrashSimStorage(3 * 4096 + 128 * 1024)
    create(cbq_st, volume_blocks=BLOCKS, block_size=BS, chunk_size=4096, align=512)
    mirror = CrashSimStorage(BLOCKS * BS)
    vol = Volume(mirror, CircularBufferQueue(cbq_st), cache_mode=CacheMode.WRITE_BACK,
                 flush_interval=3600.0, mirror_checkpoint_bytes=1 << 30)
    vol.pwrite(0, b"1" * BS)
    vol.flush_barrier(HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH))
    vol.pwrite(BS, b"2" * BS, fua=True)
    vol.flush_barrier(HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH))
    # Power cut: what the mirror did not sync is lost; the queue redoes it.
    cbq_img = CrashSimStorage.from_image(bytes(cbq_st.durable))
    report = CircularBufferQueue(cbq_img, read_only=True).verify()
    assert report["clean"] and report["records"]["barrier"] == 2
    again = Volume(CrashSimStorage.from_image(bytes(mirror.durable)),
                   CircularBufferQueue(cbq_img))
    assert again.pread(0, 2 * BS) == b"1" * BS + b"2" * BS
    assert again.cbq.verify()["clean"]


def test_write_through_flush_barrier_rides_the_next_commit_or_the_idle_sync() -> None:
    """In write-through the writes a FLUSH covers are durable already: the barrier is
    not synced on its own; peers see it once the next write's commit makes it durable,
    or once the idle committer syncs it."""
    _, vol = _volume(CacheMode.WRITE_THROUGH)
    flush = HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH, connection=5)
    vol.pwrite(0, b"a" * BS)
    vol.flush_barrier(flush)
    assert vol.counters["barriers_deferred"] == 1
    assert vol.cbq.barriers() == []  # acknowledged, not yet durable, not readable
    assert _log(vol) == [("write", 1, 0)]
    vol.pwrite(BS, b"b" * BS)  # its group commit carries the barrier before it
    assert [s for s, _, _ in vol.cbq.barriers()] == [1]
    assert [e[:2] for e in _log(vol)] == [("barrier", 1), ("write", 2)]
    # With the committer running, an idle host's last point is synced within a moment.
    vol.start()
    try:
        vol.flush_barrier(flush)
        assert vol.counters["barriers_deferred"] == 2
        deadline = time.monotonic() + 5.0
        while [s for s, _, _ in vol.cbq.barriers()] != [1, 2]:
            assert time.monotonic() < deadline, vol.cbq.barriers()
            time.sleep(0.01)
    finally:
        vol.close()


def test_write_through_flush_barrier_syncs_while_a_write_is_in_flight() -> None:
    """A write appended but not yet committed (another thread's) keeps the flush's own
    commit; so do write-back and a volume whose cache holds writes."""
    _, vol = _volume(CacheMode.WRITE_THROUGH)
    flush = HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH)
    with vol._lock:
        vol._write_blocks(0, b"c" * BS)  # queued, its commit still to come
    vol.flush_barrier(flush)
    assert vol.counters["barriers_deferred"] == 0
    assert [s for s, _, _ in vol.cbq.barriers()] == [1]
    _, wb = _volume(CacheMode.WRITE_BACK)
    wb.pwrite(0, b"d" * BS)
    wb.flush_barrier(flush)
    assert wb.counters["barriers_deferred"] == 0
    assert [s for s, _, _ in wb.cbq.barriers()] == [1]
