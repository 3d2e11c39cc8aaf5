"""The administrator password: scrypt hashes with their parameters stored beside them.

Stored form: ``$scrypt$ln=14,r=8,p=1$<salt, base64>$<hash, base64>`` so the cost
can be raised later without invalidating hashes already on units in the field.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from .errors import ConfigError
from .schema import Config

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
KEY = "admin.password_hash"

#: 2**14 x 128 x 8 bytes = 16 MiB per hash: affordable on a Pi, costly to brute-force.
DEFAULT_LOG2_N = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: Refuse stored parameters that would make a check exhaust the board's memory.
MAX_MEMORY = 256 << 20

_FORMAT = re.compile(
    r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


@dataclass(frozen=True)
class ScryptParams:
    log2_n: int = DEFAULT_LOG2_N
    r: int = DEFAULT_R
    p: int = DEFAULT_P

    @property
    def memory(self) -> int:
        return 128 * self.r * (1 << self.log2_n) * self.p

    def check(self, key: str) -> None:
        if not (1 <= self.log2_n <= 24 and 1 <= self.r <= 64 and 1 <= self.p <= 16):
            raise ConfigError(key, "scrypt parameters out of range")
        if self.memory > MAX_MEMORY:
            raise ConfigError(key, "scrypt parameters need too much memory")

    def derive(self, secret: bytes, salt: bytes, length: int) -> bytes:
        return hashlib.scrypt(secret, salt=salt, n=1 << self.log2_n, r=self.r, p=self.p,
                              maxmem=self.memory + (16 << 20), dklen=length)


def _parse(key: str, stored: str) -> tuple[ScryptParams, bytes, bytes]:
    m = _FORMAT.match(stored)
    if not m:
        raise ConfigError(key, "not a recognised password hash")
    params = ScryptParams(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    params.check(key)
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except ValueError:
        raise ConfigError(key, "password hash is not valid base64") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ConfigError(key, "password hash has a bad salt or digest length")
    return params, salt, digest


def check_hash_format(key: str, stored: str) -> None:
    _parse(key, stored)


def check_password_policy(clear: str) -> None:
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


def hash_password(clear: str, params: ScryptParams | None = None) -> str:
    check_password_policy(clear)
    params = params or ScryptParams()
    salt = secrets.token_bytes(SALT_BYTES)
    digest = params.derive(clear.encode("utf-8"), salt, HASH_BYTES)
    b64 = base64.b64encode
    return (f"$scrypt$ln={params.log2_n},r={params.r},p={params.p}"
            f"${b64(salt).decode()}${b64(digest).decode()}")


def verify_password(stored: str, clear: str) -> bool:
    if not stored or not isinstance(clear, str) or len(clear) > MAX_PASSWORD_LENGTH:
        return False
    params, salt, digest = _parse(KEY, stored)
    candidate = params.derive(clear.encode("utf-8"), salt, len(digest))
    return hmac.compare_digest(candidate, digest)


def set_admin_password(cfg: Config, clear: str) -> Config:
    """A new Config whose admin password is `clear` (stored only as a salted hash),
    with the seal key derived from it so peer backups are re-sealed unattended."""
    from .seal import SEAL_KEY_FIELD, make_seal_key

    hashed = hash_password(clear)
    return cfg.replace({KEY: hashed, SEAL_KEY_FIELD: make_seal_key(clear).encode()})


def check_admin_password(cfg: Config, clear: str) -> bool:
    """True if `clear` is the admin password; False when none is set."""
    return verify_password(cfg[KEY], clear)
