"""Who may receive a unit's sealed config: `backup.keepers`, re-read as it changes."""

from __future__ import annotations

from pathlib import Path

from firmware.config import ConfigStore, StoreSettings
from firmware.config.peer_backup import BackupKeepers


def test_keepers_follow_the_config_and_default_to_nobody(tmp_path: Path) -> None:
    path = tmp_path / "c.slots"
    store = ConfigStore(StoreSettings(str(path)))
    now = [0.0]
    keepers = BackupKeepers(store, clock=lambda: now[0])
    assert keepers.names() == frozenset()  # no config at all: nobody
    now[0] += 1
    store.update({"unit.name": "vault"})
    assert keepers.names() == frozenset()  # the default names nobody
    store.update({"backup.keepers": ["local-a"]})
    assert keepers.names() == frozenset()  # not looked at again yet
    now[0] += BackupKeepers.RECHECK_S
    assert keepers.allows("local-a") and not keepers.allows("local-b")
    path.write_bytes(b"\x00" * len(path.read_bytes()))  # both slots unreadable
    now[0] += BackupKeepers.RECHECK_S
    assert keepers.names() == frozenset()
