"""State-block detection from the write stream alone, its persistence (a torn file is
rebuilt, never trusted), and `export_without` (undo a seq range, with conflicts)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from firmware.cbq.format import BARRIER_FLUSH, barrier_flags
from firmware.link.frames import WriteRecord, barrier_record
from firmware.record import IntegrityError
from firmware.remote.stateblocks import (
    STATE_BLOCKS_NAME,
    SketchSettings,
    StateBlockSketch,
)
from firmware.remote.unit import UnitStore

BS = 512
SIZE = 64 << 20
MS = 1_000_000
T0 = 1_700_000_000 * 10**9
FLUSH = barrier_flags(BARRIER_FLUSH, 1, 3)
#: The synthetic "file system": a superblock at block 2 (offset 1024, 2 blocks), a
#: journal commit block 8 blocks long at block 40_000.
SUPER = (2, 2)
COMMIT = (40_000, 8)


def _workload(u: UnitStore, transactions: int, seed: int = 1) -> None:
    """Each transaction: bulk data (fresh random places, 8..128 blocks a write), the
    commit block, a flush, the superblock, a flush."""
    rng = random.Random(seed)
    seq = u.last_durable_seq()
    cum = 0
    t = T0

    def write(lbn: int, n: int) -> WriteRecord:
        nonlocal seq, cum, t
        seq += 1
        cum += n
        t += MS
        return WriteRecord(seq, lbn, rng.randbytes(n * BS), t)

    for _ in range(transactions):
        batch = [write(rng.randrange(100, SIZE // BS - 128), rng.choice((8, 32, 128)))
                 for _ in range(rng.randrange(5, 30))]
        batch.append(write(*COMMIT))
        batch.append(barrier_record(seq, t, FLUSH, 1, cum))
        batch.append(write(*SUPER))
        batch.append(barrier_record(seq, t, FLUSH, 1, cum))
        u.apply(batch)


def test_the_blocks_rewritten_at_each_barrier_are_the_top_entries(tmp_path: Path) -> None:
    with UnitStore(tmp_path / "u", "unit-a", SIZE, BS, clock=lambda: T0) as u:
        _workload(u, 60)
        snap = u.state_blocks(limit=8)
    assert snap["barriers"] == 120
    assert snap["tracked"] <= snap["capacity"] == 256
    top = snap["state_blocks"]
    found = {(r["block"], r["nblocks"]) for r in top[:2]}
    assert found == {SUPER, COMMIT}, top[:4]
    for r in top[:2]:
        assert r["rewrites"] >= 50
        # (a bulk write may land on one of them once)
        assert r["barrier_affinity"] >= 0.95
        assert r["neighbour_ratio"] >= 10
        assert r["per_barrier"] == pytest.approx(0.5, abs=0.05)
    sup = next(r for r in top if r["block"] == SUPER[0])
    assert sup["offset"] == 1024
    # The bulk data (written once each, a few blocks twice) ranks far below.
    assert all(r["count"] <= 10 for r in top[2:])


def test_the_sketch_is_kept_with_the_store_and_a_torn_file_is_rebuilt(tmp_path: Path) -> None:
    d = tmp_path / "u"
    with UnitStore(d, "unit-a", SIZE, BS, clock=lambda: T0) as u:
        _workload(u, 20)
        before = u.state_blocks()
    with UnitStore(d, "unit-a", SIZE, BS, clock=lambda: T0) as u:
        assert u.state_blocks() == before
    raw = bytearray((d / STATE_BLOCKS_NAME).read_bytes())
    with pytest.raises(IntegrityError):
        StateBlockSketch.decode(bytes(raw[:-7]), SketchSettings(), "x")
    raw[5000] ^= 0xFF
    with pytest.raises(IntegrityError, match="CRC"):
        StateBlockSketch.decode(bytes(raw), SketchSettings(), "x")
    (d / STATE_BLOCKS_NAME).write_bytes(bytes(raw))
    with UnitStore(d, "unit-a", SIZE, BS, clock=lambda: T0) as u:
        fresh = u.state_blocks()
        assert (fresh["writes"], fresh["barriers"], fresh["state_blocks"]) == (0, 0, [])
        _workload(u, 20, seed=2)
        assert {(r["block"], r["nblocks"]) for r in u.state_blocks()["state_blocks"][:2]} \
            == {SUPER, COMMIT}
    # Sized otherwise: not taken either.
    with UnitStore(d, "unit-a", SIZE, BS, clock=lambda: T0,
                   state_blocks=SketchSettings(capacity=16)) as u:
        assert u.state_blocks()["writes"] == 0


def test_memory_stays_bounded_and_decay_forgets() -> None:
    sk = StateBlockSketch(SketchSettings(capacity=32, width=1 << 10, half_life=4096))
    for i in range(5000):
        sk.observe_write(7, 1, i)
        sk.observe_barrier()
    assert sk.top(1)[0].block == 7
    for i in range(20_000):
        sk.observe_write(1000 + i * 3, 3, i)
    assert len(sk._table) <= 32
    assert sk.top(1, min_rewrites=0)[0].count < 5000 / 4


def _w(seq: int, lbn: int, n: int, fill: int) -> WriteRecord:
    return WriteRecord(seq, lbn, bytes([fill]) * (n * BS), T0 + seq * MS)


def test_export_without_a_range_restores_what_no_later_write_covers(tmp_path: Path) -> None:
    size = 1 << 20
    with UnitStore(tmp_path / "u", "unit-a", size, BS, clock=lambda: T0) as u:
        # A: seqs 1-5 write blocks 0..9; B: 6-10 write 100.., one of them over A's block 3;
        # C: 11-15 write 200.., one of them over B's block 104.
        u.apply([_w(s, (s - 1) * 2, 2, 0xA0 + s) for s in range(1, 6)])
        u.apply([_w(6, 3, 1, 0xB6)] + [_w(s, 100 + (s - 7) * 2, 2, 0xB0 + s)
                                       for s in range(7, 11)])
        u.apply([_w(11, 104, 1, 0xCB)] + [_w(s, 200 + s, 1, 0xC0 + s) for s in range(12, 16)])
        out = tmp_path / "without.img"
        r = u.export_without(out, 6, 10)
        want = tmp_path / "want.img"
        u.export(want, seq=5)
    img = bytearray(want.read_bytes())  # A
    img[104 * BS:105 * BS] = bytes([0xCB]) * BS  # C over B's block: kept, a conflict
    for s in range(12, 16):
        img[(200 + s) * BS:(201 + s) * BS] = bytes([0xC0 + s]) * BS
    assert out.read_bytes() == bytes(img)
    assert (r.seq, r.first_seq, r.last_seq, r.writes_removed) == (15, 6, 10, 5)
    assert r.blocks_restored == 8
    assert r.conflicts == [{"block": 104, "offset": 104 * BS, "removed_seqs": [9],
                            "later_seqs": [11]}]


def test_find_point_prefers_points_after_a_state_block_update(tmp_path: Path) -> None:
    from firmware.remote.findpoint import bisect_step, find_point

    size = 4 << 20
    rng = random.Random(4)
    with UnitStore(tmp_path / "u", "unit-a", size, BS, clock=lambda: T0) as u:
        seq = cum = 0
        for txn in range(40):
            batch = []
            for _ in range(3):
                seq += 1
                cum += 8
                # From transaction 30 on a "ransomware" writes 0xEE from block 5000 on.
                enc = txn >= 30 and _ == 0
                lbn = 5000 + 8 * txn if enc else rng.randrange(100, 4000)
                fill = b"\xee" if enc else bytes([rng.randrange(1, 256)])
                batch.append(WriteRecord(seq, lbn, fill * (8 * BS), T0 + seq * MS))
            if txn % 3 == 0:  # only every third flush follows an update of block 2
                seq += 1
                cum += 2
                batch.append(WriteRecord(seq, 2, rng.randbytes(2 * BS), T0 + seq * MS))
            batch.append(barrier_record(seq, T0 + seq * MS, FLUSH, 1, cum))
            u.apply(batch)
        pts = u.points()
        assert len(pts) == 40
        preferred = u.points_after_state_update(pts)
        assert preferred == {p.number for i, p in enumerate(pts) if i % 3 == 0}

        def check(img: Path) -> bool:
            with open(img, "rb") as f:
                f.seek(5000 * BS)
                return b"\xee" not in f.read(400 * BS)

        plain = find_point(u, pts, tmp_path / "a.img", check)
        pref = find_point(u, pts, tmp_path / "b.img", check, preferred=preferred)
    # The same answer, the last point before the burst, either way.
    assert plain.point is not None and pref.point is not None
    assert plain.point.number == pref.point.number == pts[29].number
    assert pref.preferred == len(preferred)
    # After the newest point, the bisection tried mostly preferred points.
    tried = [t.number for t in pref.tries[1:]]
    assert sum(n in preferred for n in tried) > len(tried) // 2, tried
    print("tries:", [t.number for t in plain.tries], tried)
    assert len(pref.tries) <= 2 * len(plain.tries)
    # A step always lies strictly inside the open interval, in its middle half.
    for lo, hi in ((-1, 1), (-1, 39), (3, 5), (10, 30)):
        for prefs in ([], [lo + 1], [0, 9, 18, 27, 36], list(range(40))):
            m = bisect_step(lo, hi, prefs)
            assert lo < m < hi
            assert abs(m - (lo + hi) // 2) <= (hi - lo) // 4
