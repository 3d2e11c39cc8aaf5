"""Parameter data: INQUIRY and its VPD pages, mode pages, READ CAPACITY and REPORT
LUNS layouts, and the MODE SELECT and UNMAP parameter lists."""

from __future__ import annotations

import struct

from firmware.blockdev import BlockDeviceError
from firmware.scsi import sense as S
from firmware.scsi.opcodes import MODE_SENSE_10
from firmware.scsi.sense import CheckCondition
from firmware.scsi.unit import LogicalUnit

#: standard INQUIRY data (SPC-4 6.6.2): peripheral, RMB, version, response format,
#: additional length, flags(3), vendor, product, revision
STANDARD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s")
assert STANDARD_INQUIRY.size == 36
#: VPD page header: peripheral, page code, page length
VPD_HEADER = struct.Struct(">BBH")
assert VPD_HEADER.size == 4
#: designation descriptor header: protocol/code set, PIV/association/type, reserved, length
DESIGNATOR_HEADER = struct.Struct(">BBxB")
assert DESIGNATOR_HEADER.size == 4
#: block limits VPD 0xB0 body after the header (SBC-3 6.5.3), 60 bytes
BLOCK_LIMITS = struct.Struct(">BBHIIIIIII Q20x".replace(" ", ""))
assert BLOCK_LIMITS.size == 0x3C
#: READ CAPACITY(10) data: returned LBA, block length
READ_CAPACITY_10_DATA = struct.Struct(">II")
assert READ_CAPACITY_10_DATA.size == 8
#: READ CAPACITY(16) data: returned LBA, block length, protection, exponents, LBPME|LBPRZ|LALBA
READ_CAPACITY_16_DATA = struct.Struct(">QIBBH16x")
assert READ_CAPACITY_16_DATA.size == 32
#: READ FORMAT CAPACITIES (MMC/UFI): list header then one current capacity descriptor
FORMAT_CAPACITIES = struct.Struct(">3xBIB3s")
assert FORMAT_CAPACITIES.size == 12
MODE_HEADER_6 = struct.Struct(">BBBB")
assert MODE_HEADER_6.size == 4
MODE_HEADER_10 = struct.Struct(">HBBBxH")
assert MODE_HEADER_10.size == 8
SHORT_BLOCK_DESCRIPTOR = struct.Struct(">Ix3s")
assert SHORT_BLOCK_DESCRIPTOR.size == 8
LONG_BLOCK_DESCRIPTOR = struct.Struct(">Q4xI")
assert LONG_BLOCK_DESCRIPTOR.size == 16
REPORT_LUNS_HEADER = struct.Struct(">I4x")
assert REPORT_LUNS_HEADER.size == 8
#: UNMAP parameter list header and block descriptor (SBC-3 5.28.2)
UNMAP_HEADER = struct.Struct(">HH4x")
assert UNMAP_HEADER.size == 8
UNMAP_DESCRIPTOR = struct.Struct(">QI4x")
assert UNMAP_DESCRIPTOR.size == 16

PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
SUBPAGE_ALL = 0xFF
_MODE_WP = 0x80
_MODE_DPOFUA = 0x10
_CACHING_WCE = 0x04
_LONGLBA = 0x01

VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2


def _standard_inquiry(unit: LogicalUnit) -> bytes:
    return STANDARD_INQUIRY.pack(
        0x00,  # connected direct-access block device
        0x80 if unit.removable else 0x00,
        0x06,  # SPC-4
        0x02,  # response data format 2
        STANDARD_INQUIRY.size - 5,
        0,
        0,
        0,
        unit.vendor,
        unit.product,
        unit.revision,
    )


def _no_unit_inquiry() -> bytes:
    # Peripheral qualifier 011b, type 1Fh: no logical unit at this LUN (SPC-4 6.6.2).
    return STANDARD_INQUIRY.pack(
        0x7F, 0, 0x06, 0x02, STANDARD_INQUIRY.size - 5, 0, 0, 0, b" " * 8, b" " * 16, b" " * 4
    )


def _vpd(page: int, body: bytes) -> bytes:
    return VPD_HEADER.pack(0x00, page, len(body)) + body


