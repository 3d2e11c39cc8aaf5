"""The configuration schema: one table of fields, their defaults and rules (the types
of their values are in `fields`).

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .fields import (
    _HOSTNAME_LABEL,
    Boolean,
    Choice,
    Email,
    FieldType,
    Fingerprint,
    HostPort,
    Integer,
    IpAddress,
    ListOf,
    Netmask,
    PasswordHash,
    Port,
    Rate,
    Real,
    Record,
    SealKeyText,
    SecretText,
    Size,
    Text,
    format_size,
    join_host_port,
    normalise_fingerprint,
    parse_size,
    split_host_port,
)

#: Bumped when a field changes meaning or shape; older documents are migrated on load.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BoardLimits:
    """What the board can hold; passed in by whoever knows the hardware."""

    max_volume_bytes: int | None = None


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
    Field("remote.split_brain_policy",
          Choice("manual", "discard-zero-changes", "discard-younger-primary"), "manual",
          "on a remote: how a split brain may resolve itself (docs/failover.md)", live=False),
    # Empty by default: the blob holds this unit's TLS private key, so no peer gets
    # it unless named here (docs/config.md, "Backup keepers").
    Field("backup.keepers", ListOf(Text(63, min_len=1, pattern=_HOSTNAME_LABEL,
                                        what="a peer name"), max_items=8), [],
          "peers (names as pinned here) sent this unit's sealed config backup",
          live=True),
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
    # Live: `link.set_bandwidth` / `link.set_compression` on the local unit
    # (firmware/config/live.py); the link does not reconnect for a cap.
    Field("link.bandwidth", Rate(minimum=8 * 1024, maximum=1 << 40), 0,
          "cap of each remote's link in bytes/s (10MB/s, 80Mbit/s; unlimited: no cap)",
          live=True),
    Field("link.compression", Choice("auto", "zstd", "zlib", "none"), "auto",
          "codec of the replication traffic (auto: the best both units have)", live=True),
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


# Also the field types and their helpers, which callers import from here.
__all__ = [
    "BoardLimits", "Boolean", "Choice", "Config", "ConfigDiff", "Email", "FIELDS", "Field",
    "FieldType", "Fingerprint", "HostPort", "Integer", "IpAddress", "ListOf", "MIGRATIONS",
    "Netmask", "PasswordHash", "Port", "Rate", "Real", "Record", "SCHEMA", "SCHEMA_VERSION",
    "SealKeyText",
    "SecretText", "Size", "Text", "diff_live", "field", "format_show", "format_size",
    "from_document", "join_host_port", "normalise_fingerprint", "parse_size", "set_value", "show",
    "split_host_port", "validate",
]
