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
from firmware.nbd.client import NbdClient
from tests.support import REPO as ROOT
from tests.support.replication import (
    Pair,
    RemoteProc,
    Writer,
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
