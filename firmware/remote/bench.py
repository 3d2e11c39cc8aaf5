"""Time-machine figures for `make bench` (`run(workdir) -> dict`), docs/time-machine.md:

1. Capture overhead on the local write path: 4 KiB writes through a Volume with a host
   flush every 8 writes, with the flushes recorded as barriers (`flush_for` with the
   host's command) vs plain flushes, rounds alternated, medians; in write-through mode
   (where a flush has nothing left to sync and a recorded one appends its barrier for
   the next write's group commit: `barriers_deferred` counts them) and in write-back
   mode (where the flush's own sync carries the barrier).
2. find-point on a 1 GiB unit with 1,000 consistent points and a check that takes 1 s:
   the time, the tries, and the blocks moved per try.
3. Replay (max pace) of the whole range to a file vs an export of the same image.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
BS = 512


def bench_capture(workdir: Path, writes: int = 2000, rounds: int = 5,
                  cache: str = "write-through") -> dict[str, Any]:
    from firmware.blockdev import FrontEnd, HostCommand, flush_for
    from firmware.cbq import CircularBufferQueue, create
    from firmware.storage import FileStorage
    from firmware.volume import CacheMode, Volume

    payload = os.urandom(4096)
    command = HostCommand(FrontEnd.NBD, 3)
    times: dict[str, list[float]] = {"plain": [], "barriers": []}
    deferred = 0
    for r in range(rounds):
        for kind in (("plain", "barriers") if r % 2 == 0 else ("barriers", "plain")):
            d = workdir / f"{cache}-{kind}-{r}"
            d.mkdir()
            disk = FileStorage(d / "disk", 64 * MiB, create=True)
            buf = FileStorage(d / "cbq", 64 * MiB, create=True)
            create(buf, volume_blocks=(64 * MiB) // BS, consumers=())
            vol = Volume(disk, CircularBufferQueue(buf), cache_mode=CacheMode(cache))
            t0 = time.perf_counter()
            for i in range(writes):
                vol.pwrite((i * 4096) % (60 * MiB), payload)
                if i % 8 == 7:
                    if kind == "barriers":
                        flush_for(vol, command)
                    else:
                        vol.flush()
            times[kind].append(time.perf_counter() - t0)
            deferred += vol.counters["barriers_deferred"]
            vol.close()
    plain, barriers = statistics.median(times["plain"]), statistics.median(times["barriers"])
    return {"cache_mode": cache, "writes": writes, "flush_every": 8, "plain_s": round(plain, 4),
            "barriers_s": round(barriers, 4),
            "overhead": round(barriers / plain - 1, 4),
            "barriers_deferred": deferred // rounds}


def bench_find_point(workdir: Path, points: int = 1000, check_s: float = 1.0,
                     size: int = 1 << 30) -> dict[str, Any]:
    from firmware.link.frames import WriteRecord, barrier_record
    from firmware.remote.findpoint import find_point
    from firmware.remote.unit import UnitStore

    u = UnitStore(str(workdir / "unit"), "bench", size, BS)
    rng = random.Random(1)
    seq, ts = 0, time.time_ns()
    blocks = size // BS
    for p in range(points):
        # Block 0 holds the point's number: the check reads it (an application's own
        # check reads its data the same way).
        seq, ts = seq + 1, ts + 1000
        batch = [WriteRecord(seq=seq, lbn=0, data=p.to_bytes(8, "big") * (BS // 8), ts=ts)]
        for _ in range(3):
            seq, ts = seq + 1, ts + 1000
            batch.append(WriteRecord(seq=seq, lbn=rng.randrange(8, blocks - 8),
                                     data=rng.randbytes(8 * BS), ts=ts))
        ts += 1000
        batch.append(barrier_record(seq, ts, 1))  # a barrier carries its last write's seq
        u.apply(batch)
    u.apply_due()
    good_until = int(points * 0.7)  # the check accepts the points up to here
    pts = u.points()

    def check(image: Path) -> bool:
        time.sleep(check_s)  # what an application's check costs
        with open(image, "rb") as f:
            return int.from_bytes(f.read(8), "big") <= good_until

    try:
        r = find_point(u, pts, workdir / "find.img", check)
    finally:
        u.close()
    limit = pts[good_until].seq
    assert r.point is not None and r.point.seq == limit
    return {"volume_bytes": size, "points": len(pts), "check_s": check_s,
            "seconds": r.seconds, "tries": len(r.tries),
            "first_try_blocks": r.tries[0].blocks_written,
            "later_try_blocks_max": max(t.blocks_written for t in r.tries[1:])}


def bench_replay(workdir: Path, size: int = 256 * MiB, writes: int = 2048) -> dict[str, Any]:
    from firmware.link.frames import WriteRecord, barrier_record
    from firmware.remote.replay import replay
    from firmware.remote.unit import UnitStore

    u = UnitStore(str(workdir / "unit"), "bench", size, BS)
    rng = random.Random(2)
    seq, ts = 0, time.time_ns()
    for i in range(writes):
        seq, ts = seq + 1, ts + 1000
        batch = [WriteRecord(seq=seq, lbn=rng.randrange(0, size // BS - 128),
                             data=rng.randbytes(64 * 1024), ts=ts)]
        if i % 16 == 15:
            ts += 1000
            batch.append(barrier_record(seq, ts, 1))
        u.apply(batch)
    u.apply_due()
    t0 = time.perf_counter()
    u.export(str(workdir / "export.img"), seq=seq)
    export_s = time.perf_counter() - t0
    target = workdir / "replay.img"
    t0 = time.perf_counter()
    rep = replay(u, str(target), from_seq=0, to_seq=seq)
    replay_s = time.perf_counter() - t0
    same = (workdir / "export.img").read_bytes() == target.read_bytes()
    u.close()
    return {"writes": writes, "write_bytes": writes * 64 * 1024, "export_s": round(export_s, 3),
            "replay_s": round(replay_s, 3), "replay_over_export": round(replay_s / export_s, 2),
            "same_image": same, "replayed_writes": rep.writes}


def run(workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (("capture_write_through", bench_capture),
                     ("capture_write_back", lambda d: bench_capture(d, cache="write-back")),
                     ("find_point", bench_find_point), ("replay", bench_replay)):
        d = workdir / name
        d.mkdir()
        out[name] = fn(d)
        print(f"time machine {name}: {out[name]}", flush=True)
    return out
