"""Parsing of sizes and addresses as operators type them."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512', '64K', '1.5G', '2TiB' -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512, 64K, 1G)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _SUFFIX[unit] and n % (_SUFFIX[unit] // 1024 or 1) == 0:
            return f"{n / _SUFFIX[unit]:.1f} {unit}iB"
    return f"{n} B"
