"""Argument types the apps' command lines share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..units import parse_rate, parse_size


def size(text: str) -> int:
    """A size in bytes: '4096', '1G', '256M'..."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def rate(text: str) -> int:
    """A rate cap in bytes/s: '10MB/s', '80Mbit/s', '2M'; 0 or 'unlimited': none."""
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def u16(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: not a number (e.g. 0x1d6b)") from e
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text}: must fit in 16 bits")
    return value


def ascii_text(width: int) -> Callable[[str], str]:
    """Printable ASCII of at most `width` characters (USB and SCSI strings)."""
    def check(text: str) -> str:
        if not text.isascii() or len(text) > width or not text.isprintable():
            raise argparse.ArgumentTypeError(
                f"{text!r}: at most {width} printable ASCII characters")
        return text
    return check
