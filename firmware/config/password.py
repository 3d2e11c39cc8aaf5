"""The administrator password: Argon2id hashes with their parameters stored beside them.

Stored form: argon2's PHC string ``$argon2id$v=19$m=65536,t=3,p=1$<salt>$<hash>``
(`kdf.py`); hashes of the older ``$scrypt$ln=14,r=8,p=1$...`` form still verify and
are replaced by an Argon2id hash at the next successful login (`upgraded_hash`).
"""

from __future__ import annotations

from collections.abc import Sequence

from zxcvbn import zxcvbn

from .errors import ConfigError
from .kdf import (
    PASSWORD_PARAMS,
    KdfParams,
    check_password_hash,
    hash_password_text,
    needs_upgrade,
    verify_password_text,
)
from .schema import Config

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
#: zxcvbn's score (0-4): 3 is "safely unguessable: moderate protection from offline
#: slow-hash scenario" (at least 10^8 guesses), which is the threat a sealed backup faces
#: on a stolen peer.
MIN_STRENGTH_SCORE = 3
#: zxcvbn's own input limit; its matching cost grows with the length, so a longer
#: password is judged on its first characters (a strong start stays strong).
STRENGTH_CHECK_CHARS = 72
KEY = "admin.password_hash"



def check_hash_format(key: str, stored: str) -> None:
    check_password_hash(key, stored)


def check_password_strength(clear: str, user_inputs: Sequence[str] = ()) -> None:
    """Refuse a password zxcvbn scores below `MIN_STRENGTH_SCORE`, with its warning and
    suggestions as the reason (never the password)."""
    result = zxcvbn(clear[:STRENGTH_CHECK_CHARS],
                    user_inputs=[u for u in user_inputs if u])
    if result["score"] >= MIN_STRENGTH_SCORE:
        return
    feedback = result.get("feedback") or {}
    why = [feedback.get("warning") or "", *(feedback.get("suggestions") or [])]
    reason = " ".join(w for w in why if w) or "It would be guessed too easily."
    raise ConfigError(KEY, f"the password is too weak (score {result['score']} of 4, "
                           f"{MIN_STRENGTH_SCORE} needed): {reason}")


def check_password_policy(clear: str, user_inputs: Sequence[str] = ()) -> None:
    # The message never includes the password itself.
    if not isinstance(clear, str):
        raise ConfigError(KEY, "the password must be text")
    if len(clear) < MIN_PASSWORD_LENGTH:
        raise ConfigError(KEY, f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(clear) > MAX_PASSWORD_LENGTH:
        raise ConfigError(KEY, f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if clear.strip() != clear or any(ord(c) < 0x20 for c in clear):
        raise ConfigError(KEY, "the password must not start or end with blanks "
                               "or contain control characters")
    check_password_strength(clear, user_inputs)


def hash_password(clear: str, params: KdfParams | None = None,
                  user_inputs: Sequence[str] = ()) -> str:
    check_password_policy(clear, user_inputs)
    return hash_password_text(clear, params or PASSWORD_PARAMS)


def verify_password(stored: str, clear: str) -> bool:
    """True when `clear` is the password `stored` hashes; the stored parameters are
    bounded before any hashing (`ConfigError` for a hash that is not acceptable)."""
    if not stored or not isinstance(clear, str) or len(clear) > MAX_PASSWORD_LENGTH:
        return False
    return verify_password_text(KEY, stored, clear)


def set_admin_password(cfg: Config, clear: str) -> Config:
    """A new Config whose admin password is `clear` (stored only as a salted hash),
    with the seal key derived from it so peer backups are re-sealed unattended."""
    from .seal import SEAL_KEY_FIELD, make_seal_key

    # The unit's own names are the first thing an attacker would try.
    hashed = hash_password(clear, user_inputs=(cfg["unit.name"], cfg["unit.serial"],
                                               "mirrorunit"))
    return cfg.replace({KEY: hashed, SEAL_KEY_FIELD: make_seal_key(clear).encode()})


def check_admin_password(cfg: Config, clear: str) -> bool:
    """True if `clear` is the admin password; False when none is set."""
    return verify_password(cfg[KEY], clear)


def upgraded_password(cfg: Config, clear: str) -> Config | None:
    """After `clear` was verified: a new Config with the hash (and the seal key) at
    today's parameters when the stored ones are older (scrypt) or weaker; None when
    nothing needs doing.  No strength check: this is the password already in use."""
    from .seal import SEAL_KEY_FIELD, make_seal_key, parse_seal_key

    changes: dict[str, str] = {}
    if cfg[KEY] and needs_upgrade(cfg[KEY]):
        changes[KEY] = hash_password_text(clear)
    sk_text = cfg[SEAL_KEY_FIELD]
    if sk_text and needs_upgrade_seal(parse_seal_key(SEAL_KEY_FIELD, sk_text).params):
        changes[SEAL_KEY_FIELD] = make_seal_key(clear).encode()
    return cfg.replace(changes) if changes else None


def needs_upgrade_seal(params: KdfParams) -> bool:
    from .kdf import SEAL_KEY_PARAMS, Argon2Params

    return not isinstance(params, Argon2Params) or \
        params.memory_kib < SEAL_KEY_PARAMS.memory_kib or \
        params.time_cost < SEAL_KEY_PARAMS.time_cost
