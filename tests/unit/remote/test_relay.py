"""The relay of a unit store (firmware/remote/relay.py), in process: B's store feeds a
`RelaySource`, a second store C takes what it hands out the way the link would (records
applied and acknowledged, a checksum resync of the chunks it plans)."""

from __future__ import annotations

import random
from pathlib import Path

from firmware.cbq.format import BARRIER_FLUSH, barrier_flags
from firmware.link.frames import WriteRecord, barrier_record
from firmware.remote import UnitStore
from firmware.remote.format import CHUNK_SIZE
from firmware.remote.relay import RelaySource
from tests.support.remote_store import BS, T0, make_records, open_unit

SIZE = 16 * CHUNK_SIZE


def _b(path: Path, **kw: object) -> UnitStore:
    b = open_unit(path, SIZE, **kw)
    b.relay_enable("c")
    return b


def _drive(b: UnitStore, c: UnitStore, source: RelaySource, batch: int = 64 * 1024,
           rounds: int = 10_000) -> dict[str, int]:
    """What the link does between them, until nothing is left to send."""
    moved = {"records": 0, "chunks": 0, "resyncs": 0}
    for _ in range(rounds):
        plan = source.resync_plan(c.last_durable_seq())
        if plan is not None:
            c.begin_resync()
            theirs = c.chunk_digests(plan.chunks)
            ours = source.chunk_digests(plan.chunks)
            differing = [k for k in plan.chunks if theirs[k] != ours[k]]
            for k in differing:
                c.write_chunk(k, source.read_chunk(k))
            c.resync_complete(plan.seq)
            source.resync_finished(plan, differing, plan.seq)
            source.rewind_to(plan.seq)
            moved["chunks"] += len(differing)
            moved["resyncs"] += 1
            continue
        records = source.next_batch(batch)
        if not records:
            return moved
        source.ack(c.apply(records))
        moved["records"] += sum(1 for r in records if not r.barrier)
    raise AssertionError("the relay never ran dry")


def _image(u: UnitStore) -> bytes:
    return u.read_mirror(0, SIZE)


def _with_barriers(records: list[WriteRecord], every: int) -> list[WriteRecord]:
    out: list[WriteRecord] = []
    for r in records:
        out.append(r)
        if r.seq % every == 0:
            out.append(barrier_record(r.seq, r.ts, barrier_flags(BARRIER_FLUSH), 1))
    return out


