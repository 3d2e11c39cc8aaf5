"""Self-checking on-disk records: CRC32C, fixed headers that carry their own CRC, and the
one error every reader raises when stored bytes fail a check.

Every on-disk format of the unit (the CBQ's records and superblock, the remote journals'
records and segment headers, the config slots) is a fixed little-endian header, maybe
followed by a payload.  The header's first field is the format's magic, its second the
format version and its last a u32 CRC32C over the header (that field zero) and then the
payload, so neither a torn header nor a torn payload passes.  A `HeaderFormat` holds one
such layout: `pack` fills in the CRC; `unpack` refuses bytes that are short, of another
format or of another version; `check` refuses a CRC mismatch.  Every refusal is one
`IntegrityError(path, offset, reason)`, whether the reader then ends a log at a torn tail
or reports corruption (borg's `LoggedIO._read`, which raises with segment and offset).

The module decides no layout: each format keeps its own struct, and the bytes on disk are
exactly those the formats wrote before they shared this code.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c

from firmware.errors import MirrorUnitError

Buffer = bytes | bytearray | memoryview

_CRC = struct.Struct("<I")
assert _CRC.size == 4
# The CRC is the last field; only pad bytes ("4x") may follow it.
_LAYOUT = re.compile(r"<(?P<before>.*)I(?P<pad>\d*x)?")


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `value`."""
    return int(_crc32c.crc32c(data, value))


class IntegrityError(MirrorUnitError):
    """Stored bytes failed a check: where (`path`, `offset`; either may be unknown) and why.

    Domain errors (`CbqCorruption`, `JournalCorruption`) derive from it, so one except
    clause catches corruption of any format.
    """

    # Exception.__init__ is left alone on purpose: `args` stays what the constructor was
    # called with, so subclasses with their own signatures still pickle and repr right.
    def __init__(self, path: str | None, offset: int | None, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        where = f" in {self.path}" if self.path is not None else ""
        if self.offset is not None:
            where += f" at offset {self.offset}"
        return f"{self.reason}{where}"


@dataclass(frozen=True, slots=True)
class HeaderFormat:
    """One fixed header layout: magic first, version second, a u32 CRC32C last."""

    #: What the header heads, for reasons ("record", "superblock", "slot").
    name: str
    layout: struct.Struct
    magic: bytes | int
    version: int
    #: Where the CRC sits in the header (derived from the layout).
    crc_offset: int = field(init=False)

    def __post_init__(self) -> None:
        m = _LAYOUT.fullmatch(self.layout.format)
        if m is None:
            raise ValueError(f"{self.name}: layout {self.layout.format!r} must be "
                             "little-endian and end in a u32 CRC (pad bytes may follow)")
        object.__setattr__(self, "crc_offset", struct.calcsize("<" + m["before"]))

    @property
    def size(self) -> int:
        return self.layout.size

    def pack(self, *fields: Any, payload: Buffer = b"") -> tuple[bytes, int]:
        """The header holding `fields` (those between the version and the CRC), with the
        CRC over it and `payload`; returns (header bytes, CRC)."""
        raw = bytearray(self.layout.pack(self.magic, self.version, *fields, 0))
        crc = crc32c(payload, crc32c(raw))
        _CRC.pack_into(raw, self.crc_offset, crc)
        return bytes(raw), crc

    def unpack(self, raw: Buffer, *, path: str | None = None,
               offset: int | None = None) -> tuple[Any, ...]:
        """The fields between the version and the CRC, then the CRC the header claims.

        Refuses what is short or not this format and version; the CRC is checked by
        `check` (often only once the payload it covers has been read).
        """
        if len(raw) < self.size:
            raise IntegrityError(path, offset,
                                 f"{self.name} truncated: {len(raw)} of {self.size} bytes")
        fields = self.layout.unpack_from(raw)
        if fields[0] != self.magic:
            raise IntegrityError(path, offset, f"not a {self.name}: bad magic {fields[0]!r}")
        if fields[1] != self.version:
            raise IntegrityError(path, offset, f"unsupported {self.name} format {fields[1]}")
        return tuple(fields[2:])

    def crc_ok(self, raw: Buffer, payload: Buffer = b"") -> bool:
        """Whether the CRC in header `raw` covers it and `payload` (for walks that treat a
        failure as the end of a log; everything else calls `check`)."""
        if len(raw) < self.size:
            return False
        head = bytearray(raw[:self.size])
        (claimed,) = _CRC.unpack_from(head, self.crc_offset)
        _CRC.pack_into(head, self.crc_offset, 0)
        return crc32c(payload, crc32c(head)) == claimed

    def check(self, raw: Buffer, payload: Buffer = b"", *, path: str | None = None,
              offset: int | None = None) -> None:
        """Raise unless the CRC in header `raw` covers it and `payload`."""
        if not self.crc_ok(raw, payload):
            raise IntegrityError(path, offset, f"{self.name} CRC mismatch")

    def verify(self, raw: Buffer, payload: Buffer = b"", *, path: str | None = None,
               offset: int | None = None) -> tuple[Any, ...]:
        """`unpack` and `check` in one: the fields of a header proven whole with its payload."""
        fields = self.unpack(raw, path=path, offset=offset)
        self.check(raw, payload, path=path, offset=offset)
        return fields
