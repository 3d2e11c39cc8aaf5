"""Parsing of sizes and addresses as operators type them."""

from __future__ import annotations

import re

from firmware.errors import MirrorUnitError

_SIZE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """'512', '64K', '1.5G', '2TiB' -> bytes (binary multiples: G = 2**30).  The one size
    grammar of every command line and the config; exact (no float), and a size that is not
    a whole number of bytes is refused rather than rounded."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512M, 64G, 2T)")
    whole, frac, unit = m.group(1), m.group(2) or "", m.group(3).upper()
    scale = 1 << _SHIFT[unit]
    numerator = int(whole + frac) * scale
    value, rest = divmod(numerator, 10 ** len(frac))
    if rest:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return value


def format_size(n: int) -> str:
    """For people: '1.5 GiB'."""
    for unit in ("T", "G", "M", "K"):
        scale = 1 << _SHIFT[unit]
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:.1f} {unit}iB"
    return f"{n} B"


def format_size_exact(n: int) -> str:
    """For config text that must read back as the same number: '64G', '1536K', '4097'."""
    for unit in ("T", "G", "M", "K"):
        shift = _SHIFT[unit]
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


class RateError(MirrorUnitError, ValueError):
    """Text that is not a transfer rate; the message gives examples."""


_RATE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([kKMGT]?)(iB|B|bit|bps)?\s*(/s)?\s*")
_UNLIMITED = ("0", "unlimited", "none", "off")
_SI = {"": 0, "K": 3, "M": 6, "G": 9, "T": 12}


def parse_rate(text: str) -> int:
    """A rate cap as operators type it -> bytes per second; 0 is no cap.

    Bytes take the size grammar of `parse_size` (binary multiples: '10M/s', '10MB/s' and
    '10MiB/s' are all 10 MiB/s); bits take the decimal multiples every network spec
    uses ('80Mbit/s', '80Mbps': 80,000,000 bit/s = 10,000,000 B/s, rounded down to a
    whole byte).  '0', 'unlimited', 'none' and 'off' mean no cap."""
    s = str(text).strip()
    if s.lower() in _UNLIMITED:
        return 0
    m = _RATE.fullmatch(s)
    if not m:
        raise RateError(f"{text!r} is not a rate (examples: 10MB/s, 512K/s, 80Mbit/s, "
                        "unlimited)")
    whole, frac, prefix, unit = m.group(1), m.group(2) or "", m.group(3).upper(), m.group(4)
    digits = int(whole + frac)
    if unit in ("bit", "bps"):
        bits = digits * 10 ** _SI[prefix]
        value, _ = divmod(bits, 8 * 10 ** len(frac))
        if value == 0 and digits:
            raise RateError(f"{text!r} is less than one byte per second")
        return value
    value, rest = divmod(digits << _SHIFT[prefix], 10 ** len(frac))
    if rest:
        raise RateError(f"rate {text!r} is not a whole number of bytes per second")
    return value


def format_rate(n: int) -> str:
    """The inverse of `parse_rate` for config text: 'unlimited', '10M/s', '10000000/s'."""
    return "unlimited" if n == 0 else f"{format_size_exact(n)}/s"


class AddressError(MirrorUnitError, ValueError):
    """An address an operator typed is not HOST:PORT; the message says what is wrong."""


def split_host_port(text: str, default_port: int | None = None, *,
                    empty_host: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, and where allowed ``HOST`` (given a default port)
    or ``:PORT`` (with `empty_host`: every interface).  The one grammar every command, the
    config and the NBD server read addresses with; ports 0..65535 (0: let the system pick)."""
    s = text.strip()
    if not s:
        raise AddressError("empty address: expected host:port")
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise AddressError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = s[1:close], s[close + 1:]
        if not host:
            raise AddressError(f"{text!r}: empty IPv6 address")
        if rest and not rest.startswith(":"):
            raise AddressError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif s.count(":") > 1:
        raise AddressError(f"{text!r}: write IPv6 addresses as [address]:port")
    elif ":" in s:
        host, port_text = s.split(":", 1)
    else:
        host, port_text = s, None
    if not host and not empty_host:
        raise AddressError(f"{text!r}: expected host:port (the host is missing)")
    if port_text is None:
        if default_port is None:
            raise AddressError(f"{text!r}: expected host:port (the port is missing)")
        return host, default_port
    if not port_text.isdigit():
        raise AddressError(f"{text!r}: port must be a number up to 65535, not {port_text!r}")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"{text!r}: port must be a number up to 65535, not {port}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The inverse of `split_host_port`: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FingerprintError(MirrorUnitError, ValueError):
    """Text that is not a SHA-256 fingerprint."""


_HEX64 = re.compile(r"[0-9a-f]{64}")


def fingerprint_hex(text: str) -> str:
    """A SHA-256 certificate fingerprint as typed (any case, colons or spaces optional)
    -> 64 lowercase hex digits.  The one normaliser the config, pairing and recovery use."""
    s = re.sub(r"[\s:]", "", str(text)).lower()
    if not _HEX64.fullmatch(s):
        raise FingerprintError(
            f"a SHA-256 fingerprint has 64 hex digits (colons optional), got {text!r}")
    return s
