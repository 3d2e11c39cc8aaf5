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

from firmware.link.frames import WriteRecord
from firmware.remote import (
    CHUNK_SIZE,
    AlreadyApplied,
    GeometryMismatch,
    InvalidRecord,
    InvalidUnitId,
    JournalCorruption,
    NotRestorable,
    OutsideRetention,
    RemoteStore,
    Retention,
    SeqGap,
    StoreUsageError,
    UnitBusy,
    UnitStore,
)

REPO = Path(__file__).resolve().parent.parent
BS = 512
S = 1_000_000_000  # ns per second
T0 = 1_700_000_000 * S


# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_records(rng: random.Random, n: int, blocks: int, first_seq: int = 1,
                 t0: int = T0, step: int = S, max_blocks: int = 4) -> list[WriteRecord]:
    out = []
    for i in range(n):
        nb = rng.randint(1, max_blocks)
        lbn = rng.randrange(0, blocks - nb + 1)
        data = rng.randbytes(nb * BS)
        out.append(WriteRecord(seq=first_seq + i, lbn=lbn, data=data, ts=t0 + i * step))
    return out


def model(records: list[WriteRecord], size: int, base: bytes | None = None,
          skip: frozenset[int] = frozenset()) -> bytes:
    """The image after applying `records` in order (except seqs in `skip`)."""
    img = bytearray(size if base is None else base)
    for r in records:
        if r.seq not in skip:
            img[r.lbn * BS:r.lbn * BS + len(r.data)] = r.data
    return bytes(img)


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


def open_unit(path: Path | str, size: int = 64 * 1024, **kw: object) -> UnitStore:
    return UnitStore(str(path), "unit-a", size, BS, **kw)  # type: ignore[arg-type]


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


WORKLOADS = {
    "plain": _workload_plain,
    "delay-drop": _workload_delay_drop,
    "rollback": _workload_rollback,
}


def _expected(kind: str, recs: list[WriteRecord], u: UnitStore, upto: int) -> bytes:
    size = 32 * 1024
    st = u.status()
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
            assert u.read_mirror(0, 32 * 1024) == applied_expect, (cut, seed)
            # ...and the rest follows once due, with nothing lost or torn.
            u.set_commit_delay(0)
            u.apply_due(T0 + 1000 * S)
            assert u.read_mirror(0, 32 * 1024) == _expected(kind, recs, u, d), (cut, seed)
            # History survived too: the oldest restorable point rebuilds exactly.
            oldest = u.status().oldest_restorable_seq
            if kind != "rollback" or oldest <= 10:
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
