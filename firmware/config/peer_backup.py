"""Config backups kept by a peer over the journey link: sealing this unit's
config, keeping blobs on disk, and restoring one into the config store.

The link moves opaque sealed blobs (CONFIG_PUT / CONFIG_GET / CONFIG_BLOB); only
this module opens them, and only with the admin password typed by a person.  A
wrong password, a damaged blob or a refused config writes nothing.

Sealing needs no person: `AutoSealer` watches the config partition and seals
every new generation with the key material the password left in the config
(`admin.seal_key`).  A config whose password predates that field has no key;
it is then sealed only by `link seal-config`, which stores the key as well.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..fsutil import write_atomic
from .errors import ConfigError, ConfigStoreError, WrongPassword
from .schema import Config
from .seal import (
    SEAL_KEY_FIELD,
    SealedIdentity,
    SealKey,
    make_seal_key,
    parse_seal_key,
    seal_key_matches,
    seal_with_key,
    unseal,
)
from .store import ConfigStore, StoreState

log = logging.getLogger("mirrorunit.config")

#: This unit's own sealed config, in its link state directory.
OWN_BACKUP_NAME = "config.sealed"
#: A peer's sealed config kept here: `<peer name>` + this suffix.
PEER_BACKUP_SUFFIX = ".config.sealed"


def peer_backup_name(peer: str) -> str:
    return peer + PEER_BACKUP_SUFFIX


def stored_seal_key(cfg: Config) -> SealKey | None:
    text = cfg[SEAL_KEY_FIELD]
    return parse_seal_key(SEAL_KEY_FIELD, text) if text else None


def seal_config(store: ConfigStore, admin_password: str,
                identity: SealedIdentity | None = None) -> bytes:
    """The unit's current config sealed under its admin password.  Refused (nothing
    sealed) unless the config loads and the password is the admin password.

    A config without seal key material (its password was set before units sealed
    on their own), or with material from another password, gets it stored now,
    so every later generation is sealed unattended."""
    loaded = store.load()
    if loaded.state is not StoreState.OK or loaded.config is None:
        raise ConfigStoreError(f"no config to back up: {loaded.describe()}")
    if not store.login(admin_password):
        raise WrongPassword("that is not the admin password of this unit")
    cfg = store.load().config or loaded.config  # as upgraded by the login, if it was
    sk = stored_seal_key(cfg)
    if sk is None or not seal_key_matches(sk, admin_password):
        sk = make_seal_key(admin_password)
        cfg = store.update({SEAL_KEY_FIELD: sk.encode()}).config
        log.warning("config: seal key stored; new generations are sealed for the peers "
                    "without the password from now on")
    return seal_with_key(cfg, sk, identity)


def write_blob(path: str | os.PathLike[str], blob: bytes) -> None:
    """Replace the blob at `path` atomically, so a power cut leaves the old blob or the
    new one, never a torn one."""
    write_atomic(path, blob, 0o600)


def read_blob(path: str | os.PathLike[str]) -> bytes | None:
    try:
        return Path(path).read_bytes() or None
    except FileNotFoundError:
        return None


class AutoSealer:
    """Seals each new config generation for the peers, unattended.

    `poll()` is cheap when nothing changed (one stat of the partition); a new
    generation is sealed with the stored key (fresh nonce, the key's salt), the
    blob written atomically to `out`, and `on_sealed` told.  Problems are logged
    once each, not every poll."""

    def __init__(self, store: ConfigStore, out: Path,
                 identity: Callable[[], SealedIdentity | None] = lambda: None, *,
                 on_sealed: Callable[[bytes], None] | None = None,
                 interval: float = 0.5) -> None:
        self.store = store
        self.out = Path(out)
        self.identity = identity
        self.on_sealed = on_sealed
        self.interval = interval
        self.sealed_generation: int | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._said: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.store.settings.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def _once(self, why: str, level: int = logging.WARNING) -> None:
        if self._said != why:
            self._said = why
            log.log(level, "config backup: %s", why)

    def poll(self, force: bool = False) -> bytes | None:
        """Seal if the config has a generation not sealed yet; the new blob or None."""
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return None
        self._stamp = stamp
        try:
            loaded = self.store.load()
        except ConfigStoreError as e:
            self._once(f"cannot read the config partition: {e}")
            return None
        if loaded.state is not StoreState.OK or loaded.config is None:
            self._once(f"nothing to seal: {loaded.describe()}")
            return None
        if loaded.generation == self.sealed_generation and not force:
            return None
        cfg = loaded.config
        try:
            sk = stored_seal_key(cfg)
        except ConfigError as e:
            self._once(f"the stored seal key is unusable ({e.message}); no automatic backup")
            return None
        if sk is None:
            if cfg["admin.password_hash"]:
                self._once("the admin password was set before automatic sealing and no "
                           "seal key is stored: no automatic backup for the peers until "
                           "`mirrorunit link seal-config` is run or the password is set "
                           "again")
            else:
                self._once("no admin password is set: no backup for the peers")
            return None
        blob = seal_with_key(cfg, sk, self.identity())
        write_blob(self.out, blob)
        self.sealed_generation = loaded.generation
        self._said = None
        log.info("config backup: generation %d sealed for the peers (%d bytes)",
                 loaded.generation, len(blob))
        if self.on_sealed is not None:
            self.on_sealed(blob)
        return blob

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except OSError as e:
                self._once(f"cannot write {self.out}: {e}", logging.ERROR)

    def start(self) -> None:
        try:
            self.poll()
        except OSError as e:
            self._once(f"cannot write {self.out}: {e}", logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="config-sealer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class BackupKeepers:
    """The peers this unit's config names as keepers of its sealed backup
    (`backup.keepers`), re-read when the config partition changes.

    The blob carries the unit's TLS private key: a peer not named gets nothing, and
    so does every peer while the config cannot be read."""

    #: The link asks on every pass of its session loop: look at the partition at most
    #: this often (the sealer polls it at the same pace).
    RECHECK_S = 0.5

    def __init__(self, store: ConfigStore,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked: float | None = None
        self._names: frozenset[str] = frozenset()
        self._said: str | None = None

    def _once(self, why: str) -> None:
        if self._said != why:
            self._said = why
            log.warning("config backup: %s", why)

    def names(self) -> frozenset[str]:
        with self._lock:
            now = self.clock()
            if self._checked is not None and now - self._checked < self.RECHECK_S:
                return self._names
            self._checked = now
            try:
                st = os.stat(self.store.settings.path)
                stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and stamp is not None:
                return self._names
            self._stamp = stamp
            try:
                loaded = self.store.load()
            except ConfigStoreError as e:
                self._names = frozenset()
                self._once(f"cannot read the config partition ({e}): sent to no peer")
                return self._names
            if loaded.state is not StoreState.OK or loaded.config is None:
                self._names = frozenset()
                self._once(f"config not readable ({loaded.describe()}): sent to no peer")
            else:
                self._names = frozenset(loaded.config["backup.keepers"])
                self._once("kept by " + ", ".join(sorted(self._names)) if self._names else
                           "backup.keepers names no peer: this unit's sealed config is "
                           "sent to no peer")
            return self._names

    def allows(self, peer: str) -> bool:
        return peer in self.names()


def check_restorable(store: ConfigStore, *, force: bool = False) -> None:
    """Refuse (before anything is fetched or written) to replace a working config."""
    loaded = store.load()
    if loaded.state is StoreState.OK and not force:
        raise ConfigStoreError("this unit has a valid config (generation "
                               f"{loaded.generation}); restoring would replace it")


def write_restored(store: ConfigStore, cfg: Config, *, force: bool = False) -> int:
    """Write an already unsealed config as the store's new generation."""
    check_restorable(store, force=force)
    generation = store.save(cfg)
    log.warning("config: restored from a peer's backup as generation %d", generation)
    return generation


def restore_config(store: ConfigStore, blob: bytes, admin_password: str, *,
                   force: bool = False) -> int:
    """Open `blob` with the admin password and write it as the store's new
    generation; returns that generation.

    Only a blank or corrupt store is written unless `force`: a working config must
    not be replaced by a peer's older copy by mistake.  WrongPassword, SealTampered
    or SealFormatError (and ConfigError for contents this board refuses) are raised
    before anything is written."""
    check_restorable(store, force=force)
    return write_restored(store, unseal(blob, admin_password, store.limits), force=force)
