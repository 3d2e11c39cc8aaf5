"""`link verify` of a large, mostly sparse volume between real local and remote
processes: holes are never read or hashed on either side, so 8 GiB verify in
seconds reading a few MiB; a chunk with data next to holes still compares right;
`link status` reports the verify's progress while it runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from firmware.control.status import ResyncProgress, check_shape
from firmware.nbd.client import NbdClient
from firmware.remote.unit import MIRROR_NAME
from tests.support.replication import MakePair, Pair, peer_status, wait_caught_up, wait_for

CHUNK = 64 * 1024
GiB = 1 << 30
VOLUME = 8 * GiB
CHUNKS = VOLUME // CHUNK


def _read_bytes(pid: int) -> int:
    """Bytes the process passed through read-type syscalls (rchar: page-cache hits
    count, unlike read_bytes), so a hole that was read at all shows."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        if key == "rchar":
            return int(value)
    raise AssertionError("no rchar in /proc/PID/io")


@pytest.fixture
def pair(make_pair: MakePair) -> Pair:
    return make_pair(size="8G", sparse=True)


def _verify(pair: Pair, timeout: float) -> dict[str, object]:
    before = peer_status(pair.local)["last_verify"]
    pair.local.call("link.verify", name="remote")
    return dict(wait_for(lambda: (v := peer_status(pair.local)["last_verify"]) != before and v,
                         timeout, "the verify to finish", step=0.05))


def test_sparse_8g_verify_is_fast_reads_little_and_still_finds_a_difference(
        pair: Pair) -> None:
    local, remote = pair.local, pair.remote
    # Data next to holes: a few bytes at the end of one chunk, a block in another, a
    # chunk at the far end of the volume.
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(3 * CHUNK - 512, b"\x5a" * 512)
        c.write(1000 * CHUNK + 4096, b"\xa5" * 4096)
        c.write(VOLUME - CHUNK, b"\x3c" * CHUNK)
        c.flush()
    wait_caught_up(local, remote, pair.unit_id)
    assert local.proc is not None and remote.proc is not None
    r0 = (_read_bytes(local.proc.pid), _read_bytes(remote.proc.pid))
    t0 = time.monotonic()
    v = _verify(pair, timeout=60)
    secs = time.monotonic() - t0
    read = (_read_bytes(local.proc.pid) - r0[0], _read_bytes(remote.proc.pid) - r0[1])
    assert v["chunks_compared"] == CHUNKS
    assert v["differing_chunks"] == []
    # Reading and hashing 8 GiB takes well over this on either side; the holes cost
    # nothing, the digests on the wire are 32 bytes a chunk (4 MiB in all).
    assert secs < 30, secs
    assert read[0] < 64 << 20 and read[1] < 64 << 20, read
    # A difference is still found, in a data chunk next to holes and in a chunk
    # that is a hole on one side only: change the remote's mirror behind its back.
    remote.stop()
    mirror = remote.store / pair.unit_id / MIRROR_NAME
    with open(mirror, "r+b") as f:
        f.seek(3 * CHUNK - 100)
        f.write(b"\x00")
        f.seek(5000 * CHUNK + 77)
        f.write(b"\x01")
    remote.start()
    wait_for(lambda: peer_status(local)["state"] == "connected", 60, "the link back")
    v = _verify(pair, timeout=60)
    assert v["differing_chunks"] == [2, 5000]


def test_link_status_reports_progress_while_a_verify_runs(pair: Pair) -> None:
    local, remote = pair.local, pair.remote
    wait_caught_up(local, remote, pair.unit_id)
    # 131072 digests are 4 MiB coming back: at 1 MiB/s the verify runs for seconds.
    pair.proxy.set_bandwidth(1 << 20)
    pair.proxy.drop_all()
    wait_for(lambda: peer_status(local)["state"] == "connected", 30, "the link back")
    local.call("link.verify", name="remote")
    seen: list[ResyncProgress] = []

    def midway() -> bool:
        r = peer_status(local)["resync"]
        if r is not None:
            seen.append(check_shape(r, ResyncProgress, "resync"))
        return bool(seen) and 0 < seen[-1]["chunks_done"] < seen[-1]["chunks"]

    wait_for(midway, 60, "a verify half way", step=0.05)
    r = seen[-1]
    assert r["kind"] == "verify" and r["chunks"] == CHUNKS and r["chunk_bytes"] == CHUNK
    assert r["chunks_per_s"] > 0 and r["mib_per_s"] > 0
    assert r["eta_s"] is not None and r["eta_s"] > 0
    assert r["chunks_differing"] == 0
    pair.proxy.set_bandwidth(None)
    v = wait_for(lambda: peer_status(local)["last_verify"], 120, "the verify to finish")
    assert v["chunks_compared"] == CHUNKS
    assert peer_status(local)["resync"] is None
    done = [s["chunks_done"] for s in seen]
    assert done == sorted(done)
