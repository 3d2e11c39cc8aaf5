"""The administrator password: scrypt hashes with their parameters stored beside them.

Stored form: ``$scrypt$ln=14,r=8,p=1$<salt, base64>$<hash, base64>`` (`kdf.py`), so
the cost can be raised later without invalidating hashes already on units in the field.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence

from zxcvbn import zxcvbn

from .errors import ConfigError
from .kdf import PASSWORD_SCHEME, ScryptParams, format_derived, parse_password_hash
from .schema import Config

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
#: zxcvbn's score (0-4): 3 is "safely unguessable: moderate protection from offline
#: slow-hash scenario" (about 10^10 guesses), which is the threat a sealed backup faces
#: on a stolen peer.
MIN_STRENGTH_SCORE = 3
#: zxcvbn's own input limit; its matching cost grows with the length, so a longer
#: password is judged on its first characters (a strong start stays strong).
STRENGTH_CHECK_CHARS = 72
KEY = "admin.password_hash"

SALT_BYTES = 16
HASH_BYTES = 32


def check_hash_format(key: str, stored: str) -> None:
    parse_password_hash(key, stored)


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


def hash_password(clear: str, params: ScryptParams | None = None,
                  user_inputs: Sequence[str] = ()) -> str:
    check_password_policy(clear, user_inputs)
    params = params or ScryptParams()
    salt = secrets.token_bytes(SALT_BYTES)
    digest = params.derive(clear.encode("utf-8"), salt, HASH_BYTES)
    return format_derived(PASSWORD_SCHEME, params, salt, digest)


def verify_password(stored: str, clear: str) -> bool:
    if not stored or not isinstance(clear, str) or len(clear) > MAX_PASSWORD_LENGTH:
        return False
    params, salt, digest = parse_password_hash(KEY, stored)
    candidate = params.derive(clear.encode("utf-8"), salt, len(digest))
    return hmac.compare_digest(candidate, digest)


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
