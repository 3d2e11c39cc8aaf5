"""Failover on loopback: a site loss ends with the remote promoted and the old local
fenced when it returns; a forced promote while the local writes is a split brain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware.control import ControlError
from firmware.nbd.client import NbdClient, NbdClientError
from tests.support import REPO as ROOT
from tests.support.replication import (
    Pair,
    RemoteProc,
    Writer,
    assert_arrived_once_in_order,
    assert_same_image,
    peer_status,
    wait_caught_up,
    wait_for,
)

SIZE = 64 * 1024


def _nbd_write_read(port: int, export: str, offset: int, data: bytes) -> bytes:
    with NbdClient("127.0.0.1", port, export) as c:
        c.write(offset, data)
        c.flush()
        return bytes(c.read(offset, len(data)))


def _role(remote: RemoteProc, unit_id: str) -> dict[str, Any]:
    result: dict[str, Any] = remote.call("role.status", unit=unit_id)["units"][unit_id]
    return result


@pytest.fixture
def small_pair(make_pair: Any) -> Any:
    return make_pair(size="8M", buffer_size="8M")


def test_site_loss_promote_the_remote_and_the_old_local_returns_fenced(
        small_pair: Pair, tmp_path: Path) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    writer = Writer(local, 8 << 20, seed=3, interval=0.002)
    writer.start()
    wait_for(lambda: writer.writes > 60 and remote.unit(unit_id).get("last_applied_seq", 0) > 20,
             30, "writes streaming to the remote")
    writer.pause.set()
    local.stop(signal.SIGKILL)  # the site is lost mid-stream
    writer.stop_event.set()
    writer.join(10)
    u = remote.unit(unit_id)
    assert u["lineage"]["role"] == "secondary"

    # The operator promotes the remote at its last applied seq, with the CLI.
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "role", "promote", unit_id, "--control",
         str(remote.control)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    role = _role(remote, unit_id)
    seq = role["promoted"]["seq"]
    assert seq == u["last_applied_seq"] and f"at seq {seq}" in out.stdout
    assert role["role"] == "primary" and not role["promoted"]["forced"]
    durable = remote.unit(unit_id)["last_durable_seq"]
    arrivals = remote.arrivals(unit_id)

    # The new primary's host writes a known pattern through NBD.
    export = remote.call("remote.nbd_start", unit=unit_id, address="127.0.0.1:0")
    assert export["writable"]
    port = int(export["address"].rsplit(":", 1)[1])
    pattern = bytes(range(256)) * 256  # 64 KiB
    assert _nbd_write_read(port, export["export"], 1 << 20, pattern) == pattern
    assert _role(remote, unit_id)["promoted"]["dirty_chunks"] == 1

    # The old site returns: its local is fenced, says why, and still serves its host.
    local.start()
    fenced = wait_for(lambda: peer_status(local)["fenced"], 30, "the old local to be fenced")
    assert f"promoted at seq {seq} on " in fenced
    assert f"this copy is stale since seq {seq}" in fenced
    assert peer_status(local)["state"] == "fenced"
    assert local.call("link.status")["fenced"] == fenced
    before = peer_status(local)["last_seq"]
    host_data = b"\x5a" * 8192
    assert _nbd_write_read(local.port, "mirrorunit", 0, host_data) == host_data
    local.call("volume.flush")
    assert peer_status(local)["last_seq"] > before  # queued, not sent
    assert "FENCED" in local.log.read_text()
    wait_for(lambda: peer_status(local)["connects"] >= 2, 30, "a second refused attempt")

    # Nothing of the old local's reached the promoted unit.
    assert remote.unit(unit_id)["last_durable_seq"] == durable
    assert remote.arrivals(unit_id) == arrivals
    assert remote.call("remote.read", unit=unit_id, offset=1 << 20,
                       length=len(pattern)) == pattern
    role = _role(remote, unit_id)
    assert role["fenced_peer"] and role["peer"]["refused"] == "fenced"
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "role", "status", unit_id, "--control",
         str(remote.control)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"unit {unit_id}: primary" in out.stdout
    assert f"promoted at seq {seq}; since then host writes: 1, chunks changed: 1" in out.stdout
    assert "at its last HELLO: fenced" in out.stdout


def test_forced_promote_while_the_local_writes_is_a_split_brain(
        small_pair: Pair, tmp_path: Path) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    writer = Writer(local, 8 << 20, seed=4, interval=0.004)
    writer.start()
    try:
        wait_for(lambda: remote.unit(unit_id).get("last_applied_seq", 0) > 20, 30,
                 "writes streaming to the remote")
        with pytest.raises(ControlError, match="connected from"):
            remote.call("role.promote", unit=unit_id)
        r = remote.call("role.promote", unit=unit_id, force=True)
        assert r["forced"] and r["connected_from"]
        durable = remote.unit(unit_id)["last_durable_seq"]
        arrivals = remote.arrivals(unit_id)
        split = wait_for(lambda: peer_status(local)["split_brain"], 30,
                         "the local to see the split brain")
        assert f"split brain after seq {r['fork_seq']}" in split
        assert peer_status(local)["state"] == "split-brain"
        wait_for(lambda: _role(remote, unit_id)["split_brain"], 10,
                 "the remote to report the split brain")
    finally:
        writer.stop_event.set()
        writer.join(10)
    assert writer.writes > 0 and peer_status(local)["last_seq"] > r["fork_seq"]
    assert remote.unit(unit_id)["last_durable_seq"] == durable
    assert remote.arrivals(unit_id) == arrivals
    assert "SPLIT BRAIN" in local.log.read_text()
    assert "split-brain" in remote.log.read_text()

    # The remote's host writes too; then the operator resolves by hand on the side that
    # gives up its writes (here the remote): they are kept, and the two converge.
    export = remote.call("remote.nbd_start", unit=unit_id, address="127.0.0.1:0")
    port = int(export["address"].rsplit(":", 1)[1])
    theirs = b"\x6b" * 65536
    _nbd_write_read(port, export["export"], 2 << 20, theirs)
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "role", "resolve", unit_id, "--give-up-here",
         "--control", str(remote.control)], capture_output=True, text=True, cwd=ROOT,
        timeout=60)
    assert out.returncode == 0, out.stderr
    assert "gave up 1 host writes in 1 chunks" in out.stdout
    role = _role(remote, unit_id)
    assert role["role"] == "secondary" and role["promoted"] is None
    wait_caught_up(local, remote, unit_id)
    assert_same_image(local, remote, unit_id, tmp_path)
    assert peer_status(local)["split_brain"] is None and peer_status(local)["resyncs_done"] >= 1
    listing = next(Path(remote.workdir).rglob("conflict-*.json"))
    assert json.loads(listing.read_text())["chunks"] == [[32, 32]]
    img = listing.with_suffix(".img").read_bytes()
    assert img[2 << 20:(2 << 20) + len(theirs)] == theirs


def test_a_split_brain_policy_resolves_a_side_that_wrote_nothing(make_pair: Any,
                                                                 tmp_path: Path) -> None:
    pair = make_pair(size="8M", buffer_size="8M",
                     remote_extra=("--split-brain-policy", "discard-zero-changes"))
    local, remote, unit_id = pair.local, pair.remote, pair.unit_id
    writer = Writer(local, 8 << 20, seed=5, interval=0.004)
    writer.start()
    try:
        wait_for(lambda: remote.unit(unit_id).get("last_applied_seq", 0) > 20, 30,
                 "writes streaming to the remote")
        # Forced while the local writes on; the new primary's host writes nothing.
        r = remote.call("role.promote", unit=unit_id, force=True)
        wait_for(lambda: remote.unit(unit_id)["lineage"]["role"] == "secondary", 30,
                 "the policy to make the remote give up")
    finally:
        writer.stop_event.set()
        writer.join(10)
    assert r["forced"] and writer.writes > 0
    wait_caught_up(local, remote, unit_id)
    assert_same_image(local, remote, unit_id, tmp_path)
    assert _role(remote, unit_id)["role"] == "secondary"
    assert "split brain resolved by policy discard-zero-changes" in remote.log.read_text()


def test_a_forced_promote_cuts_off_an_idle_local_which_returns_fenced(
        small_pair: Pair) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    data = b"\x11" * 65536
    assert _nbd_write_read(local.port, "mirrorunit", 0, data) == data
    last = wait_caught_up(local, remote, unit_id)
    r = remote.call("role.promote", unit=unit_id, force=True)
    assert r["forced"] and r["seq"] == last
    # The local wrote nothing since the fork: it is the stale side, not a split brain.
    fenced = wait_for(lambda: peer_status(local)["fenced"], 30, "the idle local to be fenced")
    assert fenced.startswith(f"force-promoted at seq {last} on ")
    assert f"this copy is stale since seq {last}" in fenced
    assert peer_status(local)["connects"] >= 2  # the session was cut, and refused after
    assert _role(remote, unit_id)["peer"]["refused"] == "fenced"


def _unreplicated(local: Any, offset: int, data: bytes) -> None:
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(offset, data)
        c.flush()


def test_failback_moves_only_what_changed_and_keeps_the_old_locals_writes(
        small_pair: Pair, tmp_path: Path) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    chunk = 64 * 1024
    base = bytes(range(251)) * (8 * chunk // 251 + 1)
    _unreplicated(local, 0, base[:8 * chunk])  # chunks 0..7, replicated
    wait_caught_up(local, remote, unit_id)
    # The link goes down; the local's host writes on, then the site is lost.
    local.call("link.pause", name="remote")
    mine_a = b"\xa1" * (chunk + 4096)  # chunk 32 and the first 4 KiB of chunk 33
    _unreplicated(local, 32 * chunk, mine_a)
    local.stop(signal.SIGKILL)

    r = remote.call("role.promote", unit=unit_id, seq=None, force=False)
    export = remote.call("remote.nbd_start", unit=unit_id, address="127.0.0.1:0")
    port = int(export["address"].rsplit(":", 1)[1])
    theirs_b = b"\xb2" * chunk  # chunk 16, only on the new primary
    theirs_c = b"\xc3" * 8192  # inside chunk 33, where the old local also wrote
    _nbd_write_read(port, export["export"], 16 * chunk, theirs_b)
    _nbd_write_read(port, export["export"], 33 * chunk + 16384, theirs_c)
    remote_image = b"".join(remote.call("remote.read", unit=unit_id, offset=o, length=1 << 19)
                            for o in range(0, 8 << 20, 1 << 19))

    # The old site returns fenced; its host writes once more (still refused upstream).
    local.start()
    wait_for(lambda: peer_status(local)["fenced"], 30, "the old local to be fenced")
    mine_d = b"\xd4" * 8192  # chunk 48
    _unreplicated(local, 48 * chunk + 4096, mine_d)

    out = subprocess.run(
        [sys.executable, "-m", "firmware", "role", "failback", "--control",
         str(local.control), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr + local.log.read_text()[-3000:]
    rep = json.loads(out.stdout)
    union = {16, 33} | {32, 33, 48}
    assert rep["chunks_changed_remote"] == 2 and rep["chunks_changed_here"] == 3
    assert rep["chunks_compared"] == len(union)
    assert rep["chunks_moved"] == len(union)
    assert rep["bytes_moved"] / (len(union) * chunk) <= 1.02

    # Both copies hold the promoted remote's image, byte for byte.
    assert local.disk.read_bytes() == remote_image
    assert_same_image(local, remote, unit_id, tmp_path)

    # The conflict image holds exactly the old local's unreplicated writes.
    conflict = rep["conflict"]
    extents = json.loads(Path(conflict["extents_file"]).read_text())
    bs = extents["block_size"]
    assert [tuple(e) for e in extents["extents"]] == [
        (32 * chunk // bs, len(mine_a) // bs), ((48 * chunk + 4096) // bs, len(mine_d) // bs)]
    img = Path(conflict["image"]).read_bytes()
    assert img[32 * chunk:32 * chunk + len(mine_a)] == mine_a
    assert img[48 * chunk + 4096:48 * chunk + 4096 + len(mine_d)] == mine_d
    assert conflict["bytes"] == len(mine_a) + len(mine_d)

    # The remote follows the old local again: its writable export is gone, the local's
    # new writes reach it, in order.
    role = _role(remote, unit_id)
    assert role["role"] == "secondary" and role["promoted"] is None
    assert role["generation"] == rep["generation"]
    with pytest.raises((OSError, ConnectionError)):
        _nbd_write_read(port, export["export"], 0, b"\0" * 4096)
    wait_for(lambda: peer_status(local)["state"] == "connected", 30, "the link to resume")
    assert peer_status(local)["fenced"] is None
    after = b"\xe5" * 4096
    _unreplicated(local, 5 * chunk, after)
    last = wait_caught_up(local, remote, unit_id)
    assert last == rep["seq"] + 1
    assert remote.call("remote.read", unit=unit_id, offset=5 * chunk, length=4096) == after
    assert_same_image(local, remote, unit_id, tmp_path)
    assert r["seq"] > 0


def _switchover(local: Any) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "role", "switchover", "--control",
         str(local.control), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr + local.log.read_text()[-3000:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_switchover_round_trip_moves_the_queue_then_only_the_remotes_changes(
        small_pair: Pair, tmp_path: Path) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    chunk = 64 * 1024
    _unreplicated(local, 0, b"\x31" * 4 * chunk)
    wait_caught_up(local, remote, unit_id)
    # A queue to drain: writes made while the link was paused.
    local.call("link.pause", name="remote")
    _unreplicated(local, 8 * chunk, b"\x32" * 2 * chunk)
    queued = peer_status(local)["lag_bytes"]
    local.call("link.resume", name="remote")
    wait_for(lambda: peer_status(local)["state"] == "connected", 30, "the link")
    there = _switchover(local)
    # what the switchover moved is what was still queued when it began (the link may
    # have sent some of it before): never more, and no resync
    assert there["direction"] == "to-remote" and 0 <= there["bytes_moved"] <= queued
    last = there["seq"]
    assert remote.call("remote.read", unit=unit_id, offset=8 * chunk,
                       length=2 * chunk) == b"\x32" * 2 * chunk
    role = _role(remote, unit_id)
    assert role["role"] == "primary" and role["promoted"]["seq"] == last
    assert not role["promoted"]["forced"]
    assert remote.unit(unit_id)["last_applied_seq"] == last
    # The old primary is the standby: its host is kept out, the size still visible.
    with pytest.raises(NbdClientError, match="NBD error 108"):  # ESHUTDOWN: not ready
        _nbd_write_read(local.port, "mirrorunit", 0, b"\0" * 4096)
    assert peer_status(local)["state"] == "standby"
    # It stays the standby across a restart.
    local.stop()
    local.start()
    assert local.call("status")["volume"]["state"] == "standby"

    export = remote.call("remote.nbd_start", unit=unit_id, address="127.0.0.1:0")
    port = int(export["address"].rsplit(":", 1)[1])
    _nbd_write_read(port, export["export"], 20 * chunk, b"\x33" * chunk)
    back = _switchover(local)
    assert back["direction"] == "to-here"
    assert back["chunks_compared"] == 1 and back["chunks_moved"] == 1
    assert back["bytes_moved"] == chunk and back["chunks_changed_here"] == 0
    assert back["conflict"]["extents"] == 0
    assert _role(remote, unit_id)["role"] == "secondary"
    assert local.disk.read_bytes()[20 * chunk:21 * chunk] == b"\x33" * chunk
    wait_for(lambda: peer_status(local)["state"] == "connected", 30, "the link to resume")
    _unreplicated(local, 30 * chunk, b"\x34" * 4096)
    final = wait_caught_up(local, remote, unit_id)
    assert final == back["seq"] + 1
    assert_same_image(local, remote, unit_id, tmp_path)
    assert peer_status(local)["resyncs_done"] == 0  # nothing was resynced either way
    # every seq reached the remote once, in order, across both switches
    assert_arrived_once_in_order(remote, unit_id, final)


def test_test_failover_clone_is_writable_and_never_reaches_the_mirror(
        small_pair: Pair, tmp_path: Path) -> None:
    local, remote, unit_id = small_pair.local, small_pair.remote, small_pair.unit_id
    chunk = 64 * 1024
    _unreplicated(local, 0, b"\x41" * 2 * chunk)
    seq = wait_caught_up(local, remote, unit_id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware", "role", "test-failover", unit_id, "--nbd",
         "127.0.0.1:0", "--scratch", "256K", "--control", str(remote.control)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"at seq {seq}, writable" in line, line
        url = line.split("nbd://", 1)[1].split()[0]
        address, export = url.split("/", 1)
        port = int(address.rsplit(":", 1)[1])
        # The clone is the image at the point, and takes writes...
        with NbdClient("127.0.0.1", port, export) as c:
            assert bytes(c.read(0, chunk)) == b"\x41" * chunk
            c.write(512, b"\x99" * 1024)
            c.write(3 * chunk, b"\x98" * chunk)
            c.flush()
            got = bytes(c.read(0, 2048))
            assert got[:512] == b"\x41" * 512 and got[512:1536] == b"\x99" * 1024
            assert got[1536:] == b"\x41" * 512
            # ...up to its scratch space, then refuses, keeping what it holds.
            with pytest.raises(NbdClientError, match="NBD error 28"):  # ENOSPC
                c.write(4 * chunk, b"\x97" * 4 * chunk)
            assert bytes(c.read(3 * chunk, chunk)) == b"\x98" * chunk
            # Replication into the real mirror goes on meanwhile.
            _unreplicated(local, 5 * chunk, b"\x42" * chunk)
            wait_caught_up(local, remote, unit_id)
            assert bytes(c.read(5 * chunk, chunk)) == b"\0" * chunk  # the clone's point
        status = remote.call("role.test_failover_status", unit=unit_id)
        assert status[0]["scratch_used"] == chunk + 1024
        assert status[0]["scratch_limit"] == 256 * 1024
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:  # not left running once the test has failed
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert remote.call("role.test_failover_status", unit=unit_id) == []
    assert not list(Path(remote.workdir).rglob("*.scratch"))
    # Nothing written to the clone is in the mirror, which equals the local image.
    assert_same_image(local, remote, unit_id, tmp_path)
