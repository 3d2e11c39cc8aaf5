"""Failover figures for `make bench` (`run(workdir) -> dict`), real local and remote
processes on loopback (docs/failover.md):

1. Promote to writable: from `role.promote` to the first write, flushed, through the
   promoted unit's NBD export.
2. Switchover time with an empty queue and with 64 MiB queued, and what it moved.
3. Failback bytes moved / bytes of the union of changed chunks, with 1 % and 10 % of a
   64 MiB volume's chunks changed on each side.
"""

from __future__ import annotations

import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
CHUNK = 64 * 1024
VOLUME = 64 * MiB


def _support() -> Any:
    # The process harness lives with the tests; the bench runs from the repository.
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    import tests.support.replication as rep

    return rep


def _write(port: int, export: str, chunks: list[int], fill: int) -> None:
    from firmware.nbd.client import NbdClient

    with NbdClient("127.0.0.1", port, export) as c:
        for ch in chunks:
            c.write(ch * CHUNK, bytes([fill]) * CHUNK)
        c.flush()


def bench_promote(workdir: Path) -> dict[str, Any]:
    rep = _support()
    with rep.Pair(workdir, size="64M", buffer_size="32M") as pair:
        _write(pair.local.port, "mirrorunit", list(range(16)), 1)
        rep.wait_caught_up(pair.local, pair.remote, pair.unit_id)
        pair.local.stop(signal.SIGKILL)
        t0 = time.perf_counter()
        pair.remote.call("role.promote", unit=pair.unit_id)
        e = pair.remote.call("remote.nbd_start", unit=pair.unit_id, address="127.0.0.1:0")
        _write(int(e["address"].rsplit(":", 1)[1]), e["export"], [0], 2)
        return {"promote_to_writable_s": round(time.perf_counter() - t0, 3)}


def bench_switchover(workdir: Path, queued: int) -> dict[str, Any]:
    rep = _support()
    with rep.Pair(workdir, size="128M", buffer_size="160M") as pair:
        local = pair.local
        _write(local.port, "mirrorunit", [0], 1)
        rep.wait_caught_up(local, pair.remote, pair.unit_id)
        if queued:
            local.call("link.pause", name="remote")
            _write(local.port, "mirrorunit", list(range(queued // CHUNK)), 3)
            local.call("link.resume", name="remote")
        rep.wait_for(lambda: rep.peer_status(local)["state"] == "connected", 60, "the link")
        t0 = time.perf_counter()
        r = local.call("link.switchover", name="remote")
        wall = time.perf_counter() - t0
        back = local.call("link.switchover", name="remote")
        return {"queued_bytes": queued, "switch_s": round(wall, 3),
                "drain_s": r["drain_seconds"], "bytes_moved": r["bytes_moved"],
                "switch_back_s": back["seconds"], "switch_back_bytes": back["bytes_moved"]}


def bench_failback(workdir: Path, fraction: float, seed: int = 1) -> dict[str, Any]:
    rep = _support()
    rng = random.Random(seed)
    chunks = VOLUME // CHUNK
    here = rng.sample(range(chunks), int(chunks * fraction))
    there = rng.sample(range(chunks), int(chunks * fraction))
    with rep.Pair(workdir, size="64M", buffer_size="32M") as pair:
        local, remote, unit = pair.local, pair.remote, pair.unit_id
        _write(local.port, "mirrorunit", list(range(0, chunks, 7)), 1)
        rep.wait_caught_up(local, remote, unit)
        local.call("link.pause", name="remote")
        _write(local.port, "mirrorunit", here, 5)
        local.stop(signal.SIGKILL)
        remote.call("role.promote", unit=unit)
        e = remote.call("remote.nbd_start", unit=unit, address="127.0.0.1:0")
        _write(int(e["address"].rsplit(":", 1)[1]), e["export"], there, 6)
        local.start()
        rep.wait_for(lambda: rep.peer_status(local)["fenced"], 60, "the local to be fenced")
        t0 = time.perf_counter()
        r = local.call("link.failback", name="remote")
        union = len(set(here) | set(there))
        return {"changed_fraction_each_side": fraction, "union_chunks": union,
                "chunks_moved": r["chunks_moved"], "bytes_moved": r["bytes_moved"],
                "bytes_over_union": round(r["bytes_moved"] / (union * CHUNK), 4),
                "seconds": round(time.perf_counter() - t0, 3)}


def run(workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        out["promote"] = bench_promote(Path(d))
    for name, queued in (("switchover_empty", 0), ("switchover_64MiB", 64 * MiB)):
        with tempfile.TemporaryDirectory(dir=workdir) as d:
            out[name] = bench_switchover(Path(d), queued)
    for name, fraction in (("failback_1pct", 0.01), ("failback_10pct", 0.10)):
        with tempfile.TemporaryDirectory(dir=workdir) as d:
            out[name] = bench_failback(Path(d), fraction)
    for k, v in out.items():
        print(f"failover {k}: {v}", flush=True)
    return out
