"""The config partition: two alternating slots, each a header + CBOR body.

Slot layout (slot i starts at i * slot_size)::

    SLOT_HEADER  magic, format version, header size, generation u64, body length,
                 CRC32C over the header (crc field zero) and the body
    body         CBOR document {"schema_version": N, "<dotted key>": value, ...}

A save writes the slot that does *not* hold the current generation and syncs it;
only then does the new generation exist.  A torn or lost write damages only the
slot being written, so the previous generation stays loadable.  Load picks the
highest generation whose CRC and contents check out.

The partition may be a file on a filesystem kept mounted read-only; a `remount`
hook is then called with True before and False after every write.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cbor2

from .. import cbor_strict
from ..record import HeaderFormat, IntegrityError
from ..storage import FileStorage
from .errors import ConfigError, ConfigStoreError
from .password import check_admin_password, set_admin_password, upgraded_password
from .schema import (
    SCHEMA,
    BoardLimits,
    Config,
    ConfigDiff,
    diff_live,
    field,
    from_document,
    set_value,
    show,
)

log = logging.getLogger("mirrorunit.config")

SLOT_MAGIC = b"MUCONFIG"
SLOT_FORMAT_VERSION = 1
#: magic, format version, header size, generation, body length, crc32c, reserved
SLOT = HeaderFormat("slot", struct.Struct("<8sHHQII4x"), SLOT_MAGIC, SLOT_FORMAT_VERSION)
SLOT_HEADER = SLOT.layout
assert SLOT_HEADER.size == 32
DEFAULT_SLOT_SIZE = 64 << 10
SLOT_COUNT = 2

ExportFormat = Literal["json", "cbor"]


class SlotDevice(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


#: (path, writable) -> an open device; the default opens a file or block device.
Opener = Callable[[str, bool], SlotDevice]
RemountHook = Callable[[bool], None]


@dataclass(frozen=True)
class StoreSettings:
    #: config partition: a file (on a filesystem mounted read-only) or a block device
    path: str
    slot_size: int = DEFAULT_SLOT_SIZE

    def __post_init__(self) -> None:
        if self.slot_size < SLOT_HEADER.size + 64 or self.slot_size % 512:
            raise ValueError(
                f"slot size {self.slot_size} must be a multiple of 512 and hold a body")


class StoreState(enum.Enum):
    OK = "ok"
    #: nothing was ever written: first boot, the console's setup runs
    BLANK = "blank"
    #: something is there but no slot checks out: boot into recovery
    CORRUPT = "corrupt"


class SlotStatus(enum.Enum):
    VALID = "valid"
    BLANK = "blank"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class SlotInfo:
    index: int
    status: SlotStatus
    #: set whenever the header and CRC check out, even if the contents were refused
    generation: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class LoadResult:
    state: StoreState
    config: Config | None
    generation: int
    slot: int | None
    slots: tuple[SlotInfo, ...]

    @property
    def problems(self) -> list[str]:
        return [f"slot {s.index}: {s.reason}" for s in self.slots
                if s.status is SlotStatus.CORRUPT]

    def describe(self) -> str:
        if self.state is StoreState.OK:
            return f"generation {self.generation} from slot {self.slot}"
        if self.state is StoreState.BLANK:
            return "config partition is blank"
        return "config partition is corrupt: " + "; ".join(self.problems)


@dataclass(frozen=True)
class SetResult:
    config: Config
    diff: ConfigDiff
    generation: int


def encode_slot(generation: int, body: bytes) -> bytes:
    header, _ = SLOT.pack(SLOT_HEADER.size, generation, len(body), payload=body)
    return header + body


def decode_slot(index: int, raw: bytes, limits: BoardLimits | None
                ) -> tuple[SlotInfo, Config | None]:
    """Check one slot's bytes; never raises for bad contents, reports them instead."""
    base = index * len(raw)
    if not any(raw):
        return SlotInfo(index, SlotStatus.BLANK), None

    def bad(why: str, generation: int | None = None) -> tuple[SlotInfo, None]:
        return SlotInfo(index, SlotStatus.CORRUPT, generation, why), None

    try:
        hsize, gen, length, _crc = SLOT.unpack(raw, offset=base)
        if hsize != SLOT_HEADER.size:
            raise IntegrityError(None, base, f"unsupported slot header of {hsize} bytes")
        if length > len(raw) - SLOT_HEADER.size:
            raise IntegrityError(None, base, f"body length {length} overruns the slot")
        body = raw[SLOT_HEADER.size:SLOT_HEADER.size + length]
        if not SLOT.crc_ok(raw, body):
            raise IntegrityError(None, base, f"CRC mismatch in generation {gen}")
    except IntegrityError as e:
        return bad(str(e))
    # The strict decoder, not cbor2's: a slot is what a damaged or swapped card holds,
    # and cbor2 5.6's C decoder leaks ~650 bytes on every text string that is not
    # UTF-8 (three bytes, `62 ff ff`, do it), so a unit re-reading a bad slot would grow
    # without bound.  Our own encoding (plain maps, lists, text, numbers) is its subset.
    try:
        doc = cbor_strict.loads(body, floats=True)
    except cbor_strict.CborDecodeError as e:
        return bad(f"body of generation {gen} is not CBOR: {e}", gen)
    try:
        cfg = from_document(doc, limits)
    except ConfigError as e:
        return bad(f"generation {gen} holds an invalid config: {e}", gen)
    return SlotInfo(index, SlotStatus.VALID, gen), cfg


