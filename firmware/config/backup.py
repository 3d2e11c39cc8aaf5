"""Peer backup of the configuration: the blob a unit hands its peers, and the restore.

The journey link carries the blob; this module only makes and opens it.  A
`BackupSource` is whatever can fetch this unit's blob from a peer: it gets the
draft configuration (network and peers typed at the console) and returns the
sealed bytes, or raises OSError / ConnectionError when the peer cannot be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigStoreError, WrongPassword
from .schema import Config
from .seal import seal, unseal
from .store import ConfigStore, SetResult, StoreState

log = logging.getLogger("mirrorunit.config")

BackupSource = Callable[[Config], bytes]


def backup_blob(store: ConfigStore, admin_password: str) -> bytes:
    """The current config sealed under the admin password (refused if the password is wrong)."""
    if not store.login(admin_password):
        raise WrongPassword("that is not the admin password of this unit")
    cfg, _ = store._editable()
    return seal(cfg, admin_password)


def restore_blob(store: ConfigStore, blob: bytes, admin_password: str, *,
                 force: bool = False) -> SetResult:
    """Open a peer's copy and write it as the new generation.

    Only a blank or corrupt partition is overwritten unless `force`: a unit that has
    a working config must not be replaced by a stale copy by mistake.
    """
    loaded = store.load()
    if loaded.state is StoreState.OK and not force:
        raise ConfigStoreError("this unit has a valid config; restoring would replace it")
    cfg = unseal(blob, admin_password, store.limits)
    old = loaded.config or Config.defaults()
    log.warning("config: restoring the configuration from a peer backup")
    return store._commit(old, cfg, loaded, "restored from a peer backup")


def file_source(path: str | Path) -> BackupSource:
    """A source reading a blob saved to a file (a USB stick, or a copy taken by hand)."""
    def fetch(_draft: Config) -> bytes:
        return Path(path).read_bytes()
    return fetch
