"""CDB parsing and the SCSI target over an in-memory device: any CDB and data-out must end
in a status (GOOD or CHECK CONDITION with sense), never an exception."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.scsi import LogicalUnit, ScsiTarget
    from tests.support.memdev import MemoryDevice


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    lun = data[0] & 1
    cdb_len = data[1] % 33
    cdb = data[2:2 + cdb_len]
    data_out = data[2 + cdb_len:]
    target = ScsiTarget([LogicalUnit(MemoryDevice(64 * 512), serial="MU0000")])
    target.execute(lun, cdb, data_out)


if __name__ == "__main__":
    main("scsi_target", one_input)
