"""The configuration schema: one table of fields, their types, defaults and rules.

A configuration is a flat mapping of dotted keys to plain values (str, int, float,
bool, None, lists and maps of those), so the same document goes to CBOR on the
config partition and to JSON for scripting without a translation layer.

Every value is checked twice: `parse` turns the text a user typed (`config set`)
into a value, `check` verifies and normalises a value from any source (a stored
document, an import, `parse`).  Cross-field rules run after every field passed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: Bumped when a field changes meaning or shape; older documents are migrated on load.
SCHEMA_VERSION = 1

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BoardLimits:
    """What the board can hold; passed in by whoever knows the hardware."""

    max_volume_bytes: int | None = None


# ------------------------------------------------------------------ field types


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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """'64G', '512MiB', '1.5T', '4096' -> bytes (suffixes are binary: G = 2**30)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512M, 64G, 2T)")
    number, unit = m.group(1), m.group(2).upper()
    scale = 1 << _SIZE_SHIFT[unit]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
    else:
        value = int(number) * scale
    return value


def format_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


class Size(FieldType):
    """Bytes; 0 means "automatic" where `zero_means` says so."""

    def __init__(self, *, minimum: int, multiple: int, zero_means: str | None = None) -> None:
        self.minimum, self.multiple, self.zero_means = minimum, multiple, zero_means

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
        return n

    def display(self, value: Any) -> str:
        if value == 0 and self.zero_means is not None:
            return self.zero_means
        return format_size(value)


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
    """'host:port', '[v6]:port', or a bare host when a default port is allowed."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ConfigError(key, f"{s!r}: missing ']' after an IPv6 address")
        host, rest = s[1:end], s[end + 1:]
        if rest and not rest.startswith(":"):
            raise ConfigError(key, f"{s!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else ""
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    elif s.count(":") > 1:
        raise ConfigError(key, f"{s!r}: write IPv6 addresses as [address]:port")
    else:
        host, port_text = s, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(key, f"{s!r}: expected host:port")
        port = default_port
    elif not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(key, f"{s!r}: port must be 1..65535")
    else:
        port = int(port_text)
    return _check_host(key, host), port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    s = _need_str(key, value).replace(":", "").strip().lower()
    if not _HEX64.match(s):
        raise ConfigError(key, "must be a SHA-256 fingerprint: 64 hex digits, colons optional")
    return s


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
        from .password import check_hash_format

        check_hash_format(key, value)


class SealKeyText(_PasswordDerived):
    """The admin password's derived seal key (see seal.py): set with the password."""

    refusal = "cannot be set directly; it follows the admin password"

    def _validate(self, key: str, value: str) -> None:
        from .seal import parse_seal_key

        parse_seal_key(key, value)


class SecretText(Text):
    """A secret typed as text (SNMPv3 keys); shown only as set / not set."""

    def display(self, value: Any) -> str:
        return "set" if value else "not set"


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Field:
    key: str
    type: FieldType
    default: Any
    description: str
    #: True when a change takes effect without restarting the unit's processes.
    live: bool
    secret: bool = False


_PEER = Record({
    "name": (Text(63, min_len=1, pattern=_HOSTNAME_LABEL, what="a unit name"), True),
    "address": (HostPort(), True),
    "fingerprint": (Fingerprint(), True),
})

_SNMP_TARGET = Record({
    "host": (HostPort(default_port=162), True),
    "port": (Port(), False),
    "community": (Text(64, min_len=1), False),
    "v3_user": (Text(32, min_len=1), False),
}, one_of=("community", "v3_user"))

