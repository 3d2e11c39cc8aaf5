"""The front-panel link, appliance side: sans-IO frame codec (docs/panel.md).

A frame on the wire is ``0x00 COBS(body) 0x00`` where body is

    version (1 byte) | type (1 byte) | payload (compact JSON, UTF-8) | CRC32C (4 bytes, LE)

and the CRC32C covers version, type and payload.  The decoder takes bytes as they come
and yields a `Frame` or a `BadFrame` per delimited chunk; it never raises on what the
line carries.  Its cost is bounded: a run of more than MAX_ENCODED non-zero bytes is
dropped up to the next delimiter without being buffered, and a payload is parsed only
after its length and CRC are checked.  The panel's MicroPython side (board/panel/
proto.py) implements the same spec.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from cobs import cobs

from ..errors import MirrorUnitError
from ..record import crc32c

VERSION = 1
MAX_PAYLOAD = 400
HEAD = struct.Struct("<BB")
CRC = struct.Struct("<I")
assert HEAD.size == 2 and CRC.size == 4
MAX_BODY = HEAD.size + MAX_PAYLOAD + CRC.size
#: COBS adds one byte per 254 and one in front.
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 2
DELIMITER = b"\x00"


class FrameType(enum.IntEnum):
    HEARTBEAT = 1
    STATUS = 2
    REQUEST = 3
    REPLY = 4


class PanelProtocolError(MirrorUnitError):
    """A frame cannot be built (the appliance's own misuse, not the line's fault)."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadFrame:
    reason: str


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON the panel sends")


def encode_frame(ftype: FrameType, body: dict[str, Any]) -> bytes:
    try:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=True,
                             allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise PanelProtocolError(f"{ftype.name}: cannot encode: {e}") from e
    if len(payload) > MAX_PAYLOAD:
        raise PanelProtocolError(f"{ftype.name}: payload of {len(payload)} bytes over "
                                 f"{MAX_PAYLOAD}")
    raw = HEAD.pack(VERSION, ftype) + payload
    return DELIMITER + cobs.encode(raw + CRC.pack(crc32c(raw))) + DELIMITER


def decode_body(body: bytes) -> Frame | BadFrame:
    """One COBS-decoded body, checked in the order that keeps bad input cheap."""
    if len(body) < HEAD.size + CRC.size:
        return BadFrame(f"short frame of {len(body)} bytes")
    (claimed,) = CRC.unpack_from(body, len(body) - CRC.size)
    raw = body[:-CRC.size]
    if crc32c(raw) != claimed:
        return BadFrame("CRC mismatch")
    version, ftype = HEAD.unpack_from(raw)
    if version != VERSION:
        return BadFrame(f"protocol version {version}, this side speaks {VERSION}")
    try:
        kind = FrameType(ftype)
    except ValueError:
        return BadFrame(f"unknown frame type {ftype}")
    try:
        obj = json.loads(raw[HEAD.size:].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return BadFrame(f"undecodable payload: {e}")
    if not isinstance(obj, dict):
        return BadFrame("payload is not a map")
    if any(isinstance(v, float) and not math.isfinite(v) for v in obj.values()):
        return BadFrame("payload holds a non-finite number")
    return Frame(kind, obj)


class FrameDecoder:
    """Bytes in, frames out.  `errors` counts the bad ones."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._dropping = False
        self.errors = 0

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        events: list[Frame | BadFrame] = []
        start = 0
        while start <= len(data):
            end = data.find(DELIMITER, start)
            chunk = data[start:] if end < 0 else data[start:end]
            if not self._dropping:
                if len(self._buf) + len(chunk) > MAX_ENCODED:
                    self._buf.clear()
                    self._dropping = True
                    self.errors += 1
                    events.append(BadFrame(f"frame over {MAX_ENCODED} bytes"))
                else:
                    self._buf += chunk
            if end < 0:
                break
            if self._dropping:
                self._dropping = False
            elif self._buf:
                events.append(self._finish(bytes(self._buf)))
                self._buf.clear()
            start = end + 1
        return events

    def _finish(self, encoded: bytes) -> Frame | BadFrame:
        try:
            body = cobs.decode(encoded)
        except cobs.DecodeError as e:
            event: Frame | BadFrame = BadFrame(f"bad COBS: {e}")
        else:
            event = decode_body(body)
        if isinstance(event, BadFrame):
            self.errors += 1
        return event
