"""Restoring a unit from a peer.  A replaced unit runs the recovery exchange, then
gets its config and link identity written back and the peer pinned; a unit whose
identity is intact fetches its backup from a peer it pins (`fetch_own_backup`).

Nothing is written until the blob has been fetched and opened: a wrong password,
another peer's certificate, a damaged blob or a config this board refuses leave
the unit as it was.  The identity goes in before the config, so a power cut in
between leaves a unit that still boots into recovery and can simply retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from firmware.config.errors import ConfigError, SealFormatError
from firmware.config.kdf import KdfParams, params_from_cost
from firmware.config.peer_backup import check_restorable, write_restored
from firmware.config.seal import key_check, unseal_bundle
from firmware.config.store import ConfigStore
from firmware.link.errors import PeerNotPinned, TlsIdentityError
from firmware.link.frames import RecoverChallenge
from firmware.link.recovery import recovery_proof
from firmware.link.shell import fetch_config_backup, recovery_exchange
from firmware.link.tls import (
    PeerStore,
    certificate_name,
    fingerprint,
    install_identity,
    normalize_fingerprint,
    unit_identity,
)

log = logging.getLogger("mirrorunit.link")


def fetch_own_backup(state_dir: Path, peer_name: str, address: tuple[str, int],
                     timeout: float = 15.0) -> tuple[str, bytes | None]:
    """This unit's id and its sealed config as kept by `peer_name` (pinned in
    `state_dir`) at `address`; None when that peer keeps none.  Raises `LinkError`
    (`PeerNotPinned` for a peer not pinned here) or `OSError`."""
    identity, unit_id = unit_identity(state_dir)
    peers = PeerStore.in_dir(state_dir)
    if peers.get(peer_name) is None:
        raise PeerNotPinned(f"peer {peer_name!r} is not pinned in {state_dir}")
    return unit_id, fetch_config_backup(address, identity, peers, peer_name, unit_id,
                                        timeout)


@dataclass(frozen=True)
class RestoreResult:
    unit_id: str
    generation: int
    #: This unit's certificate fingerprint after the restore (None: the backup
    #: carried no identity; the unit keeps the one it has).
    fingerprint: str | None
    #: Name the peer was pinned under (or was to be, see `pin_error`).
    peer_name: str
    #: Why the peer could not be pinned; None when it is pinned under `peer_name`.
    pin_error: str | None = None


class PeerRecovery:
    """Recovery of this unit (config store + link state dir) from one peer."""

    def __init__(self, store: ConfigStore, state_dir: Path, timeout: float = 15.0) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self.timeout = timeout

    def probe(self, address: tuple[str, int], peer_fingerprint: str,
              unit_id: str | None = None, *, force: bool = False) -> str:
        """Check that the peer is reachable, is the one expected, and keeps a backup
        (and that this unit may be restored); the unit id the peer offers."""
        check_restorable(self.store, force=force)
        return recovery_exchange(address, peer_fingerprint, unit_id, None,
                                 self.timeout).unit_id

    def recover(self, address: tuple[str, int], peer_fingerprint: str, password: str,
                unit_id: str | None = None, *, force: bool = False) -> RestoreResult:
        check_restorable(self.store, force=force)
        fp = normalize_fingerprint(peer_fingerprint)
        checks: dict[tuple[bytes, KdfParams], bytes] = {}

        def prove(ch: RecoverChallenge) -> bytes:
            # Bounded before anything is derived: even a genuine peer's blob header
            # could have been altered on its disk.
            try:
                params = params_from_cost(ch.kdf, ch.cost, "seal")
            except ConfigError as exc:
                raise SealFormatError(f"the peer's backup asks for an unacceptable key "
                                      f"derivation: {exc.message}") from None
            check = checks.get((ch.salt, params))
            if check is None:
                check = checks[(ch.salt, params)] = key_check(password, ch.salt, params)
            return recovery_proof(check, ch.nonce, fp, ch.unit_id)

        outcome = recovery_exchange(address, fp, unit_id, prove, self.timeout)
        assert outcome.blob is not None
        bundle = unseal_bundle(outcome.blob, password, self.store.limits)
        own_fp = None
        if bundle.identity is not None:
            ident = install_identity(self.state_dir, bundle.identity.key_pem,
                                     bundle.identity.cert_pem, bundle.identity.peers)
            own_fp = ident.fingerprint
        peer_name, pin_error = self._pin(outcome.peer_cert, bundle.config["peers"])
        generation = write_restored(self.store, bundle.config, force=force)
        log.warning("recovered unit %s's config (generation %d) and %s from the peer %s",
                    outcome.unit_id, generation,
                    "its link identity" if own_fp else "no identity", peer_name)
        return RestoreResult(outcome.unit_id, generation, own_fp, peer_name, pin_error)

    def _pin(self, peer_der: bytes, config_peers: list[dict[str, str]]
             ) -> tuple[str, str | None]:
        """Pin the peer just fetched from, under the name the restored config gives
        it (else under its certificate's unit id); the name, and why the pin failed
        (None: it did not)."""
        fp = fingerprint(peer_der)
        plain = fp.replace(":", "")
        name = next((p["name"] for p in config_peers if p["fingerprint"] == plain), None)
        store = PeerStore.in_dir(self.state_dir)
        already = store.by_fingerprint(fp)
        if already is not None:
            return already.name, None
        name = name or certificate_name(peer_der)
        try:
            store.pin(name, peer_der, expected_fingerprint=fp)
        except TlsIdentityError as exc:
            # The config is restored all the same: it is what the unit lacked, and a
            # pin can be made later with `mirrorunit pair`.
            log.error("could not pin the peer %s: %s", name, exc)
            return name, str(exc)
        return name, None