def _vpd_pages(unit: LogicalUnit, max_unmap_blocks: int, max_descriptors: int) -> dict[int, bytes]:
    t10 = unit.vendor + unit.serial
    identification = (
        DESIGNATOR_HEADER.pack(0x02, 0x01, len(t10))  # ASCII, LU, T10 vendor id
        + t10
        + DESIGNATOR_HEADER.pack(0x01, 0x02, len(unit.eui64))  # binary, LU, EUI-64
        + unit.eui64
    )
    trim = unit.device.supports_trim
    limits = BLOCK_LIMITS.pack(
        0,  # WSNZ
        0,  # maximum compare and write length
        0,  # optimal transfer length granularity: not reported
        0,  # maximum transfer length: no limit
        0,  # optimal transfer length
        0,  # maximum prefetch length
        min(max_unmap_blocks, 0xFFFFFFFF) if trim else 0,
        max_descriptors if trim else 0,
        1 if trim else 0,  # optimal unmap granularity
        0,  # unmap granularity alignment not valid
        0,  # maximum write same length
    )
    characteristics = struct.pack(">HBB", 0x0001, 0, 0).ljust(0x3C, b"\0")  # non-rotating
    pages = {
        VPD_UNIT_SERIAL_NUMBER: _vpd(VPD_UNIT_SERIAL_NUMBER, unit.serial),
        VPD_DEVICE_IDENTIFICATION: _vpd(VPD_DEVICE_IDENTIFICATION, identification),
        VPD_BLOCK_LIMITS: _vpd(VPD_BLOCK_LIMITS, limits),
        VPD_BLOCK_DEVICE_CHARACTERISTICS: _vpd(VPD_BLOCK_DEVICE_CHARACTERISTICS, characteristics),
    }
    if trim:
        # LBPU: UNMAP supported; provisioning type 2: thin.
        pages[VPD_LOGICAL_BLOCK_PROVISIONING] = _vpd(
            VPD_LOGICAL_BLOCK_PROVISIONING, bytes([0, 0x80, 0x02, 0])
        )
    supported = bytes(sorted([VPD_SUPPORTED_PAGES, *pages]))
    pages[VPD_SUPPORTED_PAGES] = _vpd(VPD_SUPPORTED_PAGES, supported)
    return pages


def _caching_page(unit: LogicalUnit) -> bytes:
    page = bytearray(20)
    page[0], page[1] = PAGE_CACHING, len(page) - 2
    # A device that records the host's flushes as consistent points asks for them:
    # WCE set lets the host's flush (SYNCHRONIZE CACHE) come, which Linux's sd sends
    # only to a disk that says its write cache is on.  SBC lets a device with WCE set
    # complete writes before they are on the medium; it need not.
    if unit.device.write_cache_enabled or getattr(unit.device, "records_flushes", False):
        page[2] |= _CACHING_WCE
    return bytes(page)


def _control_page(unit: LogicalUnit) -> bytes:
    page = bytearray(12)
    page[0], page[1] = PAGE_CONTROL, len(page) - 2
    page[2] = 0x02  # GLTSD: no log parameters are saved
    return bytes(page)


def _mode_pages(unit: LogicalUnit, page: int, changeable: bool) -> bytes:
    pages = []
    for code, build in ((PAGE_CACHING, _caching_page), (PAGE_CONTROL, _control_page)):
        if page in (code, PAGE_ALL):
            data = build(unit)
            if changeable:  # nothing can be changed: an all-zero mask
                data = data[:2] + bytes(len(data) - 2)
            pages.append(data)
    return b"".join(pages)


def _mode_sense(unit: LogicalUnit, cdb: bytes) -> bytes:
    ten = cdb[0] == MODE_SENSE_10
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pages = _mode_pages(unit, cdb[2] & 0x3F, changeable=cdb[2] >> 6 == 1)
    specific = (_MODE_WP if unit.write_protected else 0) | _MODE_DPOFUA
    descriptor = b""
    if not dbd:
        if llbaa:
            descriptor = LONG_BLOCK_DESCRIPTOR.pack(unit.block_count, unit.block_size)
        else:
            descriptor = SHORT_BLOCK_DESCRIPTOR.pack(
                min(unit.block_count, 0xFFFFFFFF), unit.block_size.to_bytes(3, "big")
            )
    if ten:
        body_len = MODE_HEADER_10.size + len(descriptor) + len(pages)
        header = MODE_HEADER_10.pack(
            body_len - 2, 0, specific, _LONGLBA if llbaa and descriptor else 0, len(descriptor)
        )
    else:
        body_len = MODE_HEADER_6.size + len(descriptor) + len(pages)
        header = MODE_HEADER_6.pack(min(body_len - 1, 0xFF), 0, specific, len(descriptor))
    return header + descriptor + pages


