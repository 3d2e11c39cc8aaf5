"""The remote's mirror as a standby host's disk: NOT READY until the unit is promoted,
then a unit attention and the writable mirror; a standby again while handing back."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from firmware.remote.standby import MirrorDevice
from firmware.scsi import CheckCondition, LogicalUnit, ScsiTarget, Status
from firmware.scsi import sense as S
from firmware.scsi import target as T
from tests.support.remote_store import make_records, model, open_unit

SIZE = 4 * 65536


def _cdb10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def _sense(r: T.CommandResult) -> tuple[int, int, int]:
    assert r.status is Status.CHECK_CONDITION and r.sense is not None
    return r.sense.key, r.sense.asc, r.sense.ascq


def _code(c: CheckCondition) -> tuple[int, int, int]:
    return c.key, c.asc, c.ascq


def test_standby_until_promoted_then_the_writable_mirror(tmp_path: Path) -> None:
    recs = make_records(random.Random(3), 6, 128)
    u = open_unit(tmp_path / "u", size=SIZE)
    u.apply(recs[:4])
    target = ScsiTarget([LogicalUnit(MirrorDevice(u), serial="MUREMOTE01")],
                        power_on_unit_attention=False)
    cap = target.execute(0, b"\x25" + bytes(9))
    assert cap.status is Status.GOOD
    assert struct.unpack(">II", bytes(cap.data_in)) == (SIZE // 512 - 1, 512)
    for cdb, data in ((bytes(6), None), (_cdb10(T.READ_10, 0, 1), None),
                      (_cdb10(T.WRITE_10, 0, 1), bytes(512))):
        assert _sense(target.execute(0, cdb, data)) == _code(S.NOT_READY_STANDBY)
    u.apply(recs[4:])  # replication goes on into the standby's mirror
    u.promote()
    assert _sense(target.execute(0, bytes(6))) == _code(S.NOT_READY_TO_READY_CHANGE)
    r = target.execute(0, _cdb10(T.READ_10, 0, SIZE // 512))
    assert r.status is Status.GOOD and bytes(r.data_in) == model(recs, SIZE)
    w = target.execute(0, _cdb10(T.WRITE_10, 8, 1), b"\x5e" * 512)
    assert w.status is Status.GOOD
    assert u.read_mirror(8 * 512, 512) == b"\x5e" * 512 and u.dirty_chunks() == [0]
    u.begin_hand_back()  # a failback: the host is kept out again
    assert _sense(target.execute(0, bytes(6))) == _code(S.NOT_READY_STANDBY)
    u.end_hand_back()
    u.close()