def test_records_and_barriers_reach_the_next_remote_in_order(tmp_path: Path) -> None:
    rng = random.Random(1)
    with _b(tmp_path / "b") as b, open_unit(tmp_path / "c", SIZE) as c:
        source = RelaySource(b, CHUNK_SIZE)
        records = make_records(rng, 200, SIZE // BS)
        for i in range(0, 200, 25):
            b.apply(_with_barriers(records[i:i + 25], 10))
            _drive(b, c, source, batch=8 * 1024)
        assert _image(c) == _image(b)
        assert c.last_durable_seq() == 200
        assert [p.seq for p in c.points()] == [p.seq for p in b.points()] == list(
            range(10, 201, 10))


def test_a_barrier_that_comes_after_its_write_was_relayed_follows_alone(tmp_path: Path) -> None:
    with _b(tmp_path / "b") as b, open_unit(tmp_path / "c", SIZE) as c:
        source = RelaySource(b, CHUNK_SIZE)
        b.apply([WriteRecord(seq=1, lbn=0, data=b"x" * BS, ts=T0)])
        _drive(b, c, source)
        b.apply([barrier_record(1, T0, barrier_flags(BARRIER_FLUSH), 3)])
        [r] = source.next_batch(4096)
        assert r.barrier and r.seq == 1 and r.connection == 3
        c.apply([r])
        assert [p.seq for p in c.points()] == [1]


def test_held_records_beyond_the_bound_resync_only_their_chunks(tmp_path: Path) -> None:
    rng = random.Random(2)
    with _b(tmp_path / "b", relay_hold_bytes=3 * CHUNK_SIZE) as b, \
            open_unit(tmp_path / "c", SIZE) as c:
        source = RelaySource(b, CHUNK_SIZE)
        b.apply([WriteRecord(seq=1, lbn=0, data=b"a" * BS, ts=T0)])
        _drive(b, c, source)
        # C away: B applies ten chunk-sized writes, more than it may hold.
        chunks = rng.sample(range(1, 16), 10)
        b.apply([WriteRecord(seq=2 + i, lbn=k * CHUNK_SIZE // BS, data=rng.randbytes(CHUNK_SIZE),
                             ts=T0 + i) for i, k in enumerate(chunks)])
        status = b.relay_call(lambda h: (len(h.held), len(h.dirty), h.let_go))
        assert status[0] <= 3 and status[2] == 10 - status[0] and status[1] == status[2]
        moved = _drive(b, c, source)
        assert _image(c) == _image(b) and c.last_durable_seq() == 11
        # Only the chunks of the records let go crossed as chunks; the rest streamed.
        assert moved["resyncs"] == 1 and moved["chunks"] == status[2]
        assert moved["records"] == status[0]


def test_a_restart_of_the_relay_keeps_its_cursor_and_its_records(tmp_path: Path) -> None:
    rng = random.Random(3)
    records = make_records(rng, 300, SIZE // BS, max_blocks=64)
    with open_unit(tmp_path / "c", SIZE) as c:
        with _b(tmp_path / "b", segment_bytes=64 * 1024) as b:
            source = RelaySource(b, CHUNK_SIZE)
            b.apply(records[:50])
            _drive(b, c, source)
            b.apply(records[50:])  # C does not get these before B stops
            b.checkpoint()  # journals trimmed: the relay's records must stay
        assert c.last_durable_seq() == 50
        with open_unit(tmp_path / "b", SIZE, segment_bytes=64 * 1024) as b:
            source = RelaySource(b, CHUNK_SIZE)
            assert b.relay_call(lambda h: (h.acked, len(h.held))) == (50, 250)
            moved = _drive(b, c, source)
            assert moved == {"records": 250, "chunks": 0, "resyncs": 0}
            assert _image(c) == _image(b)
            b.checkpoint()
            assert b.relay_call(lambda h: len(h.held)) == 0


def test_the_relays_own_resync_and_a_next_remote_that_lost_data(tmp_path: Path) -> None:
    with _b(tmp_path / "b") as b, open_unit(tmp_path / "c", SIZE) as c:
        source = RelaySource(b, CHUNK_SIZE)
        b.apply([WriteRecord(seq=1, lbn=0, data=b"a" * BS, ts=T0)])
        _drive(b, c, source)
        # B is resynced from its local: a chunk written in place, no record for it.
        b.begin_resync()
        assert source.next_batch(4096) == [] and source.resync_plan(1) is None
        b.write_chunk(5, b"r" * CHUNK_SIZE)
        b.resync_complete(7)
        moved = _drive(b, c, source)
        assert moved["chunks"] == 1 and _image(c) == _image(b) and c.last_durable_seq() == 7
    # A next remote behind what it acknowledged (its store was replaced): all is compared.
    with open_unit(tmp_path / "b", SIZE) as b, open_unit(tmp_path / "c2", SIZE) as c2:
        source = RelaySource(b, CHUNK_SIZE)
        plan = source.resync_plan(0)
        assert plan is not None and len(plan.chunks) == SIZE // CHUNK_SIZE
        source.rewind_to(plan.seq)
        c2.begin_resync()
        for k in plan.chunks:
            c2.write_chunk(k, source.read_chunk(k))
        c2.resync_complete(plan.seq)
        source.resync_finished(plan, list(plan.chunks), plan.seq)
        assert _image(c2) == _image(b) and source.resync_plan(plan.seq) is None
