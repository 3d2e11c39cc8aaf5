"""Replay of the recorded command stream: onto a file and onto an NBD export it ends
equal to the export at the end point, flushing at every barrier; at recorded pace the
spacing of the commands is kept."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from firmware.cbq.format import BARRIER_FLUSH, barrier_flags
from firmware.link.frames import WriteRecord, barrier_record
from firmware.nbd.server import NbdServer
from firmware.remote.errors import StoreUsageError
from firmware.remote.replay import replay
from firmware.remote.unit import UnitStore
from tests.support.memdev import MemoryDevice

BS = 512
SIZE = 1 << 20
MS = 1_000_000
T0 = 1_700_000_000 * 10**9
FLUSH = barrier_flags(BARRIER_FLUSH, 1, 3)


def _unit(tmp_path: Path) -> tuple[UnitStore, list[WriteRecord]]:
    """60 writes, 20 ms apart, many over a hot region, a barrier after every fifth."""
    rng = random.Random(3)
    u = UnitStore(tmp_path / "u", "unit-a", SIZE, BS, clock=lambda: T0)
    recs: list[WriteRecord] = []
    cum = 0
    for seq in range(1, 61):
        n = rng.choice((1, 2, 8))
        lbn = rng.randrange(0, 32) if rng.random() < 0.5 else rng.randrange(0, SIZE // BS - n)
        cum += n
        batch = [WriteRecord(seq, lbn, rng.randbytes(n * BS), T0 + seq * 20 * MS)]
        if seq % 5 == 0:
            batch.append(barrier_record(seq, T0 + seq * 20 * MS + MS, FLUSH, 0, cum))
        u.apply(batch)
        recs.extend(batch)
    return u, recs


def test_replay_to_a_file_ends_equal_to_the_export(tmp_path: Path) -> None:
    u, _ = _unit(tmp_path)
    with u:
        for lo, hi in ((0, 60), (10, 35), (12, 13), (35, 35)):
            out, want = tmp_path / "replayed.img", tmp_path / "want.img"
            out.unlink(missing_ok=True)
            r = replay(u, str(out), from_seq=lo, to_seq=hi)
            u.export(want, seq=hi)
            assert out.read_bytes() == want.read_bytes(), (lo, hi)
            assert (r.start_seq, r.end_seq, r.writes) == (lo, hi, hi - lo)
            assert r.barriers == hi // 5 - lo // 5
        # The commands are the recorded ones: offsets, times, barriers after their write.
        _, _, cmds = u.replay_plan(10, 20)
        assert [(c.seq, c.barrier) for c in cmds] == [
            (s, False) for s in range(11, 16)] + [(15, True)] + [
            (s, False) for s in range(16, 21)] + [(20, True)]
        with pytest.raises(StoreUsageError, match="before the start"):
            u.replay_plan(20, 10)
        with pytest.raises(StoreUsageError, match="inside the unit's own store"):
            replay(u, str(Path(u.directory) / "mirror.img"), from_seq=1, to_seq=2)


def test_replay_to_an_nbd_target_flushes_at_barriers(tmp_path: Path) -> None:
    u, _ = _unit(tmp_path)
    dev = MemoryDevice(SIZE)
    with u, NbdServer(dev, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        r = replay(u, f"nbd://127.0.0.1:{server.port}/mirrorunit", from_seq=5, to_seq=50)
        want = tmp_path / "want.img"
        u.export(want, seq=50)
        assert dev.data[0:SIZE] == want.read_bytes()
        # One flush after the start image, one per barrier, one at the end.
        assert r.barriers == 9 and dev.flushes == 9 + 2


def test_recorded_pace_keeps_the_spacing(tmp_path: Path) -> None:
    u, _ = _unit(tmp_path)
    with u:
        r = replay(u, str(tmp_path / "paced.img"), from_seq=20, to_seq=40, pace="recorded")
        # 20 writes 20 ms apart: about 0.4 s, none more than 10 ms late.
        assert r.seconds >= 0.38
        assert r.max_lag_ms < 10, r
        fast = replay(u, str(tmp_path / "fast.img"), from_seq=20, to_seq=40)
        assert fast.seconds < r.seconds