FIELDS: tuple[Field, ...] = (
    Field("unit.name", Text(63, min_len=1, pattern=_HOSTNAME_LABEL, what="a host name label"),
          "mirrorunit", "unit name, also the host name", live=True),
    Field("unit.serial", Text(32), "", "serial number (set at manufacture)", live=False),
    Field("role", Choice("local", "remote"), "local",
          "local: USB disk for a host; remote: receives mirrors", live=False),
    # Live: written for systemd-networkd and reconfigured when saved on the unit
    # (firmware/config/network.py); no unit process reads them.
    Field("network.mode", Choice("dhcp", "static"), "dhcp",
          "address assignment of the wired interfaces", live=True),
    Field("network.address", IpAddress(), "", "static address", live=True),
    Field("network.netmask", Netmask(), "", "static netmask or prefix length", live=True),
    Field("network.gateway", IpAddress(), "", "default gateway", live=True),
    Field("network.dns", ListOf(IpAddress(optional=False), max_items=3), [],
          "name servers (with dhcp: used instead of the ones DHCP offers)", live=True),
    Field("peers", ListOf(_PEER, max_items=8), [],
          "remote units: name, host:port, SHA-256 certificate fingerprint", live=True),
    Field("admin.password_hash", PasswordHash(), "", "administrator password (hashed)",
          live=True, secret=True),
    Field("admin.seal_key", SealKeyText(), "",
          "key sealing the peer backup, derived from the admin password",
          live=True, secret=True),
    Field("volume.size", Size(minimum=1 << 20, multiple=4096, zero_means="auto"), 0,
          "size of the USB volume in bytes (auto: the whole data partition)", live=False),
    Field("buffer.size", Size(minimum=1 << 20, multiple=4096, zero_means="auto"), 0,
          "size of the circular buffer queue in bytes (auto: the whole buffer partition)",
          live=False),
    Field("buffer.high_water", Real(0.5, 0.95), 0.8,
          "buffer fill ratio that switches the queue to compact mode", live=True),
    Field("cache.mode", Choice("write-through", "write-back"), "write-through",
          "write-back acknowledges from RAM; only safe with a working UPS", live=True),
    Field("scsi.vendor", Text(8), "MIRROR", "SCSI INQUIRY vendor (8 ASCII)", live=False),
    Field("scsi.product", Text(16), "MirrorUnit", "SCSI INQUIRY product (16 ASCII)", live=False),
    Field("scsi.lun", Integer(0, 7), 0, "SCSI logical unit number", live=False),
    Field("ups.model", Choice("none", "ina219", "max17048", "max17040", "gpio"), "none",
          "UPS monitor chip or power-loss input", live=False),
    Field("ups.i2c_bus", Integer(0, 255), 1, "I2C bus number (/dev/i2c-N)", live=False),
    Field("ups.i2c_address", Integer(0x03, 0x77, optional=True, hex_=True), None,
          "I2C address (default: the chip's usual address)", live=False),
    Field("ups.gpio_pin", Integer(0, 53, optional=True, none_text="none"), None,
          "BCM pin of the power-loss input", live=False),
    Field("ups.gpio_active_low", Boolean(), True, "power loss pulls the pin low", live=False),
    Field("ups.debounce_ms", Integer(0, 10_000), 50, "power-loss input debounce", live=False),
    Field("ups.on_battery_grace_s", Integer(0, 86_400), 60,
          "seconds on battery before a clean shutdown", live=True),
    Field("ups.low_battery_percent", Integer(1, 90), 20,
          "charge at which the unit shuts down at once", live=True),
    Field("notify.snmp", ListOf(_SNMP_TARGET, max_items=4), [],
          "SNMP trap targets: host, port, community or v3_user", live=True),
    Field("notify.snmp_v3_auth_key", SecretText(64, min_len=0), "",
          "SNMPv3 authentication passphrase (SHA) of the v3 users, 8+ characters",
          live=True, secret=True),
    Field("notify.snmp_v3_priv_key", SecretText(64, min_len=0), "",
          "SNMPv3 privacy passphrase (AES-128); empty: authentication only",
          live=True, secret=True),
    Field("notify.email.recipients", ListOf(Email(), max_items=8), [],
          "e-mail recipients of alerts", live=True),
    Field("notify.email.relay", HostPort(optional=True, default_port=25), "",
          "SMTP relay host:port", live=True),
    Field("notify.email.from", Email(optional=True), "", "sender address of alerts", live=True),
    Field("notify.poll_interval_s", Integer(1, 3600), 30,
          "seconds between health checks that feed notifications", live=True),
)

SCHEMA: dict[str, Field] = {f.key: f for f in FIELDS}
assert len(SCHEMA) == len(FIELDS), "duplicate key in the schema table"


def field(key: str) -> Field:
    try:
        return SCHEMA[key]
    except KeyError:
        raise ConfigError(key, "unknown field") from None


# ------------------------------------------------------------------ the config


