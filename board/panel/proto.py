# MirrorUnit front panel: the link protocol, panel side (docs/panel.md "Link protocol").
# Plain MicroPython (runs on the RP2040 and on the Unix port); the appliance side is
# firmware/panel/codec.py, written against the same spec.
#
# A frame on the wire is 0x00, COBS(body), 0x00 where body is
#   version (1 byte) | type (1 byte) | payload (compact JSON, UTF-8) | CRC32C (4 bytes, LE)
# and the CRC covers version, type and payload.  The leading 0x00 ends whatever half
# frame a pulled cable or a restart left on the line, so the next frame is read whole.

import json

VERSION = 1
HEARTBEAT = 1
STATUS = 2
REQUEST = 3
REPLY = 4
TYPES = (HEARTBEAT, STATUS, REQUEST, REPLY)

MAX_PAYLOAD = 400
MAX_BODY = 2 + MAX_PAYLOAD + 4
# COBS adds one byte per 254 and one in front
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 2

_TABLE = None


def _table():
    global _TABLE
    if _TABLE is None:
        t = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            t.append(c)
        _TABLE = t
    return _TABLE


def crc32c(data):
    t = _table()
    c = 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def cobs_encode(data):
    out = bytearray()
    block = bytearray()
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out.extend(block)
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out.append(255)
                out.extend(block)
                block = bytearray()
    out.append(len(block) + 1)
    out.extend(block)
    return bytes(out)


def cobs_decode(data):
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("zero byte inside a COBS block")
        i += 1
        end = i + code - 1
        if end > n:
            raise ValueError("COBS block runs past the frame")
        out.extend(data[i:end])
        i = end
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)


def encode(ftype, obj):
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes over %d" % (len(payload), MAX_PAYLOAD))
    body = bytes((VERSION, ftype)) + payload
    c = crc32c(body)
    body += bytes((c & 0xFF, (c >> 8) & 0xFF, (c >> 16) & 0xFF, c >> 24))
    return b"\x00" + cobs_encode(body) + b"\x00"


def decode_body(body):
    """(type, object) of one COBS-decoded body; ValueError says why not."""
    if len(body) < 6:
        raise ValueError("short frame")
    claimed = body[-4] | body[-3] << 8 | body[-2] << 16 | body[-1] << 24
    if crc32c(body[:-4]) != claimed:
        raise ValueError("bad CRC")
    if body[0] != VERSION:
        raise ValueError("version %d" % body[0])
    if body[1] not in TYPES:
        raise ValueError("type %d" % body[1])
    obj = json.loads(body[2:-4])
    if not isinstance(obj, dict):
        raise ValueError("payload is not a map")
    return body[1], obj


class Decoder:
    """Bytes in, frames out; bad frames are counted and skipped, never raised."""

    def __init__(self):
        self.buf = bytearray()
        self.dropping = False
        self.errors = 0
        self.last_error = ""

    def feed(self, data):
        frames = []
        for b in data:
            if b != 0:
                if self.dropping:
                    continue
                if len(self.buf) >= MAX_ENCODED:
                    # over the limit: skip to the next delimiter
                    self._bad("frame over %d bytes" % MAX_ENCODED)
                    self.buf = bytearray()
                    self.dropping = True
                    continue
                self.buf.append(b)
                continue
            if self.dropping:
                self.dropping = False
                continue
            if not self.buf:
                continue  # the delimiter in front of a frame
            raw = bytes(self.buf)
            self.buf = bytearray()
            try:
                frames.append(decode_body(cobs_decode(raw)))
            except ValueError as e:
                self._bad(str(e))
        return frames

    def _bad(self, why):
        self.errors += 1
        self.last_error = why
