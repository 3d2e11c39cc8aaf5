"""Field types of the configuration schema: how one value is parsed from the text a
user typed, checked and normalised from any source, and shown."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .. import units
from ..units import join_host_port
from .errors import ConfigError
from .kdf import check_password_hash, parse_seal_key_text

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$")


class FieldType:
    """How a field's value is parsed from text, checked, and shown."""

    def parse(self, key: str, text: str) -> Any:
        return self.check(key, text)

    def check(self, key: str, value: Any) -> Any:
        raise NotImplementedError

    def display(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list | dict):
            return json.dumps(value, sort_keys=True)
        return str(value)


def _need_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected text, got {type(value).__name__}")
    return value


def _need_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {type(value).__name__}")
    return value


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not an integer") from None


class Text(FieldType):
    def __init__(self, max_len: int, *, min_len: int = 0, ascii_printable: bool = True,
                 pattern: re.Pattern[str] | None = None, what: str = "") -> None:
        self.max_len = max_len
        self.min_len = min_len
        self.ascii_printable = ascii_printable
        self.pattern = pattern
        self.what = what

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if len(s) > self.max_len:
            raise ConfigError(key, f"at most {self.max_len} characters, got {len(s)}")
        if len(s) < self.min_len:
            raise ConfigError(key, f"at least {self.min_len} characters")
        if self.ascii_printable and any(not 0x20 <= ord(c) <= 0x7E for c in s):
            raise ConfigError(key, "only printable ASCII characters are allowed")
        if s and self.pattern is not None and not self.pattern.match(s):
            raise ConfigError(key, f"{s!r} is not {self.what}")
        return s


class Choice(FieldType):
    def __init__(self, *values: str) -> None:
        self.values = values

    def parse(self, key: str, text: str) -> str:
        return self.check(key, text.strip().lower())

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if s not in self.values:
            raise ConfigError(key, f"{s!r} is not one of {', '.join(self.values)}")
        return s


