"""Config backups kept by a peer over the journey link: sealing this unit's
config, keeping blobs on disk, and restoring one into the config store.

The link moves opaque sealed blobs (CONFIG_PUT / CONFIG_GET / CONFIG_BLOB); only
this module opens them, and only with the admin password typed by a person.  A
wrong password, a damaged blob or a refused config writes nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigStoreError, WrongPassword
from .password import check_admin_password
from .seal import seal, unseal
from .store import ConfigStore, StoreState

log = logging.getLogger("mirrorunit.config")

#: This unit's own sealed config, in its link state directory.
OWN_BACKUP_NAME = "config.sealed"
#: A peer's sealed config kept here: `<peer name>` + this suffix.
PEER_BACKUP_SUFFIX = ".config.sealed"


def peer_backup_name(peer: str) -> str:
    return peer + PEER_BACKUP_SUFFIX


def seal_config(store: ConfigStore, admin_password: str) -> bytes:
    """The unit's current config sealed under its admin password.  Refused (nothing
    sealed) unless the config loads and the password is the admin password."""
    loaded = store.load()
    if loaded.state is not StoreState.OK or loaded.config is None:
        raise ConfigStoreError(f"no config to back up: {loaded.describe()}")
    if not check_admin_password(loaded.config, admin_password):
        raise WrongPassword("that is not the admin password of this unit")
    return seal(loaded.config, admin_password)


def write_blob(path: str | os.PathLike[str], blob: bytes) -> None:
    """Replace the blob at `path` atomically (write, fsync, rename, fsync dir), so a
    power cut leaves the old blob or the new one, never a torn one."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_blob(path: str | os.PathLike[str]) -> bytes | None:
    try:
        return Path(path).read_bytes() or None
    except FileNotFoundError:
        return None


def restore_config(store: ConfigStore, blob: bytes, admin_password: str, *,
                   force: bool = False) -> int:
    """Open `blob` with the admin password and write it as the store's new
    generation; returns that generation.

    Only a blank or corrupt store is written unless `force`: a working config must
    not be replaced by a peer's older copy by mistake.  WrongPassword, SealTampered
    or SealFormatError (and ConfigError for contents this board refuses) are raised
    before anything is written."""
    loaded = store.load()
    if loaded.state is StoreState.OK and not force:
        raise ConfigStoreError("this unit has a valid config (generation "
                               f"{loaded.generation}); restoring would replace it")
    cfg = unseal(blob, admin_password, store.limits)
    generation = store.save(cfg)
    log.warning("config: restored from a peer's backup as generation %d", generation)
    return generation