def _mode_select(unit: LogicalUnit, ten: bool, data: bytes) -> CheckCondition | None:
    """Accept pages equal to the current ones (nothing here is changeable)."""
    if not data:
        return None
    header = MODE_HEADER_10 if ten else MODE_HEADER_6
    if len(data) < header.size:
        return S.PARAMETER_LIST_LENGTH_ERROR
    if ten:
        _, _, _, longlba, bd_len = MODE_HEADER_10.unpack_from(data)
    else:
        _, _, _, bd_len = MODE_HEADER_6.unpack_from(data)
        longlba = 0
    pos = header.size
    if len(data) < pos + bd_len:
        return S.PARAMETER_LIST_LENGTH_ERROR
    descriptor = LONG_BLOCK_DESCRIPTOR if longlba & _LONGLBA else SHORT_BLOCK_DESCRIPTOR
    if bd_len not in (0, descriptor.size):
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    if bd_len:
        if descriptor is LONG_BLOCK_DESCRIPTOR:
            block_length = LONG_BLOCK_DESCRIPTOR.unpack_from(data, pos)[1]
        else:
            block_length = int.from_bytes(SHORT_BLOCK_DESCRIPTOR.unpack_from(data, pos)[1], "big")
        if block_length not in (0, unit.block_size):
            return S.INVALID_FIELD_IN_PARAMETER_LIST
        pos += bd_len
    current = {PAGE_CACHING: _caching_page(unit), PAGE_CONTROL: _control_page(unit)}
    while pos < len(data):
        if len(data) < pos + 2:
            return S.PARAMETER_LIST_LENGTH_ERROR
        code, spf = data[pos] & 0x3F, data[pos] & 0x40
        page_len = data[pos + 1] + 2
        if len(data) < pos + page_len:
            return S.PARAMETER_LIST_LENGTH_ERROR
        page = bytearray(data[pos : pos + page_len])
        page[0] &= 0x7F  # PS is reserved in MODE SELECT
        if spf or code not in current or bytes(page) != current[code]:
            return S.INVALID_FIELD_IN_PARAMETER_LIST
        pos += page_len
    return None


def _unmap(
    unit: LogicalUnit, data: bytes, max_blocks: int, max_descriptors: int
) -> CheckCondition | None:
    if not data:
        return None
    if len(data) < UNMAP_HEADER.size:
        return S.PARAMETER_LIST_LENGTH_ERROR
    _, descriptors_len = UNMAP_HEADER.unpack_from(data)
    # An incomplete last descriptor is ignored (SBC-3 5.28.2).
    count = min(descriptors_len, len(data) - UNMAP_HEADER.size) // UNMAP_DESCRIPTOR.size
    if count > max_descriptors:
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    ranges = [
        UNMAP_DESCRIPTOR.unpack_from(data, UNMAP_HEADER.size + i * UNMAP_DESCRIPTOR.size)
        for i in range(count)
    ]
    total = 0
    for lba, blocks in ranges:
        if lba + blocks > unit.block_count:
            return S.LBA_OUT_OF_RANGE
        total += blocks
    if total > max_blocks:
        return S.INVALID_FIELD_IN_PARAMETER_LIST
    bs = unit.block_size
    for lba, blocks in ranges:
        if blocks:
            try:
                unit.device.trim(lba * bs, blocks * bs)
            except (BlockDeviceError, OSError) as e:
                return unit.sense_for(e, reading=False)
    return None


def _report_luns(count: int) -> bytes:
    entries = b"".join(
        # peripheral device addressing for LUNs < 256, flat space addressing beyond
        (lun.to_bytes(2, "big") if lun < 256 else (0x4000 | lun).to_bytes(2, "big")) + bytes(6)
        for lun in range(count)
    )
    return REPORT_LUNS_HEADER.pack(len(entries)) + entries
