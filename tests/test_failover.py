"""Failover: lineages on every copy, HELLO's lineage, promotion of a remote unit and the
fencing of the old primary when it returns.

The loopback tests run a real local and a real remote on 127.0.0.1 (the helpers of
test_replication).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.local.replication import load_local_lineage
from tests.test_remote_store import make_records, open_unit


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
    with pytest.raises(lineage_store.LineageCorruption, match="CRC32C"):
        open_unit(tmp_path / "u")


def test_the_local_copy_gets_a_first_primary_generation_once(tmp_path: Path) -> None:
    first = load_local_lineage(tmp_path / "state")
    assert first.is_lone_first and first.current.role is Role.PRIMARY and first.writer
    assert load_local_lineage(tmp_path / "state") == first


