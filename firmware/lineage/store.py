"""A copy's lineage on disk: one small file beside its store, replaced atomically.

Layout::

    HEADER  magic, format version, header size, body length, CRC32C over the header
            (crc field zero) and the body
    body    CBOR map `Lineage.to_dict()`

The file is replaced with `fsutil.write_atomic`, so a power cut leaves the old lineage or the
new one; the CRC still guards against a torn or rotted file, which is reported with its
location rather than read as a different history. A missing file is a store from before
lineages: `load` returns None and the caller starts one with `Lineage.first`.
"""

from __future__ import annotations

import os
import struct

import cbor2
import crc32c

from .. import cbor_strict
from ..cbor_strict import CborDecodeError
from ..fsutil import write_atomic
from .model import Lineage, LineageError

MAGIC = b"MULINEAG"
FORMAT_VERSION = 1
#: magic, format version, header size, body length, crc32c, reserved
HEADER = struct.Struct("<8sHHII4x")
assert HEADER.size == 24
_CRC_OFFSET = 16
#: a full history is a few KiB; anything far larger is not a lineage file
MAX_BODY = 64 << 10
#: the file's name beside a store
FILE_NAME = "lineage"


class LineageCorruption(LineageError):
    """The lineage file cannot be trusted; says where and why."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: {reason} at offset {offset}")
        self.path = path
        self.offset = offset
        self.reason = reason


def _crc(header: bytes, body: bytes) -> int:
    zeroed = header[:_CRC_OFFSET] + b"\0\0\0\0" + header[_CRC_OFFSET + 4:]
    return int(crc32c.crc32c(body, crc32c.crc32c(zeroed)))


def encode(lineage: Lineage) -> bytes:
    body = cbor2.dumps(lineage.to_dict(), canonical=True)
    if len(body) > MAX_BODY:
        raise LineageError(f"lineage body of {len(body)} bytes exceeds {MAX_BODY}")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, len(body), 0)
    return HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, len(body),
                       _crc(header, body)) + body


def decode(raw: bytes, path: str = "<lineage>") -> Lineage:
    if len(raw) < HEADER.size:
        raise LineageCorruption(path, 0, f"{len(raw)} bytes, the header alone is {HEADER.size} "
                                         f"(torn file)")
    magic, version, hsize, length, crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise LineageCorruption(path, 0, f"bad magic {magic!r}")
    if version != FORMAT_VERSION or hsize != HEADER.size:
        raise LineageCorruption(path, 8, f"unsupported format version {version} (header "
                                         f"{hsize} bytes); this firmware reads version "
                                         f"{FORMAT_VERSION}")
    if length > MAX_BODY:
        raise LineageCorruption(path, 12, f"body length {length} exceeds {MAX_BODY}")
    end = HEADER.size + length
    if len(raw) < end:
        raise LineageCorruption(path, len(raw), f"body ends at {len(raw)}, the header says "
                                                f"{end} (torn file)")
    if len(raw) > end:
        raise LineageCorruption(path, end, f"{len(raw) - end} trailing bytes")
    body = raw[HEADER.size:end]
    if _crc(raw[:HEADER.size], body) != crc:
        raise LineageCorruption(path, _CRC_OFFSET, "CRC32C mismatch")
    try:
        doc = cbor_strict.loads(body)
    except CborDecodeError as e:
        raise LineageCorruption(path, HEADER.size + e.offset,
                                f"body is not CBOR: {e.reason}") from None
    try:
        return Lineage.from_dict(doc)
    except LineageError as e:
        raise LineageCorruption(path, HEADER.size, f"not a valid lineage: {e}") from None


def load(path: str | os.PathLike[str]) -> Lineage | None:
    """The lineage in `path`; None if there is none yet (a store from before lineages)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(HEADER.size + MAX_BODY + 1)
    except FileNotFoundError:
        return None
    return decode(raw, p)


def save(path: str | os.PathLike[str], lineage: Lineage) -> None:
    """Replace the lineage in `path`; durable when this returns."""
    write_atomic(path, encode(lineage), 0o644)
