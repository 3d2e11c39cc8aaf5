"""Strict CBOR decoder for untrusted input (link frames, control requests).

A general CBOR decoder honours tags, indefinite lengths, bignums and arbitrary nesting,
and every one of those lets a few hundred hostile bytes cost seconds of CPU or
gigabytes of memory (shareable/sharedref tags 28/29 alone build a map key whose hash
costs 2^depth).  This decoder accepts exactly the subset our peers encode:

- unsigned integers up to 2^64-1 and negative ones down to -2^63;
- byte strings, UTF-8 text strings, arrays and maps, all of definite length;
- false, true, null; floats (half, single, double) only when the caller allows them.

It refuses, with a `CborDecodeError` naming the reason and the byte offset:

- any tag (major type 6), so no bignums, no shared references, no dates;
- indefinite lengths, reserved additional-information values, other simple values;
- a declared length larger than the input left (checked before anything is
  allocated: a byte string claiming 2^40 bytes in a 20-byte body costs nothing);
- nesting deeper than `max_depth` containers and more than `max_items` items in all
  (a container's declared count is charged when its header is read);
- map keys other than text or integers (checked on the key's first byte, before the
  key is built) and duplicate keys;
- bytes after the one top-level item.

Pure Python, stdlib only: it decodes our frames faster than cbor2's C decoder plus the
pre-scan that would have to walk the same structure to make cbor2 safe (see
docs/replication.md, "Frame decoding").
"""

from __future__ import annotations

import struct
from typing import Any

from firmware.errors import MirrorUnitError

__all__ = ["CborDecodeError", "DEFAULT_MAX_DEPTH", "loads"]

#: Containers nested deeper than this are refused unless the caller says otherwise.
DEFAULT_MAX_DEPTH = 16

_U16 = struct.Struct(">H")
assert _U16.size == 2
_U32 = struct.Struct(">I")
assert _U32.size == 4
_U64 = struct.Struct(">Q")
assert _U64.size == 8
_F16 = struct.Struct(">e")
assert _F16.size == 2
_F32 = struct.Struct(">f")
assert _F32.size == 4
_F64 = struct.Struct(">d")
assert _F64.size == 8

_MIN_I64 = -(1 << 63)

_MAJOR_NAMES = ("unsigned integer", "negative integer", "byte string", "text string",
                "array", "map", "tag", "simple value or float")
_SIMPLE = {20: False, 21: True, 22: None}
#: Tags a peer might plausibly send, named in the refusal so a log line explains itself.
_TAG_NAMES = {
    0: "a date/time string", 1: "an epoch date/time",
    2: "a bignum: integers must fit an unsigned or signed 64-bit integer",
    3: "a negative bignum: integers must fit an unsigned or signed 64-bit integer",
    4: "a decimal fraction", 5: "a bigfloat", 24: "embedded CBOR",
    28: "a shareable value", 29: "a shared reference", 258: "a set",
    55799: "the self-described CBOR marker",
}


