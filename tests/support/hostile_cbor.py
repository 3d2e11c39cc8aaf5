"""Hostile CBOR shapes shared by the decoder, frame and listener tests."""

from __future__ import annotations

import cbor2


def head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def shared_nesting(levels: int) -> bytes:
    """Shareable i = [shareable i+1, sharedref i+1]: decoded with tags 28/29 honoured,
    one object referenced twice per level, so hashing it (as a map key) costs 2^levels."""
    def level(i: int) -> bytes:
        if i == levels:
            return head(6, 28) + b"\x00"
        return head(6, 28) + b"\x82" + level(i + 1) + head(6, 29) + head(0, i + 1)
    return level(0)


def shared_body(levels: int, ftype: str = "RECOVER_HELLO") -> bytes:
    """A frame-shaped map whose second key is the shared nesting."""
    return b"\xa2" + cbor2.dumps("type") + cbor2.dumps(ftype) + shared_nesting(levels) + b"\x00"
