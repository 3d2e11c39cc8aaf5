"""Argon2id for the sealed blob and the admin password hash: old scrypt forms still
open, new ones are Argon2id, and parameters read from a hash, a blob or a peer are
bounded before anything is hashed."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.config.errors import ConfigError, SealFormatError, SealTampered, WrongPassword
from firmware.config.kdf import (
    PASSWORD_PARAMS,
    SEAL_KEY_PARAMS,
    Argon2Params,
    ScryptParams,
    hash_password_text,
    params_from_cost,
)
from firmware.config.password import check_admin_password, verify_password
from firmware.config.schema import Config
from firmware.config.seal import (
    SEAL_HEADER,
    SEAL_HEADER_V3,
    make_seal_key,
    parse_seal_key,
    read_header,
    seal,
    seal_with_key,
    unseal,
)
from firmware.link.frames import RecoverChallenge
from firmware.link.shell import RecoveryOutcome
from firmware.link.tls import load_or_create_identity
from firmware.recovery import PeerRecovery, restore

PASSWORD = "correct horse battery"
FAST = Argon2Params(memory_kib=64, time_cost=1)
OLD = ScryptParams(log2_n=4, r=8, p=1)
#: Refusing a crafted cost must not start hashing: far below one real derivation.
REFUSED_WITHIN_S = 0.05


def _cfg() -> Config:
    return Config.defaults().replace({"unit.name": "vault-1"})


def _refused_fast(fn: Any, exc: type[BaseException], match: str) -> None:
    t = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    assert time.perf_counter() - t < REFUSED_WITHIN_S


# ------------------------------------------------------------------ the sealed blob


def test_a_new_blob_is_argon2id_at_the_stated_cost() -> None:
    blob = seal(_cfg(), PASSWORD)
    h = read_header(blob)
    assert h.version == 3 and h.params == SEAL_KEY_PARAMS == Argon2Params(128 << 10, 3, 1)
    assert struct.unpack_from("<I", blob, 10)[0] == 128 << 10
    assert unseal(blob, PASSWORD)["unit.name"] == "vault-1"
    with pytest.raises(WrongPassword):
        unseal(blob, "not the password")


def test_an_old_scrypt_blob_still_opens() -> None:
    blob = seal(_cfg(), PASSWORD, params=OLD)
    h = read_header(blob)
    assert h.version == 2 and h.params == OLD
    assert unseal(blob, PASSWORD)["unit.name"] == "vault-1"


def test_tampered_parameters_are_refused() -> None:
    blob = bytearray(seal(_cfg(), PASSWORD, params=FAST))
    fields = list(SEAL_HEADER_V3.unpack_from(blob))
    for i, value in ((2, 128), (3, 2)):  # more memory, another pass: both still in bounds
        changed = fields.copy()
        changed[i] = value
        bad = SEAL_HEADER_V3.pack(*changed) + bytes(blob[SEAL_HEADER_V3.size:])
        # Other parameters derive another key: its check does not match, nothing opens.
        with pytest.raises((WrongPassword, SealTampered)):
            unseal(bad, PASSWORD)
    # The version says how the parameters are read: as scrypt they are out of range.
    downgraded = blob[:8] + struct.pack("<H", 2) + blob[10:]
    with pytest.raises(SealFormatError, match="unacceptable key derivation"):
        unseal(bytes(downgraded), PASSWORD)


@pytest.mark.parametrize("memory_kib,passes,lanes,why", [
    (64 << 20, 3, 1, "KiB, more than"),          # 64 GiB
    (257 << 10, 3, 1, "KiB, more than"),         # just over the board's bound
    (64, 255, 1, "passes, more than"),
    (64, 0, 1, "out of range"),
    (64, 1, 0, "out of range"),
])
def test_a_crafted_blob_cannot_ask_for_unbounded_cost(memory_kib: int, passes: int,
                                                      lanes: int, why: str) -> None:
    blob = seal(_cfg(), PASSWORD, params=FAST)
    fields = list(SEAL_HEADER_V3.unpack_from(blob))
    fields[2:5] = [memory_kib, passes, lanes]
    crafted = SEAL_HEADER_V3.pack(*fields) + blob[SEAL_HEADER_V3.size:]
    _refused_fast(lambda: unseal(crafted, PASSWORD), SealFormatError, why)


def test_a_crafted_scrypt_blob_is_bounded_too() -> None:
    blob = seal(_cfg(), PASSWORD, params=OLD)
    fields = list(SEAL_HEADER.unpack_from(blob))
    fields[2] = 24  # 2^24 x 1 KiB x r=8: 16 GiB
    crafted = SEAL_HEADER.pack(*fields) + blob[SEAL_HEADER.size:]
    _refused_fast(lambda: unseal(crafted, PASSWORD), SealFormatError, "too much memory")


def test_seal_key_text_round_trips_both_schemes() -> None:
    new = make_seal_key(PASSWORD, FAST)
    assert new.encode().startswith("$sealkey$v2$m=64,t=1,p=1$")
    assert parse_seal_key("k", new.encode()) == new
    old = make_seal_key(PASSWORD, OLD)
    assert old.encode().startswith("$sealkey$v1$ln=4,r=8,p=1$")
    assert parse_seal_key("k", old.encode()) == old
    assert unseal(seal_with_key(_cfg(), old), PASSWORD)["unit.name"] == "vault-1"
    with pytest.raises(ConfigError, match="more than"):
        parse_seal_key("k", new.encode().replace("m=64,", "m=67108864,"))


# ------------------------------------------------------------------ the password hash


def test_a_new_password_hash_is_argon2id() -> None:
    stored = hash_password_text(PASSWORD)
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=1$")
    assert PASSWORD_PARAMS == Argon2Params(64 << 10, 3, 1)
    assert verify_password(stored, PASSWORD) and not verify_password(stored, PASSWORD + "x")


def test_an_old_scrypt_hash_verifies() -> None:
    stored = hash_password_text(PASSWORD, ScryptParams())
    assert stored.startswith("$scrypt$ln=14,r=8,p=1$")
    assert verify_password(stored, PASSWORD) and not verify_password(stored, "wrong one!!")


@pytest.mark.parametrize("params,why", [
    ("m=67108864,t=3,p=1", "KiB, more than"),        # 64 GiB
    ("m=65536,t=1000000000,p=1", "passes, more than"),  # 10^9 passes
    ("m=65536,t=3,p=255", "out of range"),
])
def test_a_crafted_hash_is_refused_before_hashing(params: str, why: str) -> None:
    good = hash_password_text(PASSWORD, FAST)
    head, _, rest = good.partition("m=64,t=1,p=1")
    crafted = head + params + rest
    _refused_fast(lambda: verify_password(crafted, PASSWORD), ConfigError, why)
    with pytest.raises(ConfigError):
        Config.defaults().replace({"admin.password_hash": crafted})


def test_other_argon2_variants_are_not_accepted() -> None:
    good = hash_password_text(PASSWORD, FAST)
    with pytest.raises(ConfigError, match="only argon2id"):
        verify_password(good.replace("$argon2id$", "$argon2i$"), PASSWORD)


def test_a_login_upgrades_an_old_hash_and_seal_key(tmp_path: Path) -> None:
    store = ConfigStore(StoreSettings(str(tmp_path / "c.slots")))
    store.save(Config.defaults().replace({
        "admin.password_hash": hash_password_text(PASSWORD, ScryptParams()),
        "admin.seal_key": make_seal_key(PASSWORD, OLD).encode()}))
    assert not store.login("not the password")
    cfg = store.load().config
    assert cfg is not None and cfg["admin.password_hash"].startswith("$scrypt$")
    assert store.login(PASSWORD)
    cfg = store.load().config
    assert cfg is not None and cfg["admin.password_hash"].startswith("$argon2id$v=19$m=65536,")
    assert cfg["admin.seal_key"].startswith("$sealkey$v2$m=131072,t=3,p=1$")
    assert check_admin_password(cfg, PASSWORD)
    generation = store.load().generation
    assert store.login(PASSWORD) and store.load().generation == generation  # done once


# ------------------------------------------------------------------ the recovery challenge


def test_params_from_a_challenge_are_bounded() -> None:
    assert params_from_cost("argon2id", (64, 1, 1), "seal") == FAST
    assert params_from_cost("scrypt", (4, 8, 1), "seal") == OLD
    for kdf, cost in (("argon2id", (1 << 22, 3, 1)), ("argon2id", (64, 200, 1)),
                      ("scrypt", (24, 64, 16)), ("bcrypt", (1, 1, 1))):
        with pytest.raises(ConfigError):
            params_from_cost(kdf, cost, "seal")


def test_a_recovering_unit_refuses_a_challenge_of_unbounded_cost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = load_or_create_identity(tmp_path / "peer", "unit-b")

    def exchange(address: tuple[str, int], fp: str, unit_id: str | None, prove: Any,
                 timeout: float) -> RecoveryOutcome:
        prove(RecoverChallenge("unit-a", "argon2id", (64 << 20, 3, 1), b"s" * 16,
                               b"n" * 32))
        raise AssertionError("a proof was made")

    monkeypatch.setattr(restore, "recovery_exchange", exchange)
    store = ConfigStore(StoreSettings(str(tmp_path / "new.slots")))
    _refused_fast(lambda: PeerRecovery(store, tmp_path / "state").recover(
        ("192.0.2.7", 7300), peer.fingerprint, PASSWORD), SealFormatError,
        "unacceptable key derivation")
    assert not (tmp_path / "new.slots").exists()
