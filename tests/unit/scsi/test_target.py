"""SCSI block target: command set, sense, unit attention, standby, large devices."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.blockdev import (
    DeviceState,
    FileBlockDevice,
    NotReady,
    OutOfRange,
)
from firmware.scsi import CheckCondition, DataDirection, LogicalUnit, ScsiTarget, Status
from firmware.scsi import sense as S
from firmware.scsi import target as T
from tests.support.memdev import MemoryDevice

BS = 512


def make_target(
    *devices: MemoryDevice, power_on: bool = False, read_only: bool = False
) -> ScsiTarget:
    devs = devices or (MemoryDevice(),)
    units = [LogicalUnit(d, serial=f"MU{i:04d}", read_only=read_only) for i, d in enumerate(devs)]
    return ScsiTarget(units, power_on_unit_attention=power_on)


def cdb6(op: int, b1: int = 0, b2: int = 0, b3: int = 0, b4: int = 0, ctl: int = 0) -> bytes:
    return bytes([op, b1, b2, b3, b4, ctl])


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0])


def mode_sense10(page: int, alloc: int = 4096, dbd: bool = False, llbaa: bool = False) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBBxxxHB", T.MODE_SENSE_10, b1, page, 0, alloc, 0)


def rc16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", T.SERVICE_ACTION_IN_16, 0x10, 0, alloc, 0, 0)


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    if page is None:
        return bytes([T.INQUIRY, 0, 0, alloc >> 8, alloc & 0xFF, 0])
    return bytes([T.INQUIRY, 1, page, alloc >> 8, alloc & 0xFF, 0])


def report_luns(alloc: int = 256) -> bytes:
    return struct.pack(">BxBxxxIxx", T.REPORT_LUNS, 0, alloc)


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BBxxxxxHB", T.UNMAP, 1 if anchor else 0, length, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def check(result: T.CommandResult, expected: CheckCondition) -> None:
    assert result.status is Status.CHECK_CONDITION, result
    assert result.sense is not None
    assert (result.sense.key, result.sense.asc, result.sense.ascq) == (
        expected.key,
        expected.asc,
        expected.ascq,
    )


def good(result: T.CommandResult) -> bytes:
    assert result.status is Status.GOOD, result.sense
    return bytes(result.data_in)


# -- sense data format ------------------------------------------------------------------------


def test_fixed_format_sense_layout() -> None:
    data = S.LBA_OUT_OF_RANGE.fixed_format()
    assert len(data) == 18
    assert data[0] == 0x70 and data[2] == 0x05 and data[7] == 10
    assert (data[12], data[13]) == (0x21, 0x00)
    with_info = CheckCondition(0xE, 0x1D, 0, information=0x1234).fixed_format()
    assert with_info[0] == 0xF0 and with_info[3:7] == b"\0\0\x12\x34"


def test_descriptor_format_sense_layout() -> None:
    data = S.NOT_READY_STANDBY.descriptor_format()
    assert data[:4] == bytes([0x72, 0x02, 0x04, 0x0B]) and data[7] == 0 and len(data) == 8
    info = CheckCondition(0xE, 0x1D, 0, information=7).descriptor_format()
    assert info[7] == 12 and info[8:10] == b"\x00\x0a" and info[10] == 0x80
    assert int.from_bytes(info[12:20], "big") == 7


# -- error table ----------------------------------------------------------------------------

ERRORS: list[tuple[str, bytes, CheckCondition]] = [
    ("unknown opcode", cdb6(0xFF), S.INVALID_COMMAND_OPERATION_CODE),
    ("vendor opcode", bytes([0xC0]) + bytes(15), S.INVALID_COMMAND_OPERATION_CODE),
    ("read10 past end", rw10(T.READ_10, 2047, 2), S.LBA_OUT_OF_RANGE),
    ("read10 lba past end", rw10(T.READ_10, 2048, 0), S.LBA_OUT_OF_RANGE),
    ("write16 past end", rw16(T.WRITE_16, 1 << 40, 1), S.LBA_OUT_OF_RANGE),
    ("read6 past end", rw6(T.READ_6, 2000, 0), S.LBA_OUT_OF_RANGE),
    ("read10 rdprotect", rw10(T.READ_10, 0, 1, flags=0x20), S.INVALID_FIELD_IN_CDB),
    ("write12 wrprotect", rw12(T.WRITE_12, 0, 1, flags=0x40), S.INVALID_FIELD_IN_CDB),
    ("verify bytchk 2", rw10(T.VERIFY_10, 0, 1, flags=0x04), S.INVALID_FIELD_IN_CDB),
    ("verify bytchk 3", rw16(T.VERIFY_16, 0, 1, flags=0x06), S.INVALID_FIELD_IN_CDB),
    ("sync past end", rw10(T.SYNCHRONIZE_CACHE_10, 4000, 1), S.LBA_OUT_OF_RANGE),
    ("inquiry page without evpd", bytes([0x12, 0, 0x80, 0, 255, 0]), S.INVALID_FIELD_IN_CDB),
    ("inquiry cmddt", bytes([0x12, 2, 0, 0, 255, 0]), S.INVALID_FIELD_IN_CDB),
    ("inquiry unknown vpd", inquiry(0x99), S.INVALID_FIELD_IN_CDB),
    ("mode sense unknown page", mode_sense10(0x1C), S.INVALID_FIELD_IN_CDB),
    ("mode sense saved values", mode_sense10(0xC8), S.SAVING_PARAMETERS_NOT_SUPPORTED),
    ("mode sense6 subpage", cdb6(T.MODE_SENSE_6, 0, 0x08, 0x01, 255), S.INVALID_FIELD_IN_CDB),
    ("mode select save pages", cdb6(T.MODE_SELECT_6, 0x11, 0, 0, 0), S.INVALID_FIELD_IN_CDB),
    ("report luns alloc < 16", report_luns(8), S.INVALID_FIELD_IN_CDB),
    ("read capacity lba no pmi", b"\x25\0\0\0\0\x01\0\0\0\0", S.INVALID_FIELD_IN_CDB),
    ("service action in other", b"\x9e\x11" + bytes(14), S.INVALID_COMMAND_OPERATION_CODE),
    ("short cdb", rw10(T.READ_10, 0, 1)[:6], S.INVALID_FIELD_IN_CDB),
    ("naca control", cdb6(T.TEST_UNIT_READY, ctl=0x04), S.INVALID_FIELD_IN_CDB),
    ("link control", cdb6(T.TEST_UNIT_READY, ctl=0x01), S.INVALID_FIELD_IN_CDB),
    ("unmap anchor", unmap_cdb(24, anchor=True), S.INVALID_FIELD_IN_CDB),
    ("empty cdb", b"", S.INVALID_COMMAND_OPERATION_CODE),
]


@pytest.mark.parametrize("name,cdb,expected", ERRORS, ids=[e[0] for e in ERRORS])
def test_cdb_errors(name: str, cdb: bytes, expected: CheckCondition) -> None:
    target = make_target()
    check(target.execute(0, cdb), expected)
    parsed = target.parse(0, cdb)
    # parse() agrees with execute() for everything decidable from the CDB alone
    if expected != S.INVALID_FIELD_IN_CDB or name != "inquiry unknown vpd":
        assert parsed == expected
    # the sense is kept for the REQUEST SENSE that follows (no autosense on USB)
    sense = good(target.execute(0, cdb6(T.REQUEST_SENSE, b4=18)))
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (expected.key, expected.asc, expected.ascq)
    # ... and only once
    sense = good(target.execute(0, cdb6(T.REQUEST_SENSE, b4=18)))
    assert (sense[2], sense[12]) == (0, 0)


# -- success table: direction and length before the data phase --------------------------------

DIRECTIONS: list[tuple[bytes, DataDirection, int]] = [
    (cdb6(T.TEST_UNIT_READY), DataDirection.NONE, 0),
    (inquiry(alloc=36), DataDirection.IN, 36),
    (inquiry(alloc=5), DataDirection.IN, 5),
    (inquiry(alloc=255), DataDirection.IN, 36),
    (cdb6(T.REQUEST_SENSE, b4=252), DataDirection.IN, 18),
    (b"\x25" + bytes(9), DataDirection.IN, 8),
    (rc16(32), DataDirection.IN, 32),
    (rc16(12), DataDirection.IN, 12),
    (rw10(T.READ_10, 0, 8), DataDirection.IN, 8 * BS),
    (rw10(T.READ_10, 0, 0), DataDirection.NONE, 0),
    (rw6(T.READ_6, 0, 0), DataDirection.IN, 256 * BS),
    (rw12(T.WRITE_12, 10, 3), DataDirection.OUT, 3 * BS),
    (rw16(T.WRITE_16, 10, 3, flags=0x08), DataDirection.OUT, 3 * BS),
    (rw10(T.VERIFY_10, 0, 4), DataDirection.NONE, 0),
    (rw10(T.VERIFY_10, 0, 4, flags=0x02), DataDirection.OUT, 4 * BS),
    (rw10(T.SYNCHRONIZE_CACHE_10, 0, 0), DataDirection.NONE, 0),
    (unmap_cdb(24), DataDirection.OUT, 24),
    (cdb6(T.MODE_SELECT_6, 0x10, 0, 0, 24), DataDirection.OUT, 24),
    (cdb6(T.START_STOP_UNIT, 0, 0, 0, 0x02), DataDirection.NONE, 0),
    (cdb6(T.PREVENT_ALLOW_MEDIUM_REMOVAL, b4=1), DataDirection.NONE, 0),
    (report_luns(), DataDirection.IN, 16),
    (b"\x23" + bytes(6) + b"\x00\xfc\x00", DataDirection.IN, 12),
]


@pytest.mark.parametrize("cdb,direction,length", DIRECTIONS, ids=[d[0].hex() for d in DIRECTIONS])
def test_direction_and_length_known_before_data(
    cdb: bytes, direction: DataDirection, length: int
) -> None:
    command = make_target().start(0, cdb)
    assert not command.failed
    assert (command.direction, command.length) == (direction, length)
    parsed = make_target().parse(0, cdb)
    assert isinstance(parsed, T.ParsedCommand)
    if direction is not DataDirection.IN:
        assert (parsed.direction, parsed.length) == (direction, length)


# -- INQUIRY ----------------------------------------------------------------------------------


def test_standard_inquiry() -> None:
    unit = LogicalUnit(MemoryDevice(), serial="S1", vendor="ACME", product="Box", revision="1.2")
    target = ScsiTarget([unit], power_on_unit_attention=False)
    data = good(target.execute(0, inquiry()))
    assert len(data) == 36 and data[0] == 0 and data[1] == 0 and data[4] == 31
    assert data[2] == 0x06 and data[3] & 0x0F == 2
    assert data[8:16] == b"ACME    " and data[16:32] == b"Box".ljust(16) and data[32:36] == b"1.2 "
    assert good(target.execute(0, inquiry(alloc=5))) == data[:5]


def test_identity_strings_are_validated() -> None:
    with pytest.raises(ValueError, match="vendor"):
        LogicalUnit(MemoryDevice(), serial="x", vendor="NINECHARS")
    with pytest.raises(ValueError, match="serial"):
        LogicalUnit(MemoryDevice(), serial="caf\u00e9")
    with pytest.raises(ValueError):
        LogicalUnit(MemoryDevice(), serial="")


def test_inquiry_scsi2_lun_bits_are_ignored() -> None:
    good(make_target().execute(0, bytes([0x12, 0x20, 0, 0, 36, 0])))


def vpd(target: ScsiTarget, page: int, lun: int = 0) -> bytes:
    data = good(target.execute(lun, inquiry(page, alloc=1024)))
    assert data[1] == page and int.from_bytes(data[2:4], "big") == len(data) - 4
    return data


@pytest.mark.parametrize("trim", [True, False])
def test_vpd_supported_pages(trim: bool) -> None:
    target = make_target(MemoryDevice(trim=trim))
    pages = list(vpd(target, 0x00)[4:])
    expected = [0x00, 0x80, 0x83, 0xB0, 0xB1] + ([0xB2] if trim else [])
    assert pages == expected
    for page in pages:
        vpd(target, page)
    if not trim:
        check(target.execute(0, inquiry(0xB2)), S.INVALID_FIELD_IN_CDB)


def test_vpd_serial_and_identification() -> None:
    target = make_target(MemoryDevice(), MemoryDevice())
    assert vpd(target, 0x80)[4:] == b"MU0000"
    ident = vpd(target, 0x83)[4:]
    # T10 vendor id designator (ASCII, LU association, type 1)
    assert ident[0] & 0x0F == 2 and ident[1] & 0x3F == 0x01
    t10 = ident[4 : 4 + ident[3]]
    assert t10 == b"MirrorUnMU0000"
    eui = ident[4 + ident[3] :]
    assert eui[0] & 0x0F == 1 and eui[1] & 0x3F == 0x02 and eui[3] == 8
    other = vpd(target, 0x83, lun=1)
    assert other[-8:] != eui[-8:]  # different serial, different identifier
    again = make_target(MemoryDevice())
    assert vpd(again, 0x83)[-8:] == eui[-8:]  # stable across restarts


def test_vpd_block_limits_characteristics_provisioning() -> None:
    target = ScsiTarget(
        [LogicalUnit(MemoryDevice(), serial="a")],
        power_on_unit_attention=False,
        max_unmap_blocks=4096,
        max_unmap_descriptors=8,
    )
    limits = vpd(target, 0xB0)
    assert len(limits) == 64
    assert int.from_bytes(limits[20:24], "big") == 4096
    assert int.from_bytes(limits[24:28], "big") == 8
    chars = vpd(target, 0xB1)
    assert int.from_bytes(chars[4:6], "big") == 1  # non-rotating medium
    lbp = vpd(target, 0xB2)
    assert lbp[5] & 0x80  # LBPU: UNMAP supported


# -- MODE SENSE / MODE SELECT ---------------------------------------------------------------


def find_page(pages: bytes, code: int) -> bytes:
    pos = 0
    while pos < len(pages):
        if pages[pos] & 0x3F == code:
            return pages[pos : pos + pages[pos + 1] + 2]
        pos += pages[pos + 1] + 2
    raise AssertionError(f"page {code:#x} missing")


@pytest.mark.parametrize("wce", [True, False])
def test_mode_sense_caching_page_is_truthful(wce: bool) -> None:
    target = make_target(MemoryDevice(write_cache=wce))
    data = good(target.execute(0, cdb6(T.MODE_SENSE_6, 0, 0x08, 0, 255)))
    assert data[0] == len(data) - 1 and data[3] == 8
    assert data[2] & 0x10  # DPOFUA: FUA is honoured
    page = data[4 + 8 :]
    assert page[0] == 0x08 and page[1] == 0x12 and len(page) == 20
    assert bool(page[2] & 0x04) is wce


def test_a_device_that_records_flushes_asks_for_them_with_wce() -> None:
    """A write-through volume records the host's flushes as consistent points: it sets
    WCE so that a host (Linux's sd) sends them at all."""
    dev = MemoryDevice(write_cache=False)
    dev.records_flushes = True  # type: ignore[attr-defined]
    data = good(make_target(dev).execute(0, cdb6(T.MODE_SENSE_6, 0, 0x08, 0, 255)))
    assert data[4 + 8 + 2] & 0x04


def test_mode_sense_block_descriptor_and_wp() -> None:
    dev = MemoryDevice()
    target = make_target(dev, read_only=True)
    data = good(target.execute(0, cdb6(T.MODE_SENSE_6, 0, 0x3F, 0, 255)))
    assert data[2] & 0x80  # WP
    assert struct.unpack(">I", data[4:8])[0] == dev.size // BS
    assert int.from_bytes(data[9:12], "big") == BS
    pages = data[12:]
    find_page(pages, 0x08)
    find_page(pages, 0x0A)
    no_bd = good(target.execute(0, cdb6(T.MODE_SENSE_6, 0x08, 0x3F, 0, 255)))
    assert no_bd[3] == 0 and no_bd[4:] == pages
    assert not good(make_target().execute(0, cdb6(T.MODE_SENSE_6, 0, 0x3F, 0, 255)))[2] & 0x80


def test_mode_sense10_long_lba_and_changeable() -> None:
    target = make_target()
    data = good(target.execute(0, mode_sense10(0x08, llbaa=True)))
    assert int.from_bytes(data[0:2], "big") == len(data) - 2
    assert data[4] & 0x01 and int.from_bytes(data[6:8], "big") == 16
    assert struct.unpack(">Q4xI", data[8:24]) == ((1 << 20) // BS, BS)
    mask = good(target.execute(0, mode_sense10(0x48)))  # PC=1: changeable values
    page = find_page(mask[8 + int.from_bytes(mask[6:8], "big") :], 0x08)
    assert page[2:] == bytes(18)


def test_mode_select_accepts_unchanged_and_refuses_changes() -> None:
    dev = MemoryDevice(write_cache=True)
    target = make_target(dev)
    sense = good(target.execute(0, cdb6(T.MODE_SENSE_6, 0, 0x08, 0, 255)))
    params = bytearray(sense)
    params[0] = 0  # mode data length is reserved in MODE SELECT
    sel = cdb6(T.MODE_SELECT_6, 0x10, 0, 0, len(params))
    good(target.execute(0, sel, bytes(params)))
    changed = bytearray(params)
    changed[12 + 2] &= ~0x04  # clear WCE: not supported
    check(target.execute(0, sel, bytes(changed)), S.INVALID_FIELD_IN_PARAMETER_LIST)
    wrong_bs = bytearray(params)
    wrong_bs[9:12] = (4096).to_bytes(3, "big")
    check(target.execute(0, sel, bytes(wrong_bs)), S.INVALID_FIELD_IN_PARAMETER_LIST)
    truncated = bytes(params[:-4])
    check(
        target.execute(0, cdb6(T.MODE_SELECT_6, 0x10, 0, 0, len(truncated)), truncated),
        S.PARAMETER_LIST_LENGTH_ERROR,
    )
    good(target.execute(0, cdb6(T.MODE_SELECT_6, 0x10, 0, 0, 0)))
    assert dev.write_cache_enabled is True


# -- capacity ---------------------------------------------------------------------------------


def test_read_capacity_small_device() -> None:
    target = make_target(MemoryDevice(size=1 << 20, trim=True))
    assert struct.unpack(">II", good(target.execute(0, b"\x25" + bytes(9)))) == (2047, BS)
    data = good(target.execute(0, rc16()))
    last, bs, _, _, flags = struct.unpack(">QIBBH16x", data)
    assert (last, bs) == (2047, BS) and flags & 0x8000  # LBPME with trim
    data = good(make_target(MemoryDevice(trim=False)).execute(0, rc16()))
    assert not struct.unpack(">QIBBH16x", data)[4] & 0x8000
    fc = good(target.execute(0, b"\x23" + bytes(6) + b"\x00\xfc\x00"))
    assert fc[3] == 8 and struct.unpack(">I", fc[4:8])[0] == 2048 and fc[8] == 2


def test_device_larger_than_2_tib() -> None:
    size = 3 << 40
    dev = MemoryDevice(size=size)
    target = make_target(dev)
    last10, _ = struct.unpack(">II", good(target.execute(0, b"\x25" + bytes(9))))
    assert last10 == 0xFFFFFFFF
    last16 = struct.unpack(">Q", good(target.execute(0, rc16()))[:8])[0]
    assert last16 == size // BS - 1
    lba = (1 << 32) + 5
    good(target.execute(0, rw16(T.WRITE_16, lba, 1), b"\xab" * BS))
    assert good(target.execute(0, rw16(T.READ_16, lba, 1))) == b"\xab" * BS
    assert dev.blocks[lba] == b"\xab" * BS
    check(target.execute(0, rw16(T.READ_16, size // BS, 1)), S.LBA_OUT_OF_RANGE)
    good(target.execute(0, rw16(T.READ_16, size // BS - 1, 1)))


# -- READ / WRITE / VERIFY / SYNCHRONIZE CACHE ------------------------------------------------

RW = [
    ("6", rw6, T.READ_6, T.WRITE_6),
    ("10", rw10, T.READ_10, T.WRITE_10),
    ("12", rw12, T.READ_12, T.WRITE_12),
    ("16", rw16, T.READ_16, T.WRITE_16),
]


@pytest.mark.parametrize("name,build,read_op,write_op", RW, ids=[r[0] for r in RW])
def test_read_write_round_trip(name: str, build, read_op: int, write_op: int) -> None:  # type: ignore[no-untyped-def]
    dev = MemoryDevice()
    target = make_target(dev)
    data = bytes(range(256)) * 2 * 3
    good(target.execute(0, build(write_op, 100, 3), data))
    assert good(target.execute(0, build(read_op, 100, 3))) == data
    assert good(target.execute(0, build(read_op, 99, 1))) == bytes(BS)
    assert dev.writes == [(100 * BS, 3 * BS, False)]


@pytest.mark.parametrize("build,op", [(rw10, T.WRITE_10), (rw12, T.WRITE_12), (rw16, T.WRITE_16)])
def test_fua_reaches_the_device(build, op: int) -> None:  # type: ignore[no-untyped-def]
    dev = MemoryDevice()
    target = make_target(dev)
    good(target.execute(0, build(op, 0, 1, flags=0x08), bytes(BS)))
    good(target.execute(0, build(op, 1, 1), bytes(BS)))
    assert [w[2] for w in dev.writes] == [True, False]


def test_real_file_device(tmp_path: Path) -> None:
    dev = FileBlockDevice(tmp_path / "disk.img", size=1 << 20, create=True)
    target = ScsiTarget([LogicalUnit(dev, serial="F1")], power_on_unit_attention=False)
    payload = bytes(range(256)) * 64
    good(target.execute(0, rw10(T.WRITE_10, 8, 32, flags=0x08), payload))
    assert good(target.execute(0, rw10(T.READ_10, 8, 32))) == payload
    good(target.execute(0, rw10(T.SYNCHRONIZE_CACHE_10, 0, 0)))
    good(target.execute(0, unmap_cdb(24), unmap_params((8, 16))))
    assert good(target.execute(0, rw10(T.READ_10, 8, 16))) == bytes(16 * BS)
    dev.close()


def test_file_device_pread_into(tmp_path: Path) -> None:
    dev = FileBlockDevice(tmp_path / "disk.img", size=1 << 20, create=True)
    payload = bytes(range(256)) * 32
    dev.pwrite(4096, payload)
    buffer = bytearray(len(payload) + BS)
    dev.pread_into(4096 - BS, memoryview(buffer))
    assert bytes(buffer) == dev.pread(4096 - BS, len(buffer))
    assert buffer[BS:] == payload
    with pytest.raises(OutOfRange):
        dev.pread_into((1 << 20) - BS, memoryview(buffer))
    dev.state = DeviceState.STANDBY
    with pytest.raises(NotReady):
        dev.pread_into(0, memoryview(buffer))
    dev.close()


def test_reads_fill_one_reused_buffer(tmp_path: Path) -> None:
    """A READ's pieces come from a buffer the unit keeps: no fresh memory per
    command.  A small READ does not evict the large buffer, and two READs in
    flight at once never share one."""
    dev = FileBlockDevice(tmp_path / "disk.img", size=4 << 20, create=True)
    unit = LogicalUnit(dev, serial="F2")
    target = ScsiTarget([unit], power_on_unit_attention=False)
    payload = bytes((i * 13) & 0xFF for i in range(2048 * BS))
    good(target.execute(0, rw10(T.WRITE_10, 0, 2048), payload))

    def pieces(lba: int, blocks: int, size: int) -> tuple[bytes, list[object]]:
        command = target.start(0, rw10(T.READ_10, lba, blocks))
        data, owners = b"", []
        while piece := command.read(size):
            assert isinstance(piece, memoryview)
            owners.append(piece.obj)
            data += bytes(piece)
        assert command.finish().good
        return data, owners

    data, owners = pieces(0, 2048, 256 * 1024)
    assert data == payload
    assert len(set(map(id, owners))) == 1
    small, _ = pieces(7, 1, 4096)
    assert small == payload[7 * BS:8 * BS]
    again, owners_again = pieces(1024, 1024, 256 * 1024)
    assert again == payload[1024 * BS:]
    assert owners_again[0] is owners[0]

    first = target.start(0, rw10(T.READ_10, 0, 8))
    second = target.start(0, rw10(T.READ_10, 8, 8))
    a, b = first.read(4096), second.read(4096)
    assert isinstance(a, memoryview) and isinstance(b, memoryview) and a.obj is not b.obj
    assert bytes(a) == payload[:4096] and bytes(b) == payload[4096:8192]
    first.finish(), second.finish()
    dev.close()


def test_streamed_pieces_match_whole_and_stay_block_aligned() -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    payload = bytes((i * 7) & 0xFF for i in range(16 * BS))
    command = target.start(0, rw10(T.WRITE_10, 4, 16))
    for i in range(0, len(payload), 1000):  # pieces that straddle blocks
        command.write(payload[i : i + 1000])
    assert command.finish().good
    assert all(off % BS == 0 and n % BS == 0 for off, n, _ in dev.writes)
    command = target.start(0, rw10(T.READ_10, 4, 16))
    pieces = []
    while piece := command.read(700):
        assert len(piece) <= 700
        pieces.append(bytes(piece))
    assert command.finish().good
    assert b"".join(pieces) == payload


def test_short_data_out_is_a_data_phase_error() -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    check(target.execute(0, rw10(T.WRITE_10, 0, 4), b"\1" * (2 * BS + 10)), S.DATA_PHASE_ERROR)
    assert set(dev.blocks) == {0, 1}  # whole blocks that arrived were written


def test_verify() -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    data = b"\x5a" * (4 * BS)
    good(target.execute(0, rw10(T.WRITE_10, 10, 4), data))
    good(target.execute(0, rw10(T.VERIFY_10, 10, 4)))
    good(target.execute(0, rw16(T.VERIFY_16, 10, 4, flags=0x02), data))
    bad = bytearray(data)
    bad[3 * BS + 17] ^= 1
    result = target.execute(0, rw10(T.VERIFY_10, 10, 4, flags=0x02), bytes(bad))
    check(result, S.MISCOMPARE_DURING_VERIFY)
    assert result.sense is not None and result.sense.information == 3 * BS + 17
    sense = good(target.execute(0, cdb6(T.REQUEST_SENSE, b4=18)))
    assert sense[0] == 0xF0 and int.from_bytes(sense[3:7], "big") == 3 * BS + 17
    dev.fail_read_from = 12 * BS
    check(target.execute(0, rw10(T.VERIFY_10, 10, 4)), S.UNRECOVERED_READ_ERROR)
    check(target.execute(0, rw10(T.VERIFY_10, 4000, 1)), S.LBA_OUT_OF_RANGE)


@pytest.mark.parametrize(
    "cdb", [rw10(T.SYNCHRONIZE_CACHE_10, 0, 0), rw16(T.SYNCHRONIZE_CACHE_16, 5, 10)]
)
def test_synchronize_cache_flushes(cdb: bytes) -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    good(target.execute(0, cdb))
    assert dev.flushes == 1


def test_medium_errors() -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    dev.fail_write_from = 0
    check(target.execute(0, rw10(T.WRITE_10, 0, 1), bytes(BS)), S.WRITE_ERROR)
    dev.fail_read_from = 0
    check(target.execute(0, rw10(T.READ_10, 0, 1)), S.UNRECOVERED_READ_ERROR)


def test_write_protect() -> None:
    for dev, ro in ((MemoryDevice(), True), (MemoryDevice(read_only=True), False)):
        target = make_target(dev, read_only=ro)
        check(target.execute(0, rw10(T.WRITE_10, 0, 1), b"\1" * BS), S.WRITE_PROTECTED)
        check(target.execute(0, unmap_cdb(24), unmap_params((0, 1))), S.WRITE_PROTECTED)
        assert not dev.blocks and not dev.trims
        good(target.execute(0, rw10(T.READ_10, 0, 1)))


# -- UNMAP ------------------------------------------------------------------------------------


def test_unmap() -> None:
    dev = MemoryDevice()
    target = ScsiTarget(
        [LogicalUnit(dev, serial="u")],
        power_on_unit_attention=False,
        max_unmap_blocks=100,
        max_unmap_descriptors=2,
    )
    good(target.execute(0, rw10(T.WRITE_10, 0, 4), b"\1" * 4 * BS))
    params = unmap_params((0, 2), (3, 1))
    good(target.execute(0, unmap_cdb(len(params)), params))
    assert dev.trims == [(0, 2 * BS), (3 * BS, BS)] and set(dev.blocks) == {2}
    dev.trims.clear()
    for bad, sense in [
        (unmap_params((0, 1), (2047, 2)), S.LBA_OUT_OF_RANGE),
        (unmap_params((0, 1), (1, 1), (2, 1)), S.INVALID_FIELD_IN_PARAMETER_LIST),
        (unmap_params((0, 60), (100, 60)), S.INVALID_FIELD_IN_PARAMETER_LIST),
        (b"\0\0\0\0", S.PARAMETER_LIST_LENGTH_ERROR),
    ]:
        check(target.execute(0, unmap_cdb(len(bad)), bad), sense)
    assert dev.trims == []  # validation happens before anything is trimmed
    good(target.execute(0, unmap_cdb(0)))
    # an incomplete trailing descriptor is ignored
    partial = unmap_params((5, 1)) + b"\0" * 8
    partial = struct.pack(">HH4x", len(partial) - 2, 24) + partial[8:]
    good(target.execute(0, unmap_cdb(len(partial)), partial))
    assert dev.trims == [(5 * BS, BS)]


def test_unmap_unsupported_without_trim() -> None:
    target = make_target(MemoryDevice(trim=False))
    check(target.execute(0, unmap_cdb(24), unmap_params((0, 1))), S.INVALID_COMMAND_OPERATION_CODE)


# -- LUNs -------------------------------------------------------------------------------------


def test_report_luns_and_invalid_lun() -> None:
    target = make_target(MemoryDevice(), MemoryDevice(), MemoryDevice())
    assert target.max_lun == 2
    data = good(target.execute(0, report_luns()))
    assert struct.unpack(">I", data[:4])[0] == 24
    assert [data[8 + 8 * i : 10 + 8 * i] for i in range(3)] == [b"\0\0", b"\0\1", b"\0\2"]
    check(target.execute(3, cdb6(T.TEST_UNIT_READY)), S.LOGICAL_UNIT_NOT_SUPPORTED)
    check(target.execute(7, rw10(T.READ_10, 0, 1)), S.LOGICAL_UNIT_NOT_SUPPORTED)
    assert good(target.execute(3, inquiry()))[0] == 0x7F
    sense = good(target.execute(3, cdb6(T.REQUEST_SENSE, b4=18)))
    assert (sense[2], sense[12]) == (5, 0x25)
    good(target.execute(3, report_luns()))


def test_luns_are_independent() -> None:
    a, b = MemoryDevice(), MemoryDevice()
    target = make_target(a, b)
    good(target.execute(1, rw10(T.WRITE_10, 0, 1), b"\2" * BS))
    assert b.blocks[0] == b"\2" * BS and not a.blocks
    b.state = DeviceState.STANDBY
    check(target.execute(1, cdb6(T.TEST_UNIT_READY)), S.NOT_READY_STANDBY)
    good(target.execute(0, cdb6(T.TEST_UNIT_READY)))


# -- unit attention and device states -------------------------------------------------------


def test_power_on_unit_attention_reported_once() -> None:
    target = make_target(MemoryDevice(), MemoryDevice(), power_on=True)
    good(target.execute(0, inquiry()))  # not blocked, not consumed
    good(target.execute(0, report_luns()))
    check(target.execute(0, cdb6(T.TEST_UNIT_READY)), S.POWER_ON_RESET)
    good(target.execute(0, cdb6(T.TEST_UNIT_READY)))
    # REQUEST SENSE reports a pending unit attention and clears it
    sense = good(target.execute(1, cdb6(T.REQUEST_SENSE, b4=18)))
    assert (sense[2], sense[12], sense[13]) == (6, 0x29, 0)
    good(target.execute(1, cdb6(T.TEST_UNIT_READY)))
    target.reset()
    check(target.execute(0, rw10(T.READ_10, 0, 1)), S.POWER_ON_RESET)
    good(target.execute(0, rw10(T.READ_10, 0, 1)))


def test_unit_attention_precedes_cdb_errors() -> None:
    target = make_target(power_on=True)
    check(target.execute(0, cdb6(0xFF)), S.POWER_ON_RESET)
    check(target.execute(0, cdb6(0xFF)), S.INVALID_COMMAND_OPERATION_CODE)


def test_standby_then_promote() -> None:
    dev = MemoryDevice()
    dev.state = DeviceState.STANDBY
    target = make_target(dev)
    good(target.execute(0, inquiry()))
    assert struct.unpack(">II", good(target.execute(0, b"\x25" + bytes(9))))[0] == 2047
    good(target.execute(0, rc16()))
    good(target.execute(0, cdb6(T.MODE_SENSE_6, 0, 0x3F, 0, 255)))
    for cdb, data in [
        (cdb6(T.TEST_UNIT_READY), None),
        (rw10(T.READ_10, 0, 1), None),
        (rw10(T.WRITE_10, 0, 1), bytes(BS)),
        (rw10(T.VERIFY_10, 0, 1), None),
        (rw10(T.SYNCHRONIZE_CACHE_10, 0, 0), None),
        (unmap_cdb(24), unmap_params((0, 1))),
    ]:
        check(target.execute(0, cdb, data), S.NOT_READY_STANDBY)
    sense = good(target.execute(0, cdb6(T.REQUEST_SENSE, b4=18)))
    assert (sense[2], sense[12], sense[13]) == (2, 4, 0x0B)
    assert not dev.writes and dev.flushes == 0
    dev.state = DeviceState.READY
    check(target.execute(0, cdb6(T.TEST_UNIT_READY)), S.NOT_READY_TO_READY_CHANGE)
    good(target.execute(0, cdb6(T.TEST_UNIT_READY)))
    good(target.execute(0, rw10(T.WRITE_10, 0, 1), bytes(BS)))


def test_offline() -> None:
    dev = MemoryDevice()
    target = make_target(dev)
    dev.state = DeviceState.OFFLINE
    check(target.execute(0, rw10(T.READ_10, 0, 1)), S.NOT_READY_MANUAL_INTERVENTION)
    good(target.execute(0, inquiry()))
    dev.state = DeviceState.READY
    check(target.execute(0, rw10(T.READ_10, 0, 1)), S.NOT_READY_TO_READY_CHANGE)
    good(target.execute(0, rw10(T.READ_10, 0, 1)))


def test_capacity_change_unit_attention() -> None:
    dev = MemoryDevice(size=1 << 20)
    target = make_target(dev)
    good(target.execute(0, cdb6(T.TEST_UNIT_READY)))
    dev.size = 2 << 20
    check(target.execute(0, rw10(T.READ_10, 0, 1)), S.CAPACITY_DATA_HAS_CHANGED)
    assert struct.unpack(">II", good(target.execute(0, b"\x25" + bytes(9))))[0] == 4095


def test_request_sense_descriptor_format() -> None:
    target = make_target()
    check(target.execute(0, rw10(T.READ_10, 5000, 1)), S.LBA_OUT_OF_RANGE)
    data = good(target.execute(0, cdb6(T.REQUEST_SENSE, 0x01, b4=252)))
    assert data[:4] == bytes([0x72, 0x05, 0x21, 0x00])
    data = good(target.execute(0, cdb6(T.REQUEST_SENSE, 0x01, b4=252)))
    assert data[:4] == bytes([0x72, 0, 0, 0])


def test_sense_is_cleared_by_next_command() -> None:
    target = make_target()
    check(target.execute(0, cdb6(0xFF)), S.INVALID_COMMAND_OPERATION_CODE)
    good(target.execute(0, cdb6(T.TEST_UNIT_READY)))
    sense = good(target.execute(0, cdb6(T.REQUEST_SENSE, b4=18)))
    assert sense[2] == 0


# -- property: any CDB ends in GOOD or CHECK CONDITION with valid sense -----------------------

OPCODES = sorted(T.CDB_LENGTH)


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        op = draw(st.sampled_from(OPCODES))
        size = draw(st.sampled_from([T.CDB_LENGTH[op], 16, draw(st.integers(1, 16))]))
        rest = draw(st.binary(min_size=size - 1, max_size=size - 1))
        return bytes([op]) + rest
    return draw(st.binary(min_size=0, max_size=16))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=cdbs(),
    lun=st.integers(0, 3),
    data_out=st.one_of(st.none(), st.binary(max_size=2048)),
    state=st.sampled_from(list(DeviceState)),
    trim=st.booleans(),
)
def test_random_cdbs_never_raise(
    cdb: bytes, lun: int, data_out: bytes | None, state: DeviceState, trim: bool
) -> None:
    devs = [MemoryDevice(size=64 * BS, trim=trim), MemoryDevice(size=64 * BS, read_only=True)]
    target = make_target(*devs, power_on=True)
    devs[0].state = state
    command = target.start(lun, cdb)
    assert command.length >= 0
    if command.failed:
        assert (command.direction, command.length) == (DataDirection.NONE, 0)
    result = target.execute(lun, cdb, data_out)
    assert result.status in (Status.GOOD, Status.CHECK_CONDITION)
    if result.status is Status.CHECK_CONDITION:
        assert result.sense is not None
        assert result.sense.key in set(S.SenseKey) - {S.SenseKey.NO_SENSE}
        fixed = result.sense.fixed_format()
        assert len(fixed) == 18 and fixed[0] & 0x7F == 0x70
    else:
        assert result.sense is None
    # the target stays usable
    sense = target.execute(lun, cdb6(T.REQUEST_SENSE, b4=18))
    assert sense.good and len(sense.data_in) == 18


def test_real_volume_standby_and_promotion_over_the_control_path(tmp_path: Path) -> None:
    """The local unit's volume (mirror + cache + CBQ) as the device: its state set the
    way `mirrorunit standby` / `promote` set it is what the target reports."""
    from firmware.local import LocalSettings, LocalUnit

    unit = LocalUnit(LocalSettings(disk=tmp_path / "disk", buffer=tmp_path / "cbq",
                                   control=tmp_path / "c.sock", size=1 << 20,
                                   buffer_size=4 << 20, standby=True))
    try:
        target = ScsiTarget([LogicalUnit(unit.volume, serial="VOL1")])
        check(target.execute(0, cdb6(T.TEST_UNIT_READY)), S.POWER_ON_RESET)
        assert struct.unpack(">II", good(target.execute(0, b"\x25" + bytes(9))))[0] == 2047
        check(target.execute(0, cdb6(T.TEST_UNIT_READY)), S.NOT_READY_STANDBY)
        check(target.execute(0, rw10(T.READ_10, 0, 8)), S.NOT_READY_STANDBY)
        unit.handlers()["volume.set_state"]("ready")
        check(target.execute(0, rw10(T.READ_10, 0, 8)), S.NOT_READY_TO_READY_CHANGE)
        good(target.execute(0, rw10(T.WRITE_10, 8, 2), b"\xab" * 2 * BS))
        assert good(target.execute(0, rw10(T.READ_10, 8, 2))) == b"\xab" * 2 * BS
        assert unit.cbq.stats()["last_seq"] >= 1  # the write went through the CBQ
        unit.handlers()["volume.set_state"]("standby")
        check(target.execute(0, rw10(T.READ_10, 8, 2)), S.NOT_READY_STANDBY)
    finally:
        unit.volume.close()
        unit.mirror.close()
        unit.cbq_storage.close()