class Integer(FieldType):
    def __init__(self, lo: int, hi: int, *, optional: bool = False, hex_: bool = False,
                 none_text: str = "default") -> None:
        self.lo, self.hi, self.optional, self.hex = lo, hi, optional, hex_
        self.none_text = none_text

    def parse(self, key: str, text: str) -> int | None:
        if self.optional and text.strip().lower() in ("", "none", "default", self.none_text):
            return None
        return self.check(key, _parse_int(key, text))

    def check(self, key: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        n = _need_int(key, value)
        if not self.lo <= n <= self.hi:
            lo, hi = (hex(self.lo), hex(self.hi)) if self.hex else (self.lo, self.hi)
            raise ConfigError(key, f"{n} is outside {lo}..{hi}")
        return n

    def display(self, value: Any) -> str:
        if value is None:
            return self.none_text if self.optional else ""
        return hex(value) if self.hex else str(value)


class Real(FieldType):
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def parse(self, key: str, text: str) -> float:
        try:
            v = float(text.strip().rstrip("%")) / (100.0 if text.strip().endswith("%") else 1.0)
        except ValueError:
            raise ConfigError(key, f"{text!r} is not a number") from None
        return self.check(key, v)

    def check(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {type(value).__name__}")
        v = float(value)
        if math.isnan(v) or not self.lo <= v <= self.hi:
            raise ConfigError(key, f"{v} is outside {self.lo}..{self.hi}")
        return v


class Boolean(FieldType):
    _WORDS = {"yes": True, "true": True, "on": True, "1": True,
              "no": False, "false": False, "off": False, "0": False}

    def parse(self, key: str, text: str) -> bool:
        try:
            return self._WORDS[text.strip().lower()]
        except KeyError:
            raise ConfigError(key, f"{text!r} is not yes/no") from None

    def check(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected yes/no, got {type(value).__name__}")
        return value


def parse_size(text: str) -> int:
    """The size grammar of `firmware.units` (one for the config and every command line)."""
    return units.parse_size(text)


def format_size(n: int) -> str:
    return units.format_size_exact(n)


class Size(FieldType):
    """Bytes; 0 means "automatic" where `zero_means` says so."""

    #: Sizes above this are refused: nothing here is that large, and the config's own
    #: encoding (firmware/cbor_strict.py reads it back) holds integers of 64 bits.
    MAXIMUM = 1 << 60

    def __init__(self, *, minimum: int, multiple: int, zero_means: str | None = None,
                 maximum: int = MAXIMUM) -> None:
        self.minimum, self.multiple, self.zero_means = minimum, multiple, zero_means
        self.maximum = maximum

    def parse(self, key: str, text: str) -> int:
        if self.zero_means is not None and text.strip().lower() in ("auto", self.zero_means):
            return 0
        try:
            return self.check(key, parse_size(text))
        except ValueError as e:
            raise ConfigError(key, str(e)) from None

    def check(self, key: str, value: Any) -> int:
        n = _need_int(key, value)
        if n == 0 and self.zero_means is not None:
            return 0
        if n < self.minimum:
            raise ConfigError(key, f"{n} bytes is below the minimum of {format_size(self.minimum)}")
        if n % self.multiple:
            raise ConfigError(key, f"{n} bytes is not a multiple of {self.multiple}")
        if n > self.maximum:
            raise ConfigError(key, f"{n} bytes is above the maximum of "
                                   f"{format_size(self.maximum)}")
        return n

    def display(self, value: Any) -> str:
        if value == 0 and self.zero_means is not None:
            return self.zero_means
        return format_size(value)


class Rate(FieldType):
    """Bytes per second in the grammar of `firmware.units.parse_rate` (10MB/s,
    80Mbit/s); 0 means no cap, shown as 'unlimited'."""

    def __init__(self, *, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, key: str, text: str) -> int:
        try:
            return self.check(key, units.parse_rate(text))
        except units.RateError as e:
            raise ConfigError(key, str(e)) from None

    def check(self, key: str, value: Any) -> int:
        n = _need_int(key, value)
        if n == 0:
            return 0
        if n < self.minimum:
            raise ConfigError(key, f"{n} bytes/s is below the minimum of "
                              f"{units.format_rate(self.minimum)} (0 or unlimited: no cap)")
        if n > self.maximum:
            raise ConfigError(key, f"{n} bytes/s is above the maximum of "
                              f"{units.format_rate(self.maximum)} (0 or unlimited: no cap)")
        return n

    def display(self, value: Any) -> str:
        return units.format_rate(value)


class IpAddress(FieldType):
    def __init__(self, *, optional: bool = True) -> None:
        self.optional = optional

    def parse(self, key: str, text: str) -> str:
        return self.check(key, text.strip())

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if not s and self.optional:
            return ""
        try:
            return str(ipaddress.ip_address(s))
        except ValueError:
            raise ConfigError(key, f"{s!r} is not an IP address") from None


class Netmask(FieldType):
    """A dotted IPv4 mask or a prefix length; stored as the prefix length text."""

    def parse(self, key: str, text: str) -> str:
        return self.check(key, text.strip().lstrip("/"))

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value).lstrip("/")
        if not s:
            return ""
        if s.isdigit():
            if not 0 <= int(s) <= 128:
                raise ConfigError(key, f"prefix length {s} is outside 0..128")
            return str(int(s))
        try:
            return str(ipaddress.IPv4Network(f"0.0.0.0/{s}").prefixlen)
        except ValueError:
            raise ConfigError(key, f"{s!r} is not a netmask (e.g. 255.255.255.0 or 24)") from None


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a JSON list: {e}") from None
        if not isinstance(items, list):
            raise ValueError("not a JSON list")
        return items
    return [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]


class ListOf(FieldType):
    def __init__(self, item: FieldType, *, max_items: int, unique: bool = True) -> None:
        self.item, self.max_items, self.unique = item, max_items, unique

    def parse(self, key: str, text: str) -> list[Any]:
        if isinstance(self.item, Record):
            # Structured entries only make sense as JSON: a list, or one object.
            try:
                value = json.loads(text) if text.strip() else []
            except ValueError as e:
                raise ConfigError(key, f"expected a JSON list of objects: {e}") from None
            return self.check(key, [value] if isinstance(value, dict) else value)
        try:
            items = _split_list(text)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
        return self.check(key, [self.item.parse(f"{key}[{i}]", it) if isinstance(it, str)
                                else it for i, it in enumerate(items)])

    def check(self, key: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ConfigError(key, f"at most {self.max_items} entries, got {len(value)}")
        out = [self.item.check(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if self.unique:
            seen: set[str] = set()
            for i, v in enumerate(out):
                ident = json.dumps(v, sort_keys=True)
                if ident in seen:
                    raise ConfigError(f"{key}[{i}]", "duplicate entry")
                seen.add(ident)
        return out

    def display(self, value: Any) -> str:
        if all(isinstance(v, str) for v in value):
            return ", ".join(value)
        return json.dumps(value, sort_keys=True)


class Email(FieldType):
    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional

    def parse(self, key: str, text: str) -> str:
        return self.check(key, text.strip())

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if not s and self.optional:
            return ""
        if not _EMAIL.match(s):
            raise ConfigError(key, f"{s!r} is not an e-mail address")
        return s


def _check_host(key: str, host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels):
        raise ConfigError(key, f"{host!r} is neither an IP address nor a host name")
    return host.rstrip(".").lower()


def split_host_port(key: str, text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port', or a bare host when a default port is allowed (the grammar
    of `firmware.units.split_host_port`, with the host checked and port 0 refused)."""
    try:
        host, port = units.split_host_port(text, default_port)
    except units.AddressError as exc:
        raise ConfigError(key, str(exc)) from None
    if port == 0:
        raise ConfigError(key, f"{text.strip()!r}: port must be 1..65535")
    return _check_host(key, host), port


class HostPort(FieldType):
    def __init__(self, *, optional: bool = False, default_port: int | None = None) -> None:
        self.optional, self.default_port = optional, default_port

    def parse(self, key: str, text: str) -> str:
        return self.check(key, text.strip())

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if not s and self.optional:
            return ""
        return join_host_port(*split_host_port(key, s, self.default_port))


def normalise_fingerprint(key: str, value: Any) -> str:
    """SHA-256 hex, colons optional, any case -> 64 lowercase hex digits."""
    try:
        return units.fingerprint_hex(_need_str(key, value))
    except units.FingerprintError:
        raise ConfigError(
            key, "must be a SHA-256 fingerprint: 64 hex digits, colons optional") from None


class Record(FieldType):
    """A map with named members, each checked by its own type."""

    def __init__(self, members: Mapping[str, tuple[FieldType, bool]],
                 one_of: tuple[str, ...] = ()) -> None:
        self.members = members  # name -> (type, required)
        self.one_of = one_of

    def parse(self, key: str, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            raise ConfigError(key, "expected a JSON object") from None
        return self.check(key, value)

    def check(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a map, got {type(value).__name__}")
        unknown = set(value) - set(self.members)
        if unknown:
            raise ConfigError(key, f"unknown member(s): {', '.join(sorted(map(str, unknown)))}")
        out: dict[str, Any] = {}
        for name, (kind, required) in self.members.items():
            if name not in value or value[name] in ("", None):
                if required:
                    raise ConfigError(f"{key}.{name}", "is required")
                continue
            out[name] = kind.check(f"{key}.{name}", value[name])
        if self.one_of and sum(1 for n in self.one_of if n in out) != 1:
            raise ConfigError(key, f"needs exactly one of {', '.join(self.one_of)}")
        return out


class Fingerprint(FieldType):
    def check(self, key: str, value: Any) -> str:
        return normalise_fingerprint(key, value)


class Port(Integer):
    def __init__(self) -> None:
        super().__init__(1, 65535)


class _PasswordDerived(FieldType):
    """A value that follows the admin password: never typed, checked by `_validate`
    when set, shown only as set / not set."""

    refusal = ""

    def parse(self, key: str, text: str) -> str:
        raise ConfigError(key, self.refusal)

    def _validate(self, key: str, value: str) -> None:
        raise NotImplementedError

    def check(self, key: str, value: Any) -> str:
        s = _need_str(key, value)
        if s:
            self._validate(key, s)
        return s

    def display(self, value: Any) -> str:
        return "set" if value else "not set"


class PasswordHash(_PasswordDerived):
    """Only ever set through set_admin_password()."""

    refusal = "cannot be set directly; use the admin password command"

    def _validate(self, key: str, value: str) -> None:
        check_password_hash(key, value)


class SealKeyText(_PasswordDerived):
    """The admin password's derived seal key (see seal.py): set with the password."""

    refusal = "cannot be set directly; it follows the admin password"

    def _validate(self, key: str, value: str) -> None:
        parse_seal_key_text(key, value)


class SecretText(Text):
    """A secret typed as text (SNMPv3 keys); shown only as set / not set."""

    def display(self, value: Any) -> str:
        return "set" if value else "not set"
