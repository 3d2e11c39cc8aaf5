"""Remote unit store: apply, idempotence, seq order, crash recovery, retention, commit
delay and drop_range, resync hooks, virtual units and their locks."""

from __future__ import annotations

import os
import posixpath
import random
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from blake3 import blake3

from firmware.link.frames import WriteRecord
from firmware.record import IntegrityError
from firmware.remote import (
    CHUNK_SIZE,
    AlreadyApplied,
    GeometryMismatch,
    InvalidRecord,
    InvalidUnitId,
    JournalCorruption,
    NotRestorable,
    OsFileOps,
    OutsideRetention,
    RemoteStore,
    Retention,
    SeqGap,
    StoreUsageError,
    UnitBusy,
    UnitStore,
)
from firmware.remote.fileio import FileHandle, OsFile
from tests.support import REPO
from tests.support.remote_store import (
    BS,
    T0,
    FakeClock,
    S,
    make_records,
    model,
    open_unit,
)


def batches(records: list[WriteRecord], rng: random.Random) -> list[list[WriteRecord]]:
    out, i = [], 0
    while i < len(records):
        k = rng.randint(1, 4)
        out.append(records[i:i + k])
        i += k
    return out


# --------------------------------------------------------------------------- simulated FS


class PowerCut(Exception):
    pass


@dataclass
class _Inode:
    durable: bytearray = field(default_factory=bytearray)
    data: bytearray = field(default_factory=bytearray)
    #: Since the last sync, in order: ("w", offset, bytes) or ("t", size, b"").
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)


class SimFS:
    """A file system whose unsynced writes and unsynced directory changes may be lost
    (and written sectors torn) when the power is cut.

    `cut_after=N` raises PowerCut at the (N+1)-th mutating call (a write boundary).
    File data becomes durable on sync(); namespace changes (create, rename, unlink)
    go to one ordered journal made durable by any fsync_dir(), so a crash keeps a
    prefix of them, the way a journaling file system does."""

    SECTOR = 512

    def __init__(self, cut_after: int | None = None) -> None:
        self.inodes: list[_Inode] = []
        self.names: dict[str, int] = {}
        self.durable_names: dict[str, int] = {}
        self.ns_pending: list[tuple[str, str, str, int]] = []
        self.dirs: set[str] = {"/"}
        self.cut_after = cut_after
        self.ops = 0
        self.dead = False

    def boundary(self) -> None:
        if self.dead:
            raise PowerCut("power is off")
        if self.cut_after is not None and self.ops >= self.cut_after:
            self.dead = True
            raise PowerCut(f"power cut at boundary {self.ops}")
        self.ops += 1

    # -- FileOps
    def makedirs(self, path: str) -> None:
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(posixpath.basename(p) for p in self.names if posixpath.dirname(p) == path)

    def exists(self, path: str) -> bool:
        return path in self.names or path in self.dirs

    def open(self, path: str, create: bool = False) -> SimFile:
        if path not in self.names:
            if not create:
                raise FileNotFoundError(path)
            self.boundary()
            self.inodes.append(_Inode())
            ino = len(self.inodes) - 1
            self.names[path] = ino
            self.ns_pending.append(("link", path, "", ino))
        return SimFile(self, self.names[path])

    def rename(self, src: str, dst: str) -> None:
        self.boundary()
        ino = self.names.pop(src)
        self.names[dst] = ino
        self.ns_pending.append(("rename", src, dst, ino))

    def unlink(self, path: str) -> None:
        self.boundary()
        del self.names[path]
        self.ns_pending.append(("unlink", path, "", -1))

    def fsync_dir(self, path: str) -> None:
        self.boundary()
        for op in self.ns_pending:
            self._apply_ns(self.durable_names, op)
        self.ns_pending.clear()

    def lock(self, path: str) -> _NoLock:
        return _NoLock()

    @staticmethod
    def _apply_ns(names: dict[str, int], op: tuple[str, str, str, int]) -> None:
        kind, a, b, ino = op
        if kind == "link":
            names[a] = ino
        elif kind == "rename":
            names.pop(a, None)
            names[b] = ino
        else:
            names.pop(a, None)

    # -- the power cut
    def crash(self, rng: random.Random) -> SimFS:
        """What the disk may hold after the cut: a fresh, powered SimFS."""
        out = SimFS()
        out.dirs = set(self.dirs)
        names = dict(self.durable_names)
        keep = rng.randint(0, len(self.ns_pending))
        for op in self.ns_pending[:keep]:
            self._apply_ns(names, op)
        for ino in self.inodes:
            img = bytearray(ino.durable)
            for kind, off, data in ino.pending:
                if kind == "t":
                    if rng.random() < 0.5:
                        del img[off:]
                        img.extend(bytes(max(0, off - len(img))))
                    continue
                pos, end = off, off + len(data)
                while pos < end:
                    sec_end = min(end, (pos // self.SECTOR + 1) * self.SECTOR)
                    roll = rng.random()
                    piece = data[pos - off:sec_end - off]
                    if roll < 0.4:
                        pos = sec_end
                        continue
                    if roll < 0.55 and len(piece) > 1:
                        piece = piece[:rng.randrange(1, len(piece))]
                    if len(img) < pos + len(piece):
                        img.extend(bytes(pos + len(piece) - len(img)))
                    img[pos:pos + len(piece)] = piece
                    pos = sec_end
            new = _Inode(durable=bytearray(img), data=bytearray(img))
            out.inodes.append(new)
        out.names = dict(names)
        out.durable_names = dict(names)
        return out


class _NoLock:
    def release(self) -> None:
        pass


class SimFile:
    def __init__(self, fs: SimFS, ino: int) -> None:
        self.fs = fs
        self.ino = fs.inodes[ino]

    def size(self) -> int:
        return len(self.ino.data)

    def pread(self, offset: int, length: int) -> bytes:
        if self.fs.dead:
            raise PowerCut("power is off")
        out = bytes(self.ino.data[offset:offset + length])
        return out + bytes(length - len(out))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.fs.boundary()
        data = bytes(data)
        d = self.ino.data
        if len(d) < offset + len(data):
            d.extend(bytes(offset + len(data) - len(d)))
        d[offset:offset + len(data)] = data
        self.ino.pending.append(("w", offset, data))

    def truncate(self, size: int) -> None:
        self.fs.boundary()
        d = self.ino.data
        del d[size:]
        d.extend(bytes(size - len(d)))
        self.ino.pending.append(("t", size, b""))

    def sync(self) -> None:
        self.fs.boundary()
        self.ino.durable = bytearray(self.ino.data)
        self.ino.pending.clear()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- basics




def test_apply_in_order_replay_is_harmless(tmp_path: Path) -> None:
    rng = random.Random(1)
    recs = make_records(rng, 40, 128)
    with open_unit(tmp_path / "u") as u:
        assert u.apply(recs[:25]) == 25
        assert u.last_applied_seq == 25
        assert u.read_mirror(0, 64 * 1024) == model(recs[:25], 64 * 1024)
        hist = u.status().history_records
        # A reconnect replays seqs the remote already holds, overlapping new ones.
        assert u.apply(recs[10:25]) == 25
        assert u.status().history_records == hist
        assert u.apply(recs[20:40]) == 40
        assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024)
        st = u.status()
        assert st.bytes_received == sum(len(r.data) for r in recs)
        assert (st.last_durable_seq, st.last_applied_seq, st.lag_seqs) == (40, 40, 0)


def test_seq_gap_is_refused_and_keeps_nothing_of_the_batch(tmp_path: Path) -> None:
    rng = random.Random(2)
    recs = make_records(rng, 10, 128)
    with open_unit(tmp_path / "u") as u:
        u.apply(recs[:3])
        with pytest.raises(SeqGap, match="seq 6 arrived where 5 was due"):
            u.apply([recs[3], recs[5]])
        assert u.last_durable_seq() == 3
        with pytest.raises(SeqGap, match="where 4 was due"):
            u.apply([recs[4]])
        assert u.apply(recs[3:]) == 10
        assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024)


