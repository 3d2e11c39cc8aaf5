"""scrypt key derivation and the text form its results are stored in.

Both the admin password hash and the seal key are kept as
``$<scheme>$ln=<log2 N>,r=<r>,p=<p>$<base64>$<base64>...`` so the cost can be raised
later without invalidating what units in the field already hold.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from .errors import ConfigError

#: 2**14 x 128 x 8 bytes = 16 MiB per hash: affordable on a Pi, costly to brute-force.
DEFAULT_LOG2_N = 14
DEFAULT_R = 8
DEFAULT_P = 1
#: Refuse stored parameters that would make a check exhaust the board's memory.
MAX_MEMORY = 256 << 20


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


def format_derived(scheme: str, params: ScryptParams, *parts: bytes) -> str:
    """``$scheme$ln=..,r=..,p=..`` and each part in base64."""
    return (f"${scheme}$ln={params.log2_n},r={params.r},p={params.p}"
            + "".join(f"${base64.b64encode(part).decode()}" for part in parts))


def parse_derived(scheme: str, key: str, stored: str, parts: int, what: str
                  ) -> tuple[ScryptParams, list[bytes]]:
    """The parameters (checked) and the `parts` byte strings of a `format_derived`
    text; `ConfigError` naming `key` and `what` (e.g. "password hash") otherwise."""
    m = re.match(r"^\$" + re.escape(scheme) + r"\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})"
                 + r"\$([A-Za-z0-9+/=]+)" * parts + "$", stored)
    if not m:
        raise ConfigError(key, f"not a recognised {what}")
    params = ScryptParams(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    params.check(key)
    try:
        values = [base64.b64decode(m.group(4 + i), validate=True) for i in range(parts)]
    except ValueError:
        raise ConfigError(key, f"{what} is not valid base64") from None
    return params, values


#: The schemes of the two texts derived from the admin password.
PASSWORD_SCHEME = "scrypt"
SEAL_KEY_SCHEME = "sealkey$v1"
SEAL_SALT_BYTES = 16


def parse_password_hash(key: str, stored: str) -> tuple[ScryptParams, bytes, bytes]:
    """(params, salt, digest) of a stored admin password hash; `ConfigError` otherwise."""
    params, (salt, digest) = parse_derived(PASSWORD_SCHEME, key, stored, 2, "password hash")
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ConfigError(key, "password hash has a bad salt or digest length")
    return params, salt, digest


def parse_seal_key_text(key: str, stored: str) -> tuple[ScryptParams, bytes, bytes, bytes]:
    """(params, salt, key, check) of a stored seal key; `ConfigError` otherwise."""
    params, (salt, sealing, check) = parse_derived(SEAL_KEY_SCHEME, key, stored, 3, "seal key")
    if len(salt) != SEAL_SALT_BYTES or len(sealing) != 32 or len(check) != 32:
        raise ConfigError(key, "seal key has a bad salt, key or check length")
    return params, salt, sealing, check
