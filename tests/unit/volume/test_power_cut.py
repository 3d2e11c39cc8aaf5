"""Power cuts at every write boundary and at random points, with torn sectors."""

from __future__ import annotations

import random

import pytest

from firmware.volume import CacheMode
from tests.support.crashkit import Geometry, check_recovery, random_workload, run_workload

SCRIPT = [
    ("write", 0, 1, 1, False), ("write", 1, 3, 2, False), ("flush",),
    ("write", 0, 2, 3, True), ("write", 60, 16, 4, False), ("drain",),
    ("write", 2, 8, 5, False), ("flush",), ("write", 100, 16, 6, False),
    ("write", 0, 16, 7, False), ("drain",), ("write", 20, 16, 8, True),
    ("write", 40, 16, 9, False), ("write", 5, 1, 10, False), ("flush",), ("drain",),
    ("write", 70, 16, 11, False), ("write", 90, 16, 12, False), ("write", 3, 2, 13, True),
    ("drain",), ("write", 110, 16, 14, False), ("write", 8, 16, 15, False), ("flush",),
]


@pytest.mark.parametrize("mode", [CacheMode.WRITE_BACK, CacheMode.WRITE_THROUGH])
def test_cut_at_every_write_boundary(mode: CacheMode) -> None:
    geo = Geometry()
    run, _, _, total = run_workload(SCRIPT, geo, mode, cut_after=None)
    assert not run.cut and total > 20
    recovered = set()
    for k in range(total + 1):
        run, cbq_st, mirror_st, _ = run_workload(SCRIPT, geo, mode, cut_after=k)
        for tear_seed in range(3):
            recovered.add(check_recovery(run, cbq_st, mirror_st, geo, mode,
                                         random.Random(k * 10 + tear_seed)))
    # The sweep really crossed the workload: cuts landed before and after most writes.
    assert len(recovered) > len([op for op in SCRIPT if op[0] == "write"]) // 2


@pytest.mark.parametrize("mode", [CacheMode.WRITE_BACK, CacheMode.WRITE_THROUGH])
def test_cut_at_every_write_boundary_with_barriers(mode: CacheMode) -> None:
    """Flushes and FUA writes leave barrier records: a torn one is detected, a
    recovered one is whole and in order, and none reaches the mirror.  In write-through
    a flush barrier is acknowledged before its own sync (the writes it covers are
    durable already): every acknowledged write still survives, no recovered barrier lies
    past the recovered writes, and only a last point no durable write follows may go."""
    geo = Geometry()
    run, _, _, total = run_workload(SCRIPT, geo, mode, cut_after=None, barriers=True)
    assert not run.cut and len(run.barriers) == 7
    # Write-through really takes the unsynced path for each of its 4 flushes.
    assert run.deferred == (4 if mode is CacheMode.WRITE_THROUGH else 0)
    with_barriers = 0
    for k in range(total + 1):
        run, cbq_st, mirror_st, _ = run_workload(SCRIPT, geo, mode, cut_after=k,
                                                 barriers=True)
        for tear_seed in range(3):
            check_recovery(run, cbq_st, mirror_st, geo, mode, random.Random(k * 10 + tear_seed))
        with_barriers += run.barriers_done > 0
    assert with_barriers > total // 2


def test_cut_at_random_points_of_random_workloads() -> None:
    geo = Geometry()
    rng = random.Random(20261124)
    points = wrapped = degraded = 0
    for i in range(2000):
        ops = random_workload(rng, geo, n_ops=rng.randrange(5, 40))
        mode = CacheMode.WRITE_BACK if i % 2 else CacheMode.WRITE_THROUGH
        cut = rng.randrange(0, 160)
        run, cbq_st, mirror_st, ops_done = run_workload(ops, geo, mode, cut_after=cut)
        check_recovery(run, cbq_st, mirror_st, geo, mode, random.Random(i))
        points += 1
        wrapped += ops_done > 60
        degraded += run.degraded
    assert points == 2000
    assert wrapped > 100
    # Most runs stay in normal mode, where recovery must equal an exact replay.
    assert 20 < degraded < 1000, degraded