def test_first_seq_must_be_one(tmp_path: Path) -> None:
    with open_unit(tmp_path / "u") as u, pytest.raises(SeqGap):
        u.apply([WriteRecord(2, 0, bytes(BS), T0)])


@pytest.mark.parametrize(
    "lbn,data,match",
    [
        (0, b"", "whole number"),
        (0, b"x" * 100, "whole number"),
        (127, b"x" * 1024, "outside"),
        (128, b"x" * 512, "outside"),
        (-1, b"x" * 512, "outside"),
    ],
)
def test_records_outside_the_volume_are_refused(tmp_path: Path, lbn: int, data: bytes,
                                                match: str) -> None:
    with open_unit(tmp_path / "u") as u:
        with pytest.raises(InvalidRecord, match=match):
            u.apply([WriteRecord(1, lbn, data, T0)])
        assert u.last_durable_seq() == 0


def test_reopen_keeps_state_and_trims_journals(tmp_path: Path) -> None:
    rng = random.Random(3)
    recs = make_records(rng, 200, 128)
    u = open_unit(tmp_path / "u", segment_bytes=8192)
    for b in batches(recs, rng):
        u.apply(b)
    u.close()
    # Applied receive segments are deleted at checkpoints; history stays (no retention).
    assert len(os.listdir(tmp_path / "u" / "journal")) <= 2
    u = open_unit(tmp_path / "u", segment_bytes=8192)
    assert (u.last_durable_seq(), u.last_applied_seq) == (200, 200)
    assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024)
    for seq in (0, 1, 77, 150, 200):
        with u.image_at_seq(seq) as v:
            assert v.pread(0, 64 * 1024) == model(recs[:seq], 64 * 1024)
    u.close()


