"""Restoring a replaced unit from a peer (firmware.recovery): what the unit ends up
with, and what it reports, when the peer it recovered from cannot be pinned.  The
exchange itself is tested over real TLS in test_config_recovery.py; here it is
replaced by its outcome."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

import firmware.recovery.restore as restore
from firmware.apps.recovery import cmd_recover
from firmware.config import ConfigStore, StoreSettings, StoreState
from firmware.config.kdf import ScryptParams
from firmware.config.seal import seal
from firmware.link.errors import TlsIdentityError
from firmware.link.shell import RecoveryOutcome
from firmware.link.tls import Identity, PeerStore, load_or_create_identity
from firmware.recovery import PeerRecovery

PASSWORD = "correct horse battery"
FAST = ScryptParams(log2_n=4, r=8, p=1)
ADDRESS = ("192.0.2.7", 7300)


@pytest.fixture
def peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Identity:
    """A peer keeping unit-a's sealed config; the exchange hands it over at once."""
    old = ConfigStore(StoreSettings(str(tmp_path / "old.slots")))
    old.set_admin_password(PASSWORD)
    blob = seal(old.update({"unit.name": "vault-1"}).config, PASSWORD, params=FAST)
    identity = load_or_create_identity(tmp_path / "peer", "unit-b")

    def exchange(address: tuple[str, int], fp: str, unit_id: str | None, prove: Any,
                 timeout: float) -> RecoveryOutcome:
        assert address == ADDRESS and fp == identity.fingerprint
        return RecoveryOutcome("unit-a", identity.cert_der, blob)

    monkeypatch.setattr(restore, "recovery_exchange", exchange)
    return identity


def _refuse_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    def pin(self: PeerStore, name: str, cert_der: bytes, expected_fingerprint: str | None = None
            ) -> Any:
        raise TlsIdentityError(f"cannot pin {name!r}: peers file is locked")

    monkeypatch.setattr(PeerStore, "pin", pin)


def test_a_recovered_peer_is_pinned(tmp_path: Path, peer: Identity) -> None:
    store = ConfigStore(StoreSettings(str(tmp_path / "new.slots")))
    result = PeerRecovery(store, tmp_path / "state").recover(ADDRESS, peer.fingerprint,
                                                             PASSWORD)
    assert result.pin_error is None and result.peer_name == "unit-b"
    pinned = PeerStore.in_dir(tmp_path / "state").get("unit-b")
    assert pinned is not None and pinned.fingerprint == peer.fingerprint


def test_a_failed_pin_is_reported_not_hidden(tmp_path: Path, peer: Identity,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_pins(monkeypatch)
    store = ConfigStore(StoreSettings(str(tmp_path / "new.slots")))
    result = PeerRecovery(store, tmp_path / "state").recover(ADDRESS, peer.fingerprint,
                                                             PASSWORD)
    assert result.pin_error is not None and "peers file is locked" in result.pin_error
    assert PeerStore.in_dir(tmp_path / "state").get("unit-b") is None
    # The config is restored all the same: it is what the replaced unit lacked.
    loaded = store.load()
    assert loaded.state is StoreState.OK and loaded.config is not None
    assert loaded.config["unit.name"] == "vault-1"


def test_the_command_says_the_peer_was_not_pinned(tmp_path: Path, peer: Identity,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _refuse_pins(monkeypatch)
    monkeypatch.setattr("sys.stdin", _Lines(PASSWORD + "\n"))
    args = argparse.Namespace(
        from_peer=f"{ADDRESS[0]}:{ADDRESS[1]}", fingerprint=peer.fingerprint, unit=None,
        name=None, state_dir=tmp_path / "state", config=str(tmp_path / "new.slots"),
        force=False, password_stdin=True)
    assert cmd_recover(args) == 1
    out, err = capsys.readouterr()
    assert "restored (generation" in out and "peer pinned" not in out
    assert "NOT pinned as unit-b" in err and "peers file is locked" in err


class _Lines:
    """A non-terminal standard input holding `text`."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines(keepends=True)

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""
