"""Sealing a unit's config for its peers straight into a link state directory (a
remote unit's: it hands the blob to each local that connects)."""

from __future__ import annotations

from pathlib import Path

from firmware.config.peer_backup import OWN_BACKUP_NAME, seal_config, write_blob
from firmware.config.seal import SealedIdentity
from firmware.config.store import ConfigStore, StoreSettings
from firmware.link.tls import CERT_FILE, PEERS_FILE, export_identity, unit_identity


def seal_into_state_dir(state_dir: Path, config_path: Path, password: str) -> bytes:
    """Seal the config at `config_path` under the admin password (checked), with the
    link identity of `state_dir` when it has one, into `state_dir`; the blob.
    Raises `ConfigStoreError`, `SealError`, `LinkError` or `OSError`."""
    identity = None
    if (state_dir / CERT_FILE).exists():
        ident, _ = unit_identity(state_dir)
        identity = SealedIdentity(*export_identity(ident, state_dir / PEERS_FILE))
    blob = seal_config(ConfigStore(StoreSettings(str(config_path))), password, identity)
    write_blob(state_dir / OWN_BACKUP_NAME, blob)
    return blob