def test_torn_tail_of_receive_journal_is_cut(tmp_path: Path) -> None:
    rng = random.Random(4)
    recs = make_records(rng, 6, 128)
    with open_unit(tmp_path / "u", commit_delay_s=3600, clock=FakeClock()) as u:
        u.apply(recs[:5])
    seg = sorted((tmp_path / "u" / "journal").iterdir())[-1]
    good = seg.read_bytes()
    # An append cut short: the start of a record (header and part of its payload).
    with UnitStore(str(tmp_path / "v"), "unit-a", 64 * 1024, BS, clock=FakeClock()) as other:
        other.apply(recs[:1])
    donor = sorted((tmp_path / "v" / "journal").iterdir())[-1].read_bytes()
    seg.write_bytes(good + donor[36:36 + 48 + 100])
    with open_unit(tmp_path / "u", clock=FakeClock()) as u:
        assert u.last_durable_seq() == 5
        assert seg.stat().st_size == len(good)
        assert u.apply(recs[4:]) == 6
        u.set_commit_delay(0)
        u.apply_due(T0 + 1000 * S)
        assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024)


def test_lost_durable_record_is_reported_not_ignored(tmp_path: Path) -> None:
    rng = random.Random(4)
    recs = make_records(rng, 6, 128)
    with open_unit(tmp_path / "u", commit_delay_s=3600, clock=FakeClock()) as u:
        u.apply(recs)
    seg = sorted((tmp_path / "u" / "journal").iterdir())[-1]
    seg.write_bytes(seg.read_bytes()[:-7])
    with pytest.raises(JournalCorruption, match="seq 6 was durable.*ends at 5"):
        open_unit(tmp_path / "u", clock=FakeClock())


def test_corrupt_record_in_an_older_segment_names_its_place(tmp_path: Path) -> None:
    rng = random.Random(6)
    recs = make_records(rng, 60, 128)
    with open_unit(tmp_path / "u", commit_delay_s=3600, clock=FakeClock(),
                   segment_bytes=8192) as u:
        u.apply(recs)
    first = sorted((tmp_path / "u" / "journal").iterdir())[0]
    raw = bytearray(first.read_bytes())
    raw[36 + 48 + 10] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(JournalCorruption, match=r"CRC mismatch in .*rj-0+1\.seg at offset 36"):
        open_unit(tmp_path / "u", clock=FakeClock(), segment_bytes=8192)


# --------------------------------------------------------------------------- bit rot

SEGMENT_HEADER_BYTES, RECORD_HEADER_BYTES = 36, 48


def _record_offset(recs: list[WriteRecord], index: int) -> int:
    """Where record `index` starts in a first segment holding `recs` (receive journal) or
    their before-images (history), which have the same lengths."""
    return SEGMENT_HEADER_BYTES + sum(RECORD_HEADER_BYTES + len(r.data) for r in recs[:index])


def _segment(unit_dir: Path, journal: str) -> Path:
    [seg] = sorted((unit_dir / journal).iterdir())
    return seg