class Config(Mapping[str, Any]):
    """A complete, validated configuration (immutable; changes make a new one)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    @classmethod
    def defaults(cls) -> Config:
        return cls({f.key: _copy(f.default) for f in FIELDS})

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def __hash__(self) -> int:
        return hash(json.dumps(self._values, sort_keys=True))

    def __repr__(self) -> str:
        # A Config ends up in logs and tracebacks; secrets must not.
        shown = {k: (SCHEMA[k].type.display(v) if SCHEMA[k].secret else v)
                 for k, v in self._values.items()}
        return f"Config({shown!r})"

    def replace(self, changes: Mapping[str, Any], limits: BoardLimits | None = None) -> Config:
        """A new validated Config with `changes` (already-typed values) applied."""
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = field(key).type.check(key, value)
        return validate(values, limits)

    def to_document(self, *, include_secrets: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in FIELDS:
            if f.secret and not include_secrets:
                continue
            doc[f.key] = _copy(self._values[f.key])
        return doc


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


#: schema_version -> function upgrading a document of that version by one step.
MIGRATIONS: dict[int, Any] = {}


def from_document(doc: Any, limits: BoardLimits | None = None,
                  base: Config | None = None) -> Config:
    """Validate a stored or imported document; missing fields take `base` or the defaults."""
    if not isinstance(doc, dict):
        raise ConfigError("schema_version", "document is not a map")
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError("schema_version", "missing or not an integer")
    if version > SCHEMA_VERSION:
        raise ConfigError("schema_version",
                          f"{version} is newer than this firmware's {SCHEMA_VERSION}")
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise ConfigError("schema_version", f"no migration from version {version}")
        doc = MIGRATIONS[version](doc)
        version += 1
    values = dict((base or Config.defaults())._values)
    for key, value in doc.items():
        if key == "schema_version":
            continue
        if not isinstance(key, str):
            raise ConfigError(str(key), "field names must be text")
        values[key] = field(key).type.check(key, value)
    return validate(values, limits)


def validate(values: Mapping[str, Any], limits: BoardLimits | None = None) -> Config:
    """Check every field and the rules between fields; the first failure is raised."""
    checked: dict[str, Any] = {}
    for f in FIELDS:
        if f.key not in values:
            raise ConfigError(f.key, "is missing")
        checked[f.key] = f.type.check(f.key, values[f.key])
    for key in values:
        if key not in SCHEMA:
            raise ConfigError(key, "unknown field")
    _cross_check(checked, limits or BoardLimits())
    return Config(checked)


def _cross_check(v: dict[str, Any], limits: BoardLimits) -> None:
    if v["network.mode"] == "static":
        for key in ("network.address", "network.netmask"):
            if not v[key]:
                raise ConfigError(key, "is required when network.mode is static")
        addr = ipaddress.ip_address(v["network.address"])
        prefix = int(v["network.netmask"])
        if prefix > addr.max_prefixlen or (addr.version == 4 and prefix > 32):
            raise ConfigError("network.netmask",
                              f"prefix /{prefix} is too long for IPv{addr.version}")
        iface = ipaddress.ip_interface(f"{addr}/{prefix}")
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
            raise ConfigError("network.address", f"{addr} cannot be a host address")
        # /31 and /32 (RFC 3021) have no network or broadcast address to avoid.
        if addr.version == 4 and prefix <= 30 and addr in (
                iface.network.network_address, iface.network.broadcast_address):
            raise ConfigError("network.address",
                              f"{addr} is the network or broadcast address of {iface.network}")
        gw = v["network.gateway"]
        if gw:
            gw_addr = ipaddress.ip_address(gw)
            if gw_addr.version != addr.version or gw_addr not in iface.network:
                raise ConfigError("network.gateway", f"{gw} is not in {iface.network}")
            if gw_addr == addr:
                raise ConfigError("network.gateway", "must differ from network.address")
    names = [p["name"] for p in v["peers"]]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"peers[{i}].name", f"{name!r} is used by another peer")
    if v["role"] == "local" and v["volume.size"] and limits.max_volume_bytes is not None \
            and v["volume.size"] > limits.max_volume_bytes:
        raise ConfigError("volume.size",
                          f"{format_size(v['volume.size'])} exceeds this board's maximum of "
                          f"{format_size(limits.max_volume_bytes)}")
    if v["ups.model"] == "gpio" and v["ups.gpio_pin"] is None:
        raise ConfigError("ups.gpio_pin", "is required when ups.model is gpio")
    for key in ("notify.snmp_v3_auth_key", "notify.snmp_v3_priv_key"):
        if v[key] and len(v[key]) < 8:
            raise ConfigError(key, "needs at least 8 characters")
    if any("v3_user" in t for t in v["notify.snmp"]) and not v["notify.snmp_v3_auth_key"]:
        raise ConfigError("notify.snmp_v3_auth_key", "is required for SNMPv3 trap targets")
    if v["notify.snmp_v3_priv_key"] and not v["notify.snmp_v3_auth_key"]:
        raise ConfigError("notify.snmp_v3_auth_key", "is required with a privacy passphrase")
    if v["notify.email.recipients"]:
        for key in ("notify.email.relay", "notify.email.from"):
            if not v[key]:
                raise ConfigError(key, "is required when notify.email.recipients is set")


# ------------------------------------------------------------------ edits and views


def set_value(cfg: Config, key: str, text: str, limits: BoardLimits | None = None) -> Config:
    """Parse `text` as `key`'s type and return the new validated Config."""
    f = field(key)
    return cfg.replace({key: f.type.parse(key, text)}, limits)


def show(cfg: Config) -> dict[str, str]:
    """Every field as display text; secrets as 'set' / 'not set'."""
    return {f.key: f.type.display(cfg[f.key]) for f in FIELDS}


def format_show(cfg: Config) -> str:
    width = max(len(f.key) for f in FIELDS)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in show(cfg).items())


@dataclass(frozen=True)
class ConfigDiff:
    live: tuple[str, ...]
    restart: tuple[str, ...]

    @property
    def changed(self) -> tuple[str, ...]:
        return self.live + self.restart

    @property
    def needs_restart(self) -> bool:
        return bool(self.restart)


def diff_live(old: Config, new: Config) -> ConfigDiff:
    """Which changed keys apply at once and which need the processes restarted."""
    changed = [f for f in FIELDS if old[f.key] != new[f.key]]
    return ConfigDiff(tuple(f.key for f in changed if f.live),
                      tuple(f.key for f in changed if not f.live))