def _default_opener(slot_size: int) -> Opener:
    def open_(path: str, writable: bool) -> SlotDevice:
        if not writable:
            return FileStorage(path, read_only=True)
        created = not os.path.exists(path)
        dev = FileStorage(path, size=SLOT_COUNT * slot_size, create=True)
        if created:
            # The new directory entry must survive a power cut as well as the data.
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return dev
    return open_


# ------------------------------------------------------------------ export / import


def export_config(cfg: Config, fmt: ExportFormat = "json", *,
                  include_secrets: bool = False) -> bytes:
    """A document for scripting; the password hash only with include_secrets."""
    doc = cfg.to_document(include_secrets=include_secrets)
    if fmt == "json":
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    if fmt == "cbor":
        return cbor2.dumps(doc, canonical=True)
    raise ValueError(f"unknown export format {fmt!r}")


def parse_document(data: bytes, fmt: ExportFormat) -> Any:
    if fmt == "json":
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError("schema_version", f"document is not valid JSON: {e}") from None
    if fmt == "cbor":
        try:
            # A user's file: decoded strictly (no tags, bounded), like a peer's frame.
            return cbor_strict.loads(data, floats=True)
        except (ValueError, TypeError) as e:
            raise ConfigError("schema_version", f"document is not valid CBOR: {e}") from None
    raise ValueError(f"unknown import format {fmt!r}")


def import_config(data: bytes, fmt: ExportFormat, base: Config | None = None,
                  limits: BoardLimits | None = None) -> Config:
    """Parse and validate a whole document; fields it leaves out keep `base`'s values."""
    return from_document(parse_document(data, fmt), limits, base)


# ------------------------------------------------------------------ the store


