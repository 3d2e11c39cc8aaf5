"""An outage long enough to push the CBQ through compact into overflow, healed by a
checksum resync that sends about the changed bytes; point-in-time exports of the
remote equal the local image as of those instants."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware.nbd.client import NbdClient
from tests.support import REPO as ROOT
from tests.support.replication import (
    MakePair,
    Pair,
    assert_arrived_once_in_order,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)

CHUNK = 65536


@pytest.fixture
def pair(make_pair: MakePair) -> Pair:
    return make_pair(size="64M", buffer_size="4M")


def test_overflow_outage_heals_by_checksum_resync_sending_only_changed_chunks(
        pair: Pair, tmp_path: Path) -> None:
    local, remote, proxy = pair.local, pair.remote, pair.proxy
    rng = random.Random(3)
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        for off in range(0, 16 << 20, 1 << 20):
            c.write(off, rng.randbytes(1 << 20))
        c.flush()
    wait_caught_up(local, remote, pair.unit_id)

    # Outage: the remote is unreachable.
    proxy.refuse = True
    proxy.reset_all()
    wait_for(lambda: peer_status(local)["state"] == "retrying", 30, "link down")
    # 200 chunks rewritten again and again, each write flushed: data records first,
    # then compact ones (one aligned commit group each) until the ring is full.
    changed = set(rng.sample(range((64 << 20) // CHUNK), 200))
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        for _ in range(7):
            for chunk in sorted(changed):
                c.write(chunk * CHUNK, rng.randbytes(CHUNK), fua=True)
    cbq = local.call("status")["cbq"]
    changes = [t["change"] for t in cbq["transitions"]]
    assert "normal->compact" in changes and "compact->overflow" in changes, changes
    assert cbq["consumers"]["remote"]["needs_resync"]
    assert cbq["dirty_chunks"] >= len(changed) * 0.5

    before = peer_status(local)["wire_bytes_sent"]
    proxy.refuse = False
    last = wait_caught_up(local, remote, pair.unit_id, timeout=120)
    p = peer_status(local)
    assert p["resyncs_done"] == 1
    r = p["last_resync"]
    changed_bytes = len(changed) * CHUNK
    ratio = r["bytes_sent"] / changed_bytes
    wire = p["wire_bytes_sent"] - before
    wire_ratio = wire / changed_bytes
    print(f"\nresync: {len(changed)} changed chunks, {r['differing']} sent, "
          f"{r['chunks_compared']} compared; data ratio {ratio:.3f}, "
          f"wire ratio {wire_ratio:.3f} (digests, framing, TLS included)")
    # Only chunks that changed are sent; the dirty map may name a few more (writes
    # queued before the overflow), but their digests match and nothing moves.
    assert r["differing"] == len(changed)
    assert ratio == pytest.approx(1.0)
    assert wire_ratio <= 1.05
    assert_same_image(local, remote, pair.unit_id, tmp_path)
    assert_arrived_once_in_order(remote, pair.unit_id, last)
    st = remote.unit(pair.unit_id)
    assert st["resync"] is None and st["equal_to_local"]
    assert any(e["event"] == "resync-complete" for e in st["events"])


def test_point_in_time_exports_equal_the_local_image_then(pair: Pair, tmp_path: Path) -> None:
    local, remote = pair.local, pair.remote
    rng = random.Random(9)
    points: list[tuple[int, int, bytes]] = []
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        for _round in range(4):
            for _ in range(20):
                off = rng.randrange(0, (64 << 20) - 65536, 4096)
                c.write(off, rng.randbytes(rng.choice((4096, 16384, 65536))))
            c.flush()
            seq = wait_caught_up(local, remote, pair.unit_id)
            points.append((time.time_ns(), seq, local.disk.read_bytes()))
            time.sleep(0.02)  # instants strictly between the rounds' writes
    env = dict(os.environ)
    for i, (t_ns, seq, image) in enumerate(points):
        out = tmp_path / f"at-{i}.img"
        subprocess.run([sys.executable, "-m", "firmware", "remote", "export", "--control",
                        str(remote.control), "--unit", pair.unit_id, "--at", f"ns:{t_ns}",
                        "--output", str(out)], check=True, cwd=ROOT, env=env,
                       capture_output=True)
        assert out.read_bytes() == image, f"export at instant {i} differs"
        out.unlink()
        exported = remote.call("remote.export", unit=pair.unit_id,
                               output=str(tmp_path / "s.img"), seq=seq)
        assert exported["seq"] == seq
        assert (tmp_path / "s.img").read_bytes() == image
    # With the daemon gone, the same export works on the store directory.
    pair.local.stop()
    remote.stop()
    out = tmp_path / "offline.img"
    subprocess.run([sys.executable, "-m", "firmware", "remote", "export", "--control",
                    str(remote.control), "--store", str(remote.store), "--unit", pair.unit_id,
                    "--seq", str(points[1][1]), "--output", str(out)], check=True, cwd=ROOT,
                   capture_output=True)
    assert out.read_bytes() == points[1][2]