class CborDecodeError(MirrorUnitError, ValueError):
    """Input outside the strict subset; `offset` is where in the input it was found."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"{reason} (at byte {offset})")
        self.reason = reason
        self.offset = offset


class _Decoder:
    __slots__ = ("data", "end", "pos", "items", "max_items", "max_depth", "max_length",
                 "floats")

    def __init__(self, data: bytes, max_depth: int, max_items: int, max_length: int,
                 floats: bool) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.items = 0
        self.max_items = max_items
        self.max_depth = max_depth
        self.max_length = max_length
        self.floats = floats

    def _argument(self, start: int, info: int) -> int:
        """The head's argument for additional information `info` >= 24; moves `pos`."""
        data, pos = self.data, self.pos
        if info == 24:
            if pos + 1 > self.end:
                raise CborDecodeError("input ends inside an item head", start)
            self.pos = pos + 1
            return data[pos]
        if info == 25:
            if pos + 2 > self.end:
                raise CborDecodeError("input ends inside an item head", start)
            self.pos = pos + 2
            return _U16.unpack_from(data, pos)[0]  # type: ignore[no-any-return]
        if info == 26:
            if pos + 4 > self.end:
                raise CborDecodeError("input ends inside an item head", start)
            self.pos = pos + 4
            return _U32.unpack_from(data, pos)[0]  # type: ignore[no-any-return]
        if info == 27:
            if pos + 8 > self.end:
                raise CborDecodeError("input ends inside an item head", start)
            self.pos = pos + 8
            return _U64.unpack_from(data, pos)[0]  # type: ignore[no-any-return]
        major = data[start] >> 5
        if info == 31 and major in (2, 3, 4, 5):
            raise CborDecodeError(f"indefinite-length {_MAJOR_NAMES[major]} is refused", start)
        raise CborDecodeError(
            f"additional information {info} is not valid in the head of major type {major} "
            f"({_MAJOR_NAMES[major]})", start)

    def _count(self, start: int, n: int, what: str, per: int) -> None:
        """Charge a container of `n` entries of `per` items before building it."""
        if n * per > self.end - self.pos:
            raise CborDecodeError(
                f"{what} declares {n} entries but only {self.end - self.pos} bytes remain",
                start)
        if n > self.max_length:
            raise CborDecodeError(f"{what} of {n} entries, limit {self.max_length}", start)
        self.items += n * per
        if self.items > self.max_items:
            raise CborDecodeError(f"more than {self.max_items} items", start)

    def item(self, depth: int) -> Any:
        data = self.data
        start = self.pos
        if start >= self.end:
            raise CborDecodeError("input ends where an item should start", start)
        ib = data[start]
        major = ib >> 5
        info = ib & 0x1F
        self.pos = start + 1
        if major == 7:
            return self._simple(start, info)
        arg = info if info < 24 else self._argument(start, info)
        if major == 0:
            return arg
        if major == 1:
            if arg > -1 - _MIN_I64:
                raise CborDecodeError(
                    "negative integer below -2^63 (must fit a signed 64-bit integer)", start)
            return -1 - arg
        if major == 2 or major == 3:
            pos = self.pos
            if arg > self.end - pos:
                raise CborDecodeError(
                    f"{_MAJOR_NAMES[major]} declares {arg} bytes but only "
                    f"{self.end - pos} remain", start)
            self.pos = pos + arg
            if major == 2:
                return data[pos:pos + arg]
            try:
                return data[pos:pos + arg].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborDecodeError(f"text string is not UTF-8: {exc.reason}",
                                      pos + exc.start) from None
        if major == 6:
            name = _TAG_NAMES.get(arg)
            raise CborDecodeError(
                f"tag {arg}{f' ({name})' if name else ''} is refused: no tags are accepted",
                start)
        depth += 1
        if depth > self.max_depth:
            raise CborDecodeError(f"containers nest deeper than {self.max_depth}", start)
        if major == 4:
            self._count(start, arg, "array", 1)
            return self._array(arg, depth)
        self._count(start, arg, "map", 2)
        out: dict[Any, Any] = {}
        for _ in range(arg):
            kpos = self.pos
            # A tag is left to item(), which refuses it naming the tag.
            if kpos < self.end and (data[kpos] >> 5) not in (0, 1, 3, 6):
                raise CborDecodeError(
                    f"map key is of type {_MAJOR_NAMES[data[kpos] >> 5]}; only text and "
                    "integer keys are accepted", kpos)
            key = self.item(depth)
            if key in out:
                raise CborDecodeError(f"duplicate map key {key!r:.64}", kpos)
            out[key] = self.item(depth)
        return out

    def _array(self, n: int, depth: int) -> list[Any]:
        # Integers (WRITES record headers, chunk lists) are the bulk of a frame's items:
        # decode the common heads inline and leave everything else to item().
        data, end = self.data, self.end
        out: list[Any] = []
        append = out.append
        pos = self.pos
        for _ in range(n):
            ib = data[pos] if pos < end else -1
            if 0 <= ib < 0x18:
                append(ib)
                pos += 1
            elif ib == 0x1B and pos + 9 <= end:
                append(_U64.unpack_from(data, pos + 1)[0])
                pos += 9
            elif ib == 0x1A and pos + 5 <= end:
                append(_U32.unpack_from(data, pos + 1)[0])
                pos += 5
            elif ib == 0x19 and pos + 3 <= end:
                append(_U16.unpack_from(data, pos + 1)[0])
                pos += 3
            elif ib == 0x18 and pos + 2 <= end:
                append(data[pos + 1])
                pos += 2
            elif 0x80 <= ib < 0x98 and depth < self.max_depth:
                # A short array (a record header): the same checks as item(), inline.
                self.pos = pos + 1
                self._count(pos, ib - 0x80, "array", 1)
                append(self._array(ib - 0x80, depth + 1))
                pos = self.pos
            else:
                self.pos = pos
                append(self.item(depth))
                pos = self.pos
        self.pos = pos
        return out

    def _simple(self, start: int, info: int) -> Any:
        if info in _SIMPLE:
            return _SIMPLE[info]
        if 25 <= info <= 27:
            if not self.floats:
                raise CborDecodeError("floating-point numbers are not accepted here", start)
            size = 1 << (info - 24)
            pos = self.pos
            if pos + size > self.end:
                raise CborDecodeError("input ends inside a float", start)
            self.pos = pos + size
            fmt = _F16 if info == 25 else _F32 if info == 26 else _F64
            return fmt.unpack_from(self.data, pos)[0]
        if info == 31:
            raise CborDecodeError("break outside an indefinite-length item", start)
        raise CborDecodeError(f"simple value {info} is refused", start)


def loads(data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH,
          max_items: int | None = None, max_length: int | None = None,
          floats: bool = False) -> Any:
    """The one CBOR item that is the whole of `data`, or `CborDecodeError`.

    `max_items` bounds the items of the whole document (every array element, map key
    and map value counts) and `max_length` the entries of any one array or map; both
    are checked on a container's head, before it is built.  By default both are the
    input's length, which nothing can exceed anyway as every item takes a byte."""
    buf = data if type(data) is bytes else bytes(data)
    limit = len(buf)
    dec = _Decoder(buf, max_depth, limit if max_items is None else max_items,
                   limit if max_length is None else max_length, floats)
    value = dec.item(0)
    if dec.pos != dec.end:
        trailing = dec.end - dec.pos
        what = "byte trails" if trailing == 1 else "bytes trail"
        raise CborDecodeError(f"{trailing} {what} the top-level item", dec.pos)
    return value