def _flip_on_disk(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


class _RottingFile(OsFile):
    def __init__(self, disk: RottingDisk, path: str, create: bool) -> None:
        super().__init__(path, create)
        self.disk = disk

    def pread(self, offset: int, length: int) -> bytes:
        return self.disk.rot(self.path, offset, super().pread(offset, length))


class RottingDisk(OsFileOps):
    """The real file system, except that one byte of one file reads back flipped after it
    has been read `clean_reads` times (a sector going bad under a running unit), and that
    the state file can be made impossible to replace (a power cut before a checkpoint)."""

    def __init__(self, path: Path | None = None, offset: int = 0, clean_reads: int = 0) -> None:
        self.path, self.offset, self.clean_reads = path, offset, clean_reads
        self.refuse_renames = False

    def open(self, path: str, create: bool = False) -> FileHandle:
        return _RottingFile(self, path, create)

    def rename(self, src: str, dst: str) -> None:
        if self.refuse_renames:
            raise OSError("power cut before the state file was replaced")
        super().rename(src, dst)

    def rot(self, path: str, offset: int, data: bytes) -> bytes:
        if self.path is None or path != str(self.path):
            return data
        if not offset <= self.offset < offset + len(data):
            return data
        if self.clean_reads:
            self.clean_reads -= 1
            return data
        out = bytearray(data)
        out[self.offset - offset] ^= 0xFF
        return bytes(out)


def _assert_names_the_record(e: JournalCorruption, seg: Path, offset: int) -> None:
    assert isinstance(e, IntegrityError)
    assert (e.path, e.offset, e.reason) == (str(seg), offset, "record CRC mismatch")


def test_corrupt_payload_in_the_receive_journal_is_not_applied(tmp_path: Path) -> None:
    recs = make_records(random.Random(7), 6, 128)
    clock = FakeClock()
    with open_unit(tmp_path / "u", commit_delay_s=60, clock=clock) as u:
        u.apply(recs)
        assert u.last_applied_seq == 0
        seg = _segment(tmp_path / "u", "journal")
        _flip_on_disk(seg, _record_offset(recs, 2) + RECORD_HEADER_BYTES + 5)
        clock.now = T0 + 3600 * S
        with pytest.raises(JournalCorruption) as info:
            u.apply_due()
        _assert_names_the_record(info.value, seg, _record_offset(recs, 2))
        assert u.last_applied_seq < 3
        assert u.read_mirror(0, 64 * 1024) == model(recs[:u.last_applied_seq], 64 * 1024)


def test_corrupt_before_image_is_not_rolled_back_onto_the_mirror(tmp_path: Path) -> None:
    recs = make_records(random.Random(8), 6, 128)
    with open_unit(tmp_path / "u", clock=FakeClock()) as u:
        assert u.apply(recs) == 6 and u.last_applied_seq == 6
        seg = _segment(tmp_path / "u", "history")
        _flip_on_disk(seg, _record_offset(recs, 2) + RECORD_HEADER_BYTES + 5)
        with pytest.raises(JournalCorruption) as info:
            u.rollback(to_seq=1)
        _assert_names_the_record(info.value, seg, _record_offset(recs, 2))
        # Undone newest first: seqs 6..4 went, the damaged before-image of seq 3 did not.
        assert u.read_mirror(0, 64 * 1024) == model(recs[:3], 64 * 1024)


def test_payload_gone_bad_since_the_scan_is_not_redone(tmp_path: Path) -> None:
    recs = make_records(random.Random(9), 6, 128)
    disk = RottingDisk()
    u = open_unit(tmp_path / "u", clock=FakeClock(), ops=disk)
    assert u.apply(recs) == 6
    # Cut before the checkpoint: the next open redoes every write from its journal.
    disk.refuse_renames = True
    with pytest.raises(OSError, match="power cut"):
        u.close()
    seg = _segment(tmp_path / "u", "journal")
    # The scan at open reads the payload whole; the redo reads it again, damaged.
    rotting = RottingDisk(seg, _record_offset(recs, 2) + RECORD_HEADER_BYTES + 5, clean_reads=1)
    with pytest.raises(JournalCorruption) as info:
        open_unit(tmp_path / "u", clock=FakeClock(), ops=rotting)
    _assert_names_the_record(info.value, seg, _record_offset(recs, 2))
    assert (tmp_path / "u" / "mirror.img").read_bytes() == model(recs, 64 * 1024)


# --------------------------------------------------------------------------- crash tests


@dataclass
class Outcome:
    acked: int = 0
    sent: int = 0


def _workload_plain(fs: SimFS, recs: list[WriteRecord], out: Outcome,
                    rng: random.Random) -> None:
    clock = FakeClock()
    u = UnitStore("/r/u", "unit-a", 32 * 1024, BS, ops=fs, clock=clock, segment_bytes=4096,
                  retention=Retention(max_bytes=12 * 1024))
    for b in batches(recs, rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
        clock.now = b[-1].ts
    u.checkpoint()
    u.close()


def _workload_delay_drop(fs: SimFS, recs: list[WriteRecord], out: Outcome,
                         rng: random.Random) -> None:
    clock = FakeClock()
    u = UnitStore("/r/u", "unit-a", 32 * 1024, BS, ops=fs, clock=clock, segment_bytes=4096,
                  commit_delay_s=5)
    for b in batches(recs, rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
        clock.now = b[-1].ts
        if out.acked >= 20 and u.status().dropped_records == 0:
            u.drop_range(seq_from=17, seq_to=19)
    clock.now += 10 * S
    u.apply_due()
    u.close()


def _workload_rollback(fs: SimFS, recs: list[WriteRecord], out: Outcome,
                       rng: random.Random) -> None:
    clock = FakeClock()
    u = UnitStore("/r/u", "unit-a", 32 * 1024, BS, ops=fs, clock=clock, segment_bytes=4096)
    for b in batches(recs[:20], rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
    u.rollback(to_seq=10)
    for b in batches(recs[20:], rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
    u.close()


RESYNC_TARGET = random.Random(99).randbytes(32 * 1024)


def _workload_resync(fs: SimFS, recs: list[WriteRecord], out: Outcome,
                     rng: random.Random) -> None:
    u = UnitStore("/r/u", "unit-a", 32 * 1024, BS, ops=fs, clock=FakeClock(),
                  segment_bytes=4096)
    for b in batches(recs[:15], rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
    u.write_chunk(0, RESYNC_TARGET)
    out.sent = 25
    u.resync_complete(25)
    out.acked = 25
    for b in batches(recs[25:], rng):
        out.sent = b[-1].seq
        out.acked = u.apply(b)
    u.close()


WORKLOADS = {
    "resync": _workload_resync,
    "plain": _workload_plain,
    "delay-drop": _workload_delay_drop,
    "rollback": _workload_rollback,
}


def _expected(kind: str, recs: list[WriteRecord], u: UnitStore, upto: int) -> bytes | None:
    """The image after seq `upto`; None where no consistent image exists (the live
    mirror in the middle of a resync)."""
    size = 32 * 1024
    st = u.status()
    if kind == "resync":
        if upto <= 15:
            return None if st.resync is not None and upto == u.last_applied_seq else \
                model(recs[:upto], size)
        assert any(e["event"] == "resync-complete" for e in st.events)
        return model(recs[25:upto], size, base=RESYNC_TARGET)
    if kind == "delay-drop":
        skip = frozenset(range(17, 20)) if st.dropped_records else frozenset()
        assert st.dropped_records in (0, 3)
        return model(recs[:upto], size, skip=skip)
    if kind == "rollback" and upto > 10 and any(e["event"] == "rollback" for e in st.events):
        base = model(recs[:10], size)
        return model(recs[20:upto], size, base=base)
    return model(recs[:upto], size)


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_power_cut_at_every_boundary(kind: str) -> None:
    """Cut power at every write boundary of a workload (twice, with different losses
    and tears); reopening must give a mirror equal to the in-order application of
    exactly the durable seqs, with every acknowledged seq durable."""
    workload = WORKLOADS[kind]
    recs = make_records(random.Random(10), 30, 64, max_blocks=6)
    # Boundaries of an uninterrupted run.
    fs = SimFS()
    workload(fs, recs, Outcome(), random.Random(11))
    total = fs.ops
    assert total > 60
    checked = 0
    for cut in range(total + 1):
        for seed in range(2):
            fs = SimFS(cut_after=cut)
            out = Outcome()
            try:
                workload(fs, recs, out, random.Random(11))
            except PowerCut:
                pass
            crashed = fs.crash(random.Random(cut * 7 + seed))
            u = UnitStore("/r/u", "unit-a", 32 * 1024, BS, ops=crashed, clock=FakeClock(),
                          segment_bytes=4096)
            d = u.last_durable_seq()
            assert out.acked <= d <= out.sent, (cut, seed, out, d)
            # What reached the mirror is an in-order prefix of what is durable...
            a = u.last_applied_seq
            if kind == "delay-drop":
                applied_expect = _expected(kind, recs, u, a)
            else:
                assert a == d
                applied_expect = _expected(kind, recs, u, d)
            if applied_expect is not None:
                assert u.read_mirror(0, 32 * 1024) == applied_expect, (cut, seed)
            if u.resync_active:
                # Cut mid-resync: the last consistent image stays restorable.
                assert d == 15
                with u.image_at_seq(15) as v:
                    assert v.pread(0, 32 * 1024) == model(recs[:15], 32 * 1024)
                u.write_chunk(0, RESYNC_TARGET)
                u.resync_complete(25)
                d = 25
            # ...and the rest follows once due, with nothing lost or torn.
            u.set_commit_delay(0)
            u.apply_due(T0 + 1000 * S)
            assert u.read_mirror(0, 32 * 1024) == _expected(kind, recs, u, d), (cut, seed)
            # History survived too: the oldest restorable point rebuilds exactly.
            oldest = u.status().oldest_restorable_seq
            if (kind != "rollback" or oldest <= 10) and _expected(kind, recs, u, oldest):
                with u.image_at_seq(oldest) as v:
                    assert v.pread(0, 32 * 1024) == _expected(kind, recs, u, oldest)
            # The recovered unit keeps working.
            more = [WriteRecord(d + 1, 3, b"\xee" * BS, T0 + 100 * S)]
            assert u.apply(more) == d + 1
            u.close()
            checked += 1
    assert checked == 2 * (total + 1)


CHILD = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, sys.argv[1])
    from firmware.link.frames import WriteRecord
    from firmware.remote import UnitStore
    def record(seq):
        r = random.Random(seq)
        nb = r.randint(1, 16)
        return WriteRecord(seq, r.randrange(0, 512 - nb + 1), r.randbytes(nb * 512), seq)
    rng = random.Random(int(sys.argv[3]))
    u = UnitStore(sys.argv[2], "unit-k", 256 * 1024, 512, segment_bytes=64 * 1024)
    seq = u.last_durable_seq()
    while True:
        n = rng.randint(1, 8)
        # Start a little behind the durable seq: a replay must be harmless.
        first = max(1, seq - rng.randint(0, 3) + 1)
        batch = [record(s) for s in range(first, seq + n + 1)]
        seq += n
        print(u.apply(batch), flush=True)
    """
)


def _child_record(seq: int) -> WriteRecord:
    r = random.Random(seq)
    nb = r.randint(1, 16)
    return WriteRecord(seq, r.randrange(0, 512 - nb + 1), r.randbytes(nb * 512), seq)


def test_sigkill_at_random_moments_then_reopen(tmp_path: Path) -> None:
    """Real files, a writer process killed mid-stream (three times): the reopened unit
    holds every acknowledged seq and its mirror equals the in-order application of
    exactly its durable seqs; its history rebuilds earlier points."""
    unit_dir = tmp_path / "k"
    size = 256 * 1024
    rng = random.Random(5)
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO), str(unit_dir), str(round_)],
            stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        acked = 0
        for _ in range(rng.randint(20, 80)):
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with UnitStore(str(unit_dir), "unit-k", size, 512) as u:
            d = u.last_durable_seq()
            assert d >= acked > 0
            assert u.last_applied_seq == d
            recs = [_child_record(s) for s in range(1, d + 1)]
            assert u.read_mirror(0, size) == model(recs, size)
            for seq in (d // 3, d - 1):
                with u.image_at_seq(seq) as v:
                    assert v.pread(0, size) == model(recs[:seq], size)


# --------------------------------------------------------------------------- retention


def test_retention_by_bytes_prunes_oldest_and_names_the_oldest_instant(tmp_path: Path) -> None:
    rng = random.Random(20)
    recs = make_records(rng, 120, 128)
    clock = FakeClock()
    with open_unit(tmp_path / "u", clock=clock, segment_bytes=8192,
                   retention=Retention(max_bytes=20_000)) as u:
        for b in batches(recs, rng):
            u.apply(b)
        st = u.status()
        assert 0 < st.history_bytes <= 20_000
        oldest = st.oldest_restorable_seq
        assert 0 < oldest < 120
        assert st.oldest_restorable_ns == recs[oldest - 1].ts
        with u.image_at_seq(oldest) as v:
            assert v.pread(0, 64 * 1024) == model(recs[:oldest], 64 * 1024)
        with pytest.raises(OutsideRetention, match=f"oldest restorable point, seq {oldest}") as ei:
            u.image_at_seq(oldest - 1)
        assert ei.value.oldest_seq == oldest
        with pytest.raises(OutsideRetention, match="oldest restorable instant") as ei2:
            u.image_at(recs[oldest - 1].ts - 1)
        assert ei2.value.oldest_ns == recs[oldest - 1].ts
        # Pruned history segments are deleted from disk, not only forgotten.
        on_disk = sum(p.stat().st_size for p in (tmp_path / "u" / "history").iterdir())
        assert on_disk <= 20_000 + 2 * 8192
        u.set_retention(Retention(max_bytes=5_000))
        assert u.status().history_bytes <= 5_000
    with open_unit(tmp_path / "u", segment_bytes=8192) as u:
        st = u.status()
        assert st.retention == Retention(max_bytes=5_000)
        with u.image_at_seq(st.oldest_restorable_seq) as v:
            assert v.pread(0, 64 * 1024) == model(recs[:st.oldest_restorable_seq], 64 * 1024)


def test_retention_by_age(tmp_path: Path) -> None:
    rng = random.Random(21)
    recs = make_records(rng, 100, 128, step=S)  # one write a second
    clock = FakeClock()
    with open_unit(tmp_path / "u", clock=clock, retention=Retention(max_age_s=30)) as u:
        u.apply(recs)
        assert u.status().oldest_restorable_seq == 0  # nothing is old yet at T0
        now = recs[-1].ts + 5 * S
        dropped = u.prune(now)
        # Every instant from now-30 s on stays restorable; older ones are gone.
        cutoff = now - 30 * S
        st = u.status()
        assert st.oldest_restorable_ns <= cutoff
        assert dropped == st.oldest_restorable_seq
        assert all(r.ts > cutoff for r in recs[st.oldest_restorable_seq:])
        with u.image_at(cutoff) as v:
            upto = max(r.seq for r in recs if r.ts <= cutoff)
            assert v.point.seq == upto
            assert v.pread(0, 64 * 1024) == model(recs[:upto], 64 * 1024)
        with pytest.raises(OutsideRetention):
            u.image_at(st.oldest_restorable_ns - 1)


def test_open_view_pins_history_against_pruning(tmp_path: Path) -> None:
    rng = random.Random(22)
    recs = make_records(rng, 60, 128)
    with open_unit(tmp_path / "u", segment_bytes=4096) as u:
        u.apply(recs[:30])
        view = u.image_at_seq(5)
        u.set_retention(Retention(max_bytes=0))
        u.apply(recs[30:])
        assert u.status().oldest_restorable_seq <= 5
        assert view.pread(0, 64 * 1024) == model(recs[:5], 64 * 1024)
        view.close()
        u.prune()
        assert u.status().history_records == 0
        assert u.status().oldest_restorable_seq == 60


# --------------------------------------------------------------------------- commit delay


def test_commit_delay_holds_writes_until_due(tmp_path: Path) -> None:
    rng = random.Random(30)
    recs = make_records(rng, 20, 128, step=S)
    clock = FakeClock(T0)
    with open_unit(tmp_path / "u", clock=clock, commit_delay_s=10) as u:
        assert u.apply(recs) == 20  # durable at once...
        st = u.status()
        assert (st.last_applied_seq, st.pending_records) == (0, 20)  # ...applied later
        assert st.lag_seqs == 20 and st.lag_seconds == pytest.approx(19.0)
        assert u.read_mirror(0, 64 * 1024) == bytes(64 * 1024)
        assert u.apply_due(T0 + 14 * S) == 5  # ts T0..T0+4 s are due
        assert u.last_applied_seq == 5
        assert u.read_mirror(0, 64 * 1024) == model(recs[:5], 64 * 1024)
    # Pending writes survive a restart and are not applied early.
    clock.now = T0 + 14 * S
    with open_unit(tmp_path / "u", clock=clock) as u:
        assert u.last_applied_seq == 5 and u.commit_delay_s == 10
        clock.now = T0 + 100 * S
        u.apply_due()
        assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024)


def test_drop_range_by_time_and_by_seq(tmp_path: Path) -> None:
    rng = random.Random(31)
    recs = make_records(rng, 30, 128, step=S)
    clock = FakeClock(T0)
    with open_unit(tmp_path / "u", clock=clock, commit_delay_s=60) as u:
        u.apply(recs)
        u.apply_due(T0 + 60 * S + 4 * S)  # seqs 1..5 applied
        assert u.last_applied_seq == 5
        with pytest.raises(AlreadyApplied, match="roll back"):
            u.drop_range(seq_from=4, seq_to=8)
        with pytest.raises(AlreadyApplied):
            u.drop_range(recs[3].ts, recs[8].ts)
        rep = u.drop_range(recs[10].ts, recs[12].ts)  # seqs 11..13
        assert (rep.count, rep.first_seq, rep.last_seq) == (3, 11, 13)
        assert rep.bytes == sum(len(r.data) for r in recs[10:13])
        rep2 = u.drop_range(seq_from=20, seq_to=21)
        assert (rep2.count, rep2.first_seq, rep2.last_seq) == (2, 20, 21)
        assert u.drop_range(seq_from=20, seq_to=21).count == 0  # already dropped
        st = u.status()
        assert st.equal_to_local is False
        assert st.dropped_records == 5
        assert [e["event"] for e in st.events] == ["drop", "drop"]
        assert st.pending_records == 25 - 5
    dropped = frozenset({11, 12, 13, 20, 21})
    # The drops are durable: after a restart they still never reach the mirror.
    with open_unit(tmp_path / "u", clock=clock) as u:
        u.apply_due(T0 + 1000 * S)
        assert u.last_applied_seq == 30
        assert u.read_mirror(0, 64 * 1024) == model(recs, 64 * 1024, skip=dropped)
        # The timeline skips them: the image at a dropped seq is the one before it.
        with u.image_at_seq(12) as v:
            assert v.pread(0, 64 * 1024) == model(recs[:10], 64 * 1024)
        assert u.status().equal_to_local is False


def test_drop_range_needs_exactly_one_kind_of_range(tmp_path: Path) -> None:
    with open_unit(tmp_path / "u") as u:
        with pytest.raises(StoreUsageError):
            u.drop_range()
        with pytest.raises(StoreUsageError):
            u.drop_range(1, 2, seq_from=1)


# --------------------------------------------------------------------------- resync


def test_resync_keeps_last_consistent_image_restorable(tmp_path: Path) -> None:
    rng = random.Random(40)
    size = 4 * CHUNK_SIZE
    blocks = size // BS
    recs = make_records(rng, 30, blocks)
    target = bytearray(rng.randbytes(size))
    target[CHUNK_SIZE:2 * CHUNK_SIZE] = model(recs, size)[CHUNK_SIZE:2 * CHUNK_SIZE]
    u = open_unit(tmp_path / "u", size=size)
    u.apply(recs)
    before = model(recs, size)
    digests = u.chunk_digests()
    assert set(digests) == set(range(4))
    assert digests[2] == blake3(before[2 * CHUNK_SIZE:3 * CHUNK_SIZE]).digest()
    start = u.begin_resync()
    assert start == 30
    # Only chunks whose digests differ are sent; chunk 1 already matches.
    want = {c: blake3(bytes(target[c * CHUNK_SIZE:(c + 1) * CHUNK_SIZE])).digest()
            for c in range(4)}
    differing = [c for c in range(4) if digests[c] != want[c]]
    assert differing == [0, 2, 3]
    assert u.write_chunk(0, bytes(target[:CHUNK_SIZE]))
    assert not u.write_chunk(1, bytes(target[CHUNK_SIZE:2 * CHUNK_SIZE]))
    resync = u.status().resync
    assert resync is not None and resync["start_seq"] == 30
    # Writes arriving meanwhile are journaled, not applied.
    u.apply([WriteRecord(31, 0, b"\x11" * BS, T0)])
    assert u.last_applied_seq == 30
    with u.image_at_seq(30) as v:
        assert v.pread(0, size) == before
    u.close()  # interrupted: the marker and the before-images survive a restart
    u = open_unit(tmp_path / "u", size=size)
    assert u.resync_active
    with u.image_at_seq(30) as v, u.image_at(T0 + 10**6 * S) as w:
        assert v.pread(0, size) == before
        assert w.point.seq == 30
    for c in (2, 3):
        u.write_chunk(c, bytes(target[c * CHUNK_SIZE:(c + 1) * CHUNK_SIZE]))
    assert u.chunk_digests() == want
    u.resync_complete(40)
    st = u.status()
    assert (st.last_applied_seq, st.last_durable_seq, st.resync) == (40, 40, None)
    assert u.read_mirror(0, size) == bytes(target)
    with pytest.raises(NotRestorable, match="inside a resync"):
        u.image_at_seq(35)
    with u.image_at_seq(30) as v:
        assert v.pread(0, size) == before
    with u.image_at_seq(40) as v:
        assert v.pread(0, size) == bytes(target)
    # The stream continues after the resync point.
    with pytest.raises(SeqGap):
        u.apply([WriteRecord(42, 0, b"\x22" * BS, T0)])
    u.apply([WriteRecord(41, 0, b"\x22" * BS, T0 + 50 * S)])
    target[:BS] = b"\x22" * BS
    assert u.read_mirror(0, size) == bytes(target)
    u.close()


# --------------------------------------------------------------------------- virtual units


def test_two_units_in_one_store_are_independent(tmp_path: Path) -> None:
    rng = random.Random(50)
    ra, rb = make_records(rng, 20, 128), make_records(rng, 15, 64)
    with RemoteStore(tmp_path / "root") as store:
        a = store.open_unit("site-a", 64 * 1024, 512)
        b = store.open_unit("site_b.2", 32 * 1024, 512)
        a.apply(ra)
        b.apply(rb)
        assert a.read_mirror(0, 64 * 1024) == model(ra, 64 * 1024)
        assert b.read_mirror(0, 32 * 1024) == model(rb, 32 * 1024)
        st = store.status()
        assert (st["site-a"].last_applied_seq, st["site_b.2"].last_applied_seq) == (20, 15)
        with pytest.raises(UnitBusy, match="already open in this process"):
            store.open_unit("site-a", 64 * 1024, 512)
        a.close()
        a2 = store.open_unit("site-a", 64 * 1024, 512)  # released on close
        assert a2.last_durable_seq() == 20
        assert store.unit_ids() == ["site-a", "site_b.2"]
    # A second store in the same process still cannot take an open unit (flock).
    s1, s2 = RemoteStore(tmp_path / "root"), RemoteStore(tmp_path / "root")
    u1 = s1.open_unit("site-a", 64 * 1024, 512)
    with pytest.raises(UnitBusy, match="in use by another process"):
        s2.open_unit("site-a", 64 * 1024, 512)
    u1.close()
    s2.open_unit("site-a", 64 * 1024, 512).close()


def test_geometry_mismatch_is_refused(tmp_path: Path) -> None:
    with RemoteStore(tmp_path) as store:
        store.open_unit("u", 64 * 1024, 512).close()
        with pytest.raises(GeometryMismatch, match="volume size 65536 and block size 512"):
            store.open_unit("u", 128 * 1024, 512)
        with pytest.raises(GeometryMismatch, match="block size"):
            store.open_unit("u", 64 * 1024, 4096)
        with pytest.raises(GeometryMismatch, match="multiple"):
            store.open_unit("v", 1000, 512)
        # The refused opens released the lock.
        store.open_unit("u", 64 * 1024, 512).close()


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "a/b", "../x", "a..b", "x" * 65, "ünit", "a b", "a\x00b", "/abs"]
)
def test_bad_unit_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with RemoteStore(tmp_path / "root") as store:
        with pytest.raises(InvalidUnitId, match="invalid unit id"):
            store.open_unit(bad, 64 * 1024, 512)
    assert os.listdir(tmp_path / "root") == []


@pytest.mark.parametrize("good", ["a", "A-1", "unit.example_2", "x" * 64, ".hidden"])
def test_good_unit_ids(tmp_path: Path, good: str) -> None:
    with RemoteStore(tmp_path) as store:
        store.open_unit(good, 64 * 1024, 512).close()
        assert store.unit_ids() == [good]


LOCKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from firmware.remote import RemoteStore
    store = RemoteStore(sys.argv[2])
    unit = store.open_unit("shared", 65536, 512)
    print("locked", flush=True)
    sys.stdin.readline()
    unit.close()
    """
)


def test_unit_lock_holds_across_processes(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(REPO), str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        with RemoteStore(tmp_path) as store:
            with pytest.raises(UnitBusy, match=f"another process \\(pid {proc.pid}\\)"):
                store.open_unit("shared", 65536, 512)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
            store.open_unit("shared", 65536, 512).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