class ConfigStore:
    def __init__(self, settings: StoreSettings, *, remount: RemountHook | None = None,
                 opener: Opener | None = None, limits: BoardLimits | None = None) -> None:
        self.settings = settings
        self.remount = remount
        self.opener = opener or _default_opener(settings.slot_size)
        self.limits = limits

    # ---- reading

    def load(self) -> LoadResult:
        size = self.settings.slot_size
        try:
            dev = self.opener(self.settings.path, False)
        except FileNotFoundError:
            blank = tuple(SlotInfo(i, SlotStatus.BLANK) for i in range(SLOT_COUNT))
            return LoadResult(StoreState.BLANK, None, 0, None, blank)
        except OSError as e:
            raise ConfigStoreError(f"cannot open {self.settings.path}: {e}") from e
        try:
            decoded = [decode_slot(i, dev.pread(i * size, size), self.limits)
                       for i in range(SLOT_COUNT)]
        except OSError as e:
            raise ConfigStoreError(f"cannot read {self.settings.path}: {e}") from e
        finally:
            dev.close()
        slots = tuple(info for info, _ in decoded)
        valid = [(info.generation or 0, info.index, cfg) for info, cfg in decoded
                 if info.status is SlotStatus.VALID and cfg is not None]
        for s in slots:
            if s.status is SlotStatus.CORRUPT:
                log.warning("config: slot %d: %s", s.index, s.reason)
        if valid:
            gen, index, cfg = max(valid, key=lambda t: t[0])
            return LoadResult(StoreState.OK, cfg, gen, index, slots)
        if all(s.status is SlotStatus.BLANK for s in slots):
            return LoadResult(StoreState.BLANK, None, 0, None, slots)
        return LoadResult(StoreState.CORRUPT, None, 0, None, slots)

    def _editable(self) -> tuple[Config, LoadResult]:
        result = self.load()
        if result.state is StoreState.CORRUPT:
            raise ConfigStoreError(result.describe() + " (import a backup or reset)")
        return result.config or Config.defaults(), result

    # ---- writing

    def save(self, cfg: Config, _loaded: LoadResult | None = None) -> int:
        """Write `cfg` as a new generation; returns that generation once it is durable."""
        loaded = _loaded or self.load()
        seen = [s.generation for s in loaded.slots if s.generation is not None]
        generation = max(seen, default=0) + 1
        # Never overwrite the slot holding the generation that is current now.
        target = 1 - loaded.slot if loaded.slot is not None else 0
        body = cbor2.dumps(cfg.to_document(include_secrets=True), canonical=True)
        if SLOT_HEADER.size + len(body) > self.settings.slot_size:
            raise ConfigStoreError(f"config of {len(body)} bytes does not fit a slot of "
                                   f"{self.settings.slot_size} bytes")
        image = encode_slot(generation, body)
        if self.remount is not None:
            log.info("config: remounting the config partition read-write")
            try:
                self.remount(True)
            except OSError as e:
                raise ConfigStoreError(f"cannot remount read-write: {e}") from e
        try:
            dev = self.opener(self.settings.path, True)
            try:
                dev.pwrite(target * self.settings.slot_size, image)
                dev.sync()
                back = dev.pread(target * self.settings.slot_size, len(image))
            finally:
                dev.close()
            if back != image:
                raise ConfigStoreError(f"slot {target} read back differently after the write")
        except OSError as e:
            raise ConfigStoreError(f"cannot write {self.settings.path}: {e}") from e
        finally:
            if self.remount is not None:
                log.info("config: remounting the config partition read-only")
                self.remount(False)
        log.info("config: wrote generation %d to slot %d (%d bytes)",
                 generation, target, len(body))
        return generation

    def reset(self) -> int:
        """Write the defaults (recovery from a corrupt partition)."""
        log.warning("config: resetting to defaults")
        return self.save(Config.defaults())

    # ---- the commands

    def show(self) -> dict[str, str]:
        cfg, _ = self._editable()
        return show(cfg)

    def set(self, key: str, text: str) -> SetResult:
        old, loaded = self._editable()
        new = set_value(old, key, text, self.limits)
        return self._commit(old, new, loaded, f"set {key} = {SCHEMA[key].type.display(new[key])}")

    def set_many(self, changes: dict[str, str]) -> SetResult:
        """Several fields at once, validated together (e.g. network.mode with its address)."""
        old, loaded = self._editable()
        new = old.replace({key: field(key).type.parse(key, text)
                           for key, text in changes.items()}, self.limits)
        return self._commit(old, new, loaded, f"set {', '.join(changes)}")

    def update(self, changes: dict[str, Any]) -> SetResult:
        """Typed values (as a Config holds them), validated together; all or nothing."""
        old, loaded = self._editable()
        new = old.replace(changes, self.limits)
        return self._commit(old, new, loaded, f"set {', '.join(changes)}")

    def set_admin_password(self, clear: str) -> SetResult:
        old, loaded = self._editable()
        new = set_admin_password(old, clear)
        return self._commit(old, new, loaded, "admin password changed")

    def login(self, clear: str) -> bool:
        """True when `clear` is the admin password.  A hash (or seal key) of older,
        cheaper parameters is then replaced by one at today's (Argon2id); a save that
        fails is logged and does not fail the login."""
        cfg, loaded = self._editable()
        if not check_admin_password(cfg, clear):
            return False
        new = upgraded_password(cfg, clear)
        if new is not None:
            try:
                self._commit(cfg, new, loaded, "admin password hash upgraded to argon2id")
            except ConfigStoreError as e:
                log.error("config: could not store the upgraded password hash: %s", e)
        return True

    def export(self, fmt: ExportFormat = "json", *, include_secrets: bool = False) -> bytes:
        cfg, _ = self._editable()
        return export_config(cfg, fmt, include_secrets=include_secrets)

    def import_(self, data: bytes, fmt: ExportFormat = "json") -> SetResult:
        """Validate the whole document, then write it; a refused import writes nothing."""
        loaded = self.load()
        base = loaded.config or Config.defaults()
        new = import_config(data, fmt, base, self.limits)
        return self._commit(base, new, loaded, "imported")

    def _commit(self, old: Config, new: Config, loaded: LoadResult, what: str) -> SetResult:
        diff = diff_live(old, new)
        gen = self.save(new, loaded) if diff.changed or loaded.state is not StoreState.OK \
            else loaded.generation
        log.info("config: %s (generation %d; live: %s; needs restart: %s)", what, gen,
                 ", ".join(diff.live) or "-", ", ".join(diff.restart) or "-")
        return SetResult(new, diff, gen)


#: Where the config partition is when no path is given.
ENV_CONFIG = "MIRRORUNIT_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/mirrorunit/config.slots"


def default_config_path() -> str:
    return os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH


def open_store(path: str | os.PathLike[str] | None = None) -> ConfigStore:
    """The unit's config partition at `path` (default: $MIRRORUNIT_CONFIG, else
    DEFAULT_CONFIG_PATH), remounted read-write only while a save runs."""
    from .mount import RemountHook as MountRemount

    p = os.fspath(path) if path is not None else default_config_path()
    return ConfigStore(StoreSettings(p), remount=MountRemount(p))
