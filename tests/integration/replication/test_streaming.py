"""Loopback replication: a real local unit and a real remote unit on 127.0.0.1, a
fault proxy between them, SIGKILL of either side while a writer keeps writing
through NBD; after healing the remote equals the local byte for byte and every
seq reached the remote store once, in order.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from firmware.control.status import read_local_status
from firmware.nbd.client import NbdClient
from tests.support.faultproxy import ConnectionFaults
from tests.support.replication import (
    MakePair,
    Pair,
    Writer,
    assert_arrived_once_in_order,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)


@pytest.fixture
def pair(make_pair: MakePair) -> Pair:
    return make_pair(buffer_size="48M")


def test_faults_and_sigkill_heal_to_an_identical_image(pair: Pair, tmp_path: Path) -> None:
    local, remote, proxy = pair.local, pair.remote, pair.proxy
    rng = random.Random(5)
    writer = Writer(local, 32 << 20, seed=11, interval=0.004)
    writer.start()
    wait_for(lambda: writer.writes > 100, 30, "first writes")
    steps = ["drop", "reset", "delay", "bandwidth", "truncate", "kill-remote", "kill-local",
             "reset", "kill-remote"]
    for step in steps:
        time.sleep(rng.uniform(0.3, 1.2))  # a random moment while the writer writes
        if step == "drop":
            assert proxy.drop_all() >= 0
        elif step == "reset":
            proxy.reset_all()
        elif step == "delay":
            proxy.delay = 0.05
        elif step == "bandwidth":
            proxy.set_bandwidth(512 * 1024)
        elif step == "truncate":
            proxy.delay = 0.0
            proxy.set_bandwidth(None)
            # The next connection is cut in the middle of a frame.
            proxy.fault_next(ConnectionFaults(truncate_c2s_after=rng.randrange(3000, 60000)))
            proxy.reset_all()
        elif step == "kill-remote":
            remote.stop(signal.SIGKILL)
            time.sleep(rng.uniform(0.2, 1.0))
            remote.start()
        elif step == "kill-local":
            writer.pause.set()
            local.stop(signal.SIGKILL)
            local.start()
            writer.pause.clear()
    time.sleep(1.0)
    writer.stop_event.set()
    writer.join(10)
    assert writer.writes > 300
    last = wait_caught_up(local, remote, pair.unit_id)
    assert_same_image(local, remote, pair.unit_id, tmp_path)
    lines = assert_arrived_once_in_order(remote, pair.unit_id, last)
    assert lines > 1
    status = peer_status(local)
    assert status["state"] == "connected"
    assert status["connects"] >= 1
    assert "truncate-c2s" in proxy.fired
    assert "lost" in local.log.read_text()
    # A run this calm never overflows a 48 MiB queue: the writes were streamed.
    assert status["resyncs_done"] == 0


def test_link_pause_resume_and_status(pair: Pair, tmp_path: Path) -> None:
    local, remote = pair.local, pair.remote
    local.call("link.pause", name="remote")
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(0, b"\x5a" * 65536)
        c.flush()
    s = peer_status(local)
    assert s["state"] == "paused"
    # the whole answer of a running unit with NBD and a link has the documented shape
    whole = read_local_status(local.call("status"))
    assert whole["link"]["peers"]["remote"]["state"] == "paused"
    assert whole["nbd"] is not None and whole["nbd"]["connections"] == 0
    assert s["lag_seqs"] >= 1 and s["lag_bytes"] >= 65536
    assert s["blocks_sent"] == s["blocks_acked"] == 0
    time.sleep(0.5)
    assert peer_status(local)["lag_seconds"] > 0.3
    assert remote.unit(pair.unit_id).get("last_applied_seq", 0) == 0
    local.call("link.resume", name="remote")
    wait_caught_up(local, remote, pair.unit_id)
    assert peer_status(local)["lag_seconds"] == 0.0
    # The buffer's statistics in the volume's own unit: 64 KiB is 128 blocks of 512.
    wait_for(lambda: peer_status(local)["blocks_acked"] == 128, 30, "blocks acknowledged")
    assert peer_status(local)["blocks_sent"] >= 128
    assert_same_image(local, remote, pair.unit_id, tmp_path)
    # Verify compares without moving data: equal now, then one chunk differs on
    # the remote side only after a rollback of the last write.
    local.call("link.verify", name="remote")
    v = wait_for(lambda: peer_status(local)["last_verify"], 60, "verify")
    assert v["differing_chunks"] == []
    assert v["chunks_compared"] == 512
