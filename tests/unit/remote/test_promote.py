"""Promotion of a remote unit and the lineage of every copy, in process: a unit from
before lineages, damaged lineage files, promotion at, before and after the last applied
seq, a promotion cut short, and the verdict at HELLO."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from firmware.blockdev import NotReady
from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.local.replication import load_local_lineage
from firmware.remote.errors import JournalCorruption, Promoted, PromoteRefused, StoreUsageError
from firmware.remote.meeting import Action, meet, peer_lineage_of
from tests.support.remote_store import FakeClock, S, make_records, model, open_unit

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
    first = load_local_lineage(tmp_path / "state", queue_used=False)
    assert first.is_lone_first and first.current.role is Role.PRIMARY and first.writer
    assert load_local_lineage(tmp_path / "state", queue_used=False) == first


def test_a_damaged_local_lineage_is_kept_and_stands_in_for_nothing(tmp_path: Path) -> None:
    first = load_local_lineage(tmp_path / "state", queue_used=False)
    path = tmp_path / "state" / lineage_store.FILE_NAME
    path.write_bytes(path.read_bytes()[:-1])
    damaged = path.read_bytes()
    stand_in = load_local_lineage(tmp_path / "state", queue_used=False)
    assert stand_in.generation != first.generation and stand_in.is_lone_first
    assert path.read_bytes() == damaged


def test_a_used_queue_without_its_lineage_file_makes_up_no_generation(tmp_path: Path) -> None:
    # A replaced card whose data and queue survived: a new first generation would be
    # unrelated to every remote that knows this copy, so none is made up or saved.
    assert load_local_lineage(tmp_path / "state", queue_used=True) is None
    assert not (tmp_path / "state" / lineage_store.FILE_NAME).exists()
    first = load_local_lineage(tmp_path / "state", queue_used=False)
    assert load_local_lineage(tmp_path / "state", queue_used=True) == first


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


def _chunks(bits: bytes) -> list[int]:
    return [c for c in range(len(bits) * 8) if bits[c >> 3] & (1 << (c & 7))]


def test_a_promotion_records_the_chunks_of_received_writes_it_drops(tmp_path: Path) -> None:
    recs = make_records(random.Random(8), 8, 128)
    clock = FakeClock()
    u = open_unit(tmp_path / "u", size=4 * 65536, clock=clock, commit_delay_s=3600)
    u.apply(recs)
    clock.now += S
    u.promote(at_seq=5)
    want = sorted({r.lbn * 512 // 65536 for r in recs[5:]}
                  | {(r.lbn * 512 + len(r.data) - 1) // 65536 for r in recs[5:]})
    plan = u.begin_hand_back()
    assert _chunks(plan.dropped) == want and _chunks(plan.changed) == want
    assert plan.seq == 5 and plan.lineage == u.lineage
    u.end_hand_back()
    u.close()


def test_hand_back_follows_the_local_and_starts_history_afresh(tmp_path: Path) -> None:
    recs = make_records(random.Random(9), 12, 128)
    u = open_unit(tmp_path / "u", size=4 * 65536)
    u.apply(recs[:10])
    u.promote()
    dev = u.promoted_device()
    dev.pwrite(3 * 65536, b"\x77" * 4096)
    plan = u.begin_hand_back()
    assert _chunks(plan.changed) == [3] and plan.seq == 11
    with pytest.raises(NotReady, match="handing its role back"):
        dev.pwrite(0, b"\0" * 512)  # the host is stopped while the local takes the image
    stranger = Lineage.first(Role.PRIMARY, 1.0, random.Random(1))
    with pytest.raises(StoreUsageError, match="was not forked off"):
        u.hand_back(20, stranger.fork(Role.PRIMARY, 20, 2.0, False, random.Random(2)))
    local = u.lineage.adopt(u.lineage).fork(Role.PRIMARY, 20, 3.0, False, random.Random(3))
    assert u.hand_back(20, local) == 20
    assert not u.promoted and u.lineage.generation == local.generation
    assert not u.lineage.writer and u.last_durable_seq() == 20
    assert u.oldest_restorable.seq == 20  # nothing before the hand-back can be rebuilt
    with pytest.raises(NotReady):
        dev.pwrite(0, b"\0" * 512)
    image = u.read_mirror(0, 4 * 65536)
    u.close()
    u = open_unit(tmp_path / "u", size=4 * 65536)
    assert not u.promoted and u.last_durable_seq() == 20 and u.read_mirror(0, 4 * 65536) == image
    # and it takes the local's next writes as a secondary again
    nxt = make_records(random.Random(10), 2, 128, first_seq=21)
    assert u.apply(nxt) == 22
    u.close()


def test_a_hand_back_cut_short_after_its_lineage_is_finished_at_open(tmp_path: Path) -> None:
    u = open_unit(tmp_path / "u")
    u.apply(make_records(random.Random(11), 4, 128))
    u.promote()
    local = u.lineage.adopt(u.lineage).fork(Role.PRIMARY, 9, 3.0, False, random.Random(4))
    u.set_lineage(u.lineage.adopt(local))  # what hand_back() records before the state
    u.close()
    u = open_unit(tmp_path / "u")
    assert not u.promoted and u.last_durable_seq() == 9 and u.dirty_chunks() == []
    u.close()


# --------------------------------------------------------------------------- loopback


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
