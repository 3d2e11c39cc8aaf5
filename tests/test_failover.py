"""Failover: lineages on every copy, HELLO's lineage, promotion of a remote unit and the
fencing of the old primary when it returns.

The loopback tests run a real local and a real remote on 127.0.0.1 (test_replication's
`Pair`).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware.control import ControlError
from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.local.replication import load_local_lineage
from firmware.nbd.client import NbdClient
from firmware.remote.errors import JournalCorruption, Promoted, PromoteRefused
from firmware.remote.meeting import Action, meet, peer_lineage_of
from tests.test_remote_store import FakeClock, S, make_records, model, open_unit
from tests.test_replication import (
    ROOT,
    Pair,
    RemoteProc,
    Writer,
    peer_status,
    wait_caught_up,
    wait_for,
)

SIZE = 64 * 1024


def test_a_unit_from_before_lineages_opens_with_a_first_generation(tmp_path: Path) -> None:
    u = open_unit(tmp_path / "u")
    u.apply(make_records(random.Random(1), 3, 2))
    first = u.lineage
    u.close()
    path = tmp_path / "u" / lineage_store.FILE_NAME
    assert lineage_store.load(path) == first
    assert first.is_lone_first and first.current.role is Role.SECONDARY
    assert not first.writer
    # Today's code kept no lineage: the file is gone, the data is not.
    path.unlink()
    u = open_unit(tmp_path / "u")
    assert u.last_applied_seq == 3
    assert u.lineage.is_lone_first and u.lineage.generation != first.generation
    assert lineage_store.load(path) == u.lineage
    u.close()


def test_a_unit_keeps_the_lineage_it_was_given(tmp_path: Path) -> None:
    u = open_unit(tmp_path / "u")
    peer = Lineage.first(Role.PRIMARY, 1.0e9, random.Random(3))
    u.set_lineage(u.lineage.adopt(peer))
    u.close()
    u = open_unit(tmp_path / "u")
    assert u.lineage.generation == peer.generation and not u.lineage.writer
    u.close()


def test_a_damaged_lineage_file_is_refused_with_its_location(tmp_path: Path) -> None:
    u = open_unit(tmp_path / "u")
    u.close()
    path = tmp_path / "u" / lineage_store.FILE_NAME
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(JournalCorruption, match="lineage file: CRC32C mismatch") as info:
        open_unit(tmp_path / "u")
    assert info.value.path == str(path)


def test_the_local_copy_gets_a_first_primary_generation_once(tmp_path: Path) -> None:
    first = load_local_lineage(tmp_path / "state")
    assert first.is_lone_first and first.current.role is Role.PRIMARY and first.writer
    assert load_local_lineage(tmp_path / "state") == first


def test_a_damaged_local_lineage_is_kept_and_stands_in_for_nothing(tmp_path: Path) -> None:
    first = load_local_lineage(tmp_path / "state")
    path = tmp_path / "state" / lineage_store.FILE_NAME
    path.write_bytes(path.read_bytes()[:-1])
    damaged = path.read_bytes()
    stand_in = load_local_lineage(tmp_path / "state")
    assert stand_in.generation != first.generation and stand_in.is_lone_first
    assert path.read_bytes() == damaged




# --------------------------------------------------------------------------- promotion


def test_promote_at_the_last_applied_seq_forks_and_stops_replication(tmp_path: Path) -> None:
    recs = make_records(random.Random(2), 12, 128)
    u = open_unit(tmp_path / "u", size=4 * 65536)
    u.apply(recs[:10])
    before = u.lineage
    report = u.promote()
    assert (report.seq, report.fork_seq, report.forced) == (10, 10, False)
    g = u.lineage.current
    assert g.parent == before.generation and g.fork_seq == 10 and g.role is Role.PRIMARY
    assert u.lineage.writer and u.copy_seq == 10
    with pytest.raises(Promoted, match="promoted at seq 10"):
        u.apply(recs[10:])
    with pytest.raises(PromoteRefused, match="already promoted"):
        u.promote()
    dev = u.promoted_device()
    dev.pwrite(2 * 65536 - 512, b"\xab" * 1024)  # across chunks 1 and 2
    dev.flush()
    assert u.dirty_chunks() == [1, 2] and u.copy_seq == 11
    u.close()
    u = open_unit(tmp_path / "u", size=4 * 65536)
    assert u.promoted and u.dirty_chunks() == [1, 2] and u.copy_seq == 11
    assert u.read_mirror(2 * 65536 - 512, 1024) == b"\xab" * 1024
    assert u.status().promoted is not None and u.status().role == "primary"
    u.close()


def test_promote_at_an_earlier_seq_rolls_back_through_history(tmp_path: Path) -> None:
    recs = make_records(random.Random(3), 10, 128)
    u = open_unit(tmp_path / "u")
    u.apply(recs)
    report = u.promote(at_seq=6)
    assert report.seq == 6 and report.undone == 4
    assert u.read_mirror(0, SIZE) == model(recs[:6], SIZE)
    assert u.lineage.current.fork_seq == 6
    u.close()


def test_promote_rolls_forward_through_writes_held_back(tmp_path: Path) -> None:
    recs = make_records(random.Random(4), 8, 128)
    clock = FakeClock()
    u = open_unit(tmp_path / "u", clock=clock, commit_delay_s=3600)
    u.apply(recs)
    assert u.last_applied_seq == 0
    clock.now += S
    report = u.promote(at_seq=5)
    assert report.seq == 5 and report.dropped_pending == 3
    assert u.read_mirror(0, SIZE) == model(recs[:5], SIZE)
    with pytest.raises(PromoteRefused, match="never received"):
        open_unit(tmp_path / "v").promote(at_seq=1)
    u.close()


def test_a_promotion_cut_short_after_its_lineage_is_finished_at_open(tmp_path: Path) -> None:
    u = open_unit(tmp_path / "u")
    u.apply(make_records(random.Random(5), 4, 128))
    forked = u.lineage.fork(Role.PRIMARY, 4, 1.0e9, False, random.Random(6))
    u.set_lineage(forked)  # what promote() records before the state that says so
    u.close()
    u = open_unit(tmp_path / "u")
    assert u.promoted and u.copy_seq == 4 and u.lineage == forked
    u.close()


# --------------------------------------------------------------------------- loopback


def _nbd_write_read(port: int, export: str, offset: int, data: bytes) -> bytes:
    with NbdClient("127.0.0.1", port, export) as c:
        c.write(offset, data)
        c.flush()
        return bytes(c.read(offset, len(data)))


def _role(remote: RemoteProc, unit_id: str) -> dict[str, Any]:
    result: dict[str, Any] = remote.call("role.status", unit=unit_id)["units"][unit_id]
    return result


@pytest.fixture
def small_pair(tmp_path: Path) -> Any:
    p = Pair(tmp_path, size="8M", buffer_size="8M")
    yield p
    p.close()


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


# --------------------------------------------------------------------------- the verdict


def _lineages() -> tuple[Lineage, Lineage]:
    rng = random.Random(7)
    local = Lineage.first(Role.PRIMARY, 1.0e9, rng)
    remote = Lineage.first(Role.SECONDARY, 1.0e9, rng).adopt(local)
    return local, remote


def test_verdict_same_generation_resumes_and_a_new_store_adopts() -> None:
    local, remote = _lineages()
    assert meet(remote, 5, local, 9).action is Action.RESUME
    fresh = Lineage.first(Role.SECONDARY, 1.0e9, random.Random(8))
    v = meet(fresh, 0, local, 9)
    assert v.action is Action.ADOPT and v.decision.rule == "first-generation-secondary"
    # An older local sends no lineage: never recorded, replication as before.
    assert meet(fresh, 0, local, 9, told=False).action is Action.RESUME


def test_verdict_fences_the_old_primary_of_a_promoted_unit() -> None:
    local, remote = _lineages()
    promoted = remote.fork(Role.PRIMARY, 40, 1.7e9, False, random.Random(9))
    v = meet(promoted, 40, local, 55)
    assert v.action is Action.REFUSE and v.code == "fenced"
    assert v.text.startswith("promoted at seq 40 on 2023-11-14 22:13:20 UTC; this copy is "
                             "stale since seq 40")
    assert "41..55" in v.text
    # The old primary wrote nothing since: still stale, still refused.
    assert meet(promoted, 40, local, 40).code == "fenced"


def test_verdict_refuses_a_split_brain_and_an_unrelated_copy() -> None:
    local, remote = _lineages()
    forced = remote.fork(Role.PRIMARY, 40, 1.7e9, True, random.Random(9))
    v = meet(forced, 40, local, 55)
    assert v.action is Action.REFUSE and v.code == "split-brain"
    assert "this copy holds seqs 41..55" in v.text  # worded for the local
    stranger = Lineage.first(Role.PRIMARY, 1.0e9, random.Random(10))
    assert meet(remote, 5, stranger, 9).code == "unrelated"


def test_an_older_local_stands_for_the_first_generation_it_wrote() -> None:
    local, remote = _lineages()
    assert peer_lineage_of(remote) == Lineage(local.current, (), writer=True)
    assert peer_lineage_of(Lineage.first(Role.SECONDARY, 1.0, random.Random(1))) is None


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
