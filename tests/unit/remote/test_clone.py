"""The test-failover clone: copy-on-write over a point in time, bounded scratch."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from firmware.blockdev import MediumError, NotReady
from firmware.remote.clone import CloneDevice
from tests.support.remote_store import make_records, model, open_unit

SIZE = 64 * 1024


def test_writes_stay_in_the_clone_and_go_with_it(tmp_path: Path) -> None:
    recs = make_records(random.Random(1), 6, 128)
    u = open_unit(tmp_path / "u")
    u.apply(recs[:4])
    clone = CloneDevice(u.image_at_seq(4), tmp_path / "s.scratch", 2 * u.block_size)
    point = model(recs[:4], SIZE)
    clone.pwrite(10, b"\xee" * 100)  # part of one block: merged with the point's data
    want = bytearray(point)
    want[10:110] = b"\xee" * 100
    assert clone.pread(0, SIZE) == bytes(want)
    u.apply(recs[4:])  # replication goes on; the clone keeps its point
    assert clone.pread(0, SIZE) == bytes(want)
    assert u.read_mirror(0, SIZE) == model(recs, SIZE)
    with pytest.raises(MediumError, match="scratch space"):
        clone.pwrite(4 * u.block_size, b"\x01" * 2 * u.block_size)
    assert clone.scratch_used == u.block_size
    clone.close()
    assert not (tmp_path / "s.scratch").exists()
    with pytest.raises(NotReady):
        clone.pread(0, 512)
    assert u.read_mirror(0, SIZE) == model(recs, SIZE)
    u.close()
