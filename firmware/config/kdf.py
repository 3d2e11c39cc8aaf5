"""Key derivation from the admin password, and the text forms its results are kept in.

Two schemes, each stored with its parameters so the cost can be raised later
without invalidating what units in the field already hold:

- **Argon2id** (argon2-cffi, RFC 9106), memory-hard: what new hashes, seal keys and
  blobs use.  Password hashes are argon2's own PHC string
  ``$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>``; seal keys are
  ``$sealkey$v2$m=..,t=..,p=..$<salt>$<key>$<check>`` (standard base64).
- **scrypt**, what units wrote before: ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>``
  and ``$sealkey$v1$ln=..,r=..,p=..$...``.  Still verified and opened; a password
  hash in this form is replaced at the next successful login (`needs_upgrade`).

Every parameter set read from storage or from a peer is checked against fixed
bounds (`check`) before any hashing, so a crafted hash, blob or challenge cannot
make a unit allocate gigabytes or spin for hours.

Costs on this project's boards are stated in docs/config.md ("Key derivation").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import argon2
from argon2.low_level import Type, hash_secret_raw

from .errors import ConfigError

#: Refuse stored parameters that would make a check exhaust the board's memory.
MAX_MEMORY = 256 << 20
#: Argon2id passes above this are refused: 16 passes of 256 MiB is already ~10 s on
#: a Cortex-A72.
MAX_ARGON2_TIME_COST = 16
MAX_LANES = 16

# ---------------------------------------------------------------- scrypt (legacy)

#: 2**14 x 128 x 8 bytes = 16 MiB per hash (what password hashes used before Argon2id).
DEFAULT_LOG2_N = 14
DEFAULT_R = 8
DEFAULT_P = 1


@dataclass(frozen=True)
class ScryptParams:
    log2_n: int = DEFAULT_LOG2_N
    r: int = DEFAULT_R
    p: int = DEFAULT_P

    kdf = "scrypt"

    @property
    def memory(self) -> int:
        return 128 * self.r * (1 << self.log2_n) * self.p

    @property
    def cost(self) -> tuple[int, int, int]:
        """The three numbers as the recovery challenge carries them."""
        return self.log2_n, self.r, self.p

    def check(self, key: str) -> None:
        if not (1 <= self.log2_n <= 24 and 1 <= self.r <= 64 and 1 <= self.p <= MAX_LANES):
            raise ConfigError(key, "scrypt parameters out of range")
        if self.memory > MAX_MEMORY:
            raise ConfigError(key, "scrypt parameters need too much memory")

    def derive(self, secret: bytes, salt: bytes, length: int) -> bytes:
        self.check("kdf")
        return hashlib.scrypt(secret, salt=salt, n=1 << self.log2_n, r=self.r, p=self.p,
                              maxmem=self.memory + (16 << 20), dklen=length)

    def text(self) -> str:
        return f"ln={self.log2_n},r={self.r},p={self.p}"


# ---------------------------------------------------------------- Argon2id

@dataclass(frozen=True)
class Argon2Params:
    """Argon2id (version 0x13) parameters: memory in KiB, passes, lanes."""

    memory_kib: int
    time_cost: int
    parallelism: int = 1

    kdf = "argon2id"

    @property
    def memory(self) -> int:
        return self.memory_kib << 10

    @property
    def cost(self) -> tuple[int, int, int]:
        return self.memory_kib, self.time_cost, self.parallelism

    def check(self, key: str) -> None:
        if not (1 <= self.parallelism <= MAX_LANES and 1 <= self.time_cost
                and 8 * self.parallelism <= self.memory_kib):
            raise ConfigError(key, "argon2id parameters out of range")
        if self.time_cost > MAX_ARGON2_TIME_COST:
            raise ConfigError(key, f"argon2id asks for {self.time_cost} passes, more than "
                                   f"{MAX_ARGON2_TIME_COST}")
        if self.memory > MAX_MEMORY:
            raise ConfigError(key, f"argon2id asks for {self.memory_kib} KiB, more than "
                                   f"{MAX_MEMORY >> 10}")

    def derive(self, secret: bytes, salt: bytes, length: int) -> bytes:
        self.check("kdf")
        return hash_secret_raw(secret, salt, time_cost=self.time_cost,
                               memory_cost=self.memory_kib, parallelism=self.parallelism,
                               hash_len=length, type=Type.ID, version=19)

    def text(self) -> str:
        return f"m={self.memory_kib},t={self.time_cost},p={self.parallelism}"


KdfParams = ScryptParams | Argon2Params

#: The admin password hash: 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended
#: setting with one lane): ~0.16 s on the x86 build host, ~1 s estimated on a Pi 4.
PASSWORD_PARAMS = Argon2Params(memory_kib=64 << 10, time_cost=3, parallelism=1)
#: The seal key of the peer backup: a blob sits on other units for years and is
#: what a thief of a peer's disk guesses against, so it costs twice the memory:
#: ~0.42 s here, ~2.5 s estimated on a Pi 4.
SEAL_KEY_PARAMS = Argon2Params(memory_kib=128 << 10, time_cost=3, parallelism=1)


def params_from_cost(kdf: str, cost: tuple[int, int, int], key: str) -> KdfParams:
    """The checked parameters a recovery challenge (or a blob header) names."""
    if kdf == "scrypt":
        params: KdfParams = ScryptParams(*cost)
    elif kdf == "argon2id":
        params = Argon2Params(*cost)
    else:
        raise ConfigError(key, f"unknown key derivation {kdf!r}")
    params.check(key)
    return params


# ---------------------------------------------------------------- stored texts

def format_derived(scheme: str, params: KdfParams, *parts: bytes) -> str:
    """``$scheme$<params>`` and each part in base64."""
    return (f"${scheme}${params.text()}"
            + "".join(f"${base64.b64encode(part).decode()}" for part in parts))


_SCRYPT_TEXT = r"ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})"
_ARGON2_TEXT = r"m=(\d{1,10}),t=(\d{1,10}),p=(\d{1,2})"


def parse_derived(scheme: str, key: str, stored: str, parts: int, what: str,
                  params_text: str = _SCRYPT_TEXT) -> tuple[KdfParams, list[bytes]]:
    """The parameters (checked) and the `parts` byte strings of a `format_derived`
    text; `ConfigError` naming `key` and `what` (e.g. "password hash") otherwise."""
    m = re.match(r"^\$" + re.escape(scheme) + r"\$" + params_text
                 + r"\$([A-Za-z0-9+/=]+)" * parts + "$", stored)
    if not m:
        raise ConfigError(key, f"not a recognised {what}")
    numbers = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    params: KdfParams = ScryptParams(*numbers) if params_text == _SCRYPT_TEXT \
        else Argon2Params(*numbers)
    params.check(key)
    try:
        values = [base64.b64decode(m.group(4 + i), validate=True) for i in range(parts)]
    except ValueError:
        raise ConfigError(key, f"{what} is not valid base64") from None
    return params, values


#: The schemes of the texts derived from the admin password.
PASSWORD_SCHEME = "scrypt"
#: Any argon2 hash is read as one (and refused unless it is argon2id, version 19).
ARGON2_PASSWORD_PREFIX = "$argon2"
SEAL_KEY_SCHEME = "sealkey$v1"
SEAL_KEY_SCHEME_ARGON2 = "sealkey$v2"
SEAL_SALT_BYTES = 16
PASSWORD_HASH_BYTES = 32
PASSWORD_SALT_BYTES = 16


def _argon2_hasher(params: Argon2Params) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(time_cost=params.time_cost, memory_cost=params.memory_kib,
                                 parallelism=params.parallelism,
                                 hash_len=PASSWORD_HASH_BYTES, salt_len=PASSWORD_SALT_BYTES,
                                 type=Type.ID)


def hash_password_text(clear: str, params: KdfParams = PASSWORD_PARAMS) -> str:
    """The stored form of the admin password under `params` (no policy check here)."""
    params.check("admin.password_hash")
    if isinstance(params, Argon2Params):
        return _argon2_hasher(params).hash(clear)
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES)
    digest = params.derive(clear.encode("utf-8"), salt, PASSWORD_HASH_BYTES)
    return format_derived(PASSWORD_SCHEME, params, salt, digest)


def parse_argon2_hash(key: str, stored: str) -> Argon2Params:
    """The checked parameters of an ``$argon2id$`` hash; `ConfigError` otherwise
    (another argon2 variant or version included)."""
    if len(stored) > 256:
        raise ConfigError(key, "not a recognised password hash")
    try:
        p = argon2.extract_parameters(stored)
    except (argon2.exceptions.InvalidHashError, ValueError):
        raise ConfigError(key, "not a recognised password hash") from None
    if p.type is not Type.ID or p.version != 19:
        raise ConfigError(key, "only argon2id version 19 password hashes are accepted")
    if not (8 <= p.salt_len <= 64 and 16 <= p.hash_len <= 64):
        raise ConfigError(key, "password hash has a bad salt or digest length")
    params = Argon2Params(p.memory_cost, p.time_cost, p.parallelism)
    params.check(key)
    return params


def check_password_hash(key: str, stored: str) -> KdfParams:
    """The checked parameters of a stored admin password hash of either scheme."""
    if stored.startswith(ARGON2_PASSWORD_PREFIX):
        return parse_argon2_hash(key, stored)
    return parse_password_hash(key, stored)[0]


def verify_password_text(key: str, stored: str, clear: str) -> bool:
    """True when `clear` matches `stored` (either scheme; parameters bounded first)."""
    if stored.startswith(ARGON2_PASSWORD_PREFIX):
        params = parse_argon2_hash(key, stored)
        try:
            return bool(_argon2_hasher(params).verify(stored, clear))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            raise ConfigError(key, "not a recognised password hash") from None
    sparams, salt, digest = parse_password_hash(key, stored)
    candidate = sparams.derive(clear.encode("utf-8"), salt, len(digest))
    return hmac.compare_digest(candidate, digest)


def needs_upgrade(stored: str, params: KdfParams = PASSWORD_PARAMS) -> bool:
    """True when a stored hash is of the old scheme or weaker than `params`."""
    if not stored.startswith(ARGON2_PASSWORD_PREFIX) or not isinstance(params, Argon2Params):
        return True
    try:
        have = parse_argon2_hash("admin.password_hash", stored)
    except ConfigError:
        return True
    return have.memory_kib < params.memory_kib or have.time_cost < params.time_cost


def parse_password_hash(key: str, stored: str) -> tuple[ScryptParams, bytes, bytes]:
    """(params, salt, digest) of a stored scrypt admin password hash; `ConfigError`
    otherwise."""
    params, (salt, digest) = parse_derived(PASSWORD_SCHEME, key, stored, 2, "password hash")
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ConfigError(key, "password hash has a bad salt or digest length")
    assert isinstance(params, ScryptParams)
    return params, salt, digest


def seal_key_scheme(params: KdfParams) -> str:
    return SEAL_KEY_SCHEME_ARGON2 if isinstance(params, Argon2Params) else SEAL_KEY_SCHEME


def parse_seal_key_text(key: str, stored: str) -> tuple[KdfParams, bytes, bytes, bytes]:
    """(params, salt, key, check) of a stored seal key; `ConfigError` otherwise."""
    if stored.startswith(f"${SEAL_KEY_SCHEME_ARGON2}$"):
        params, (salt, sealing, check) = parse_derived(SEAL_KEY_SCHEME_ARGON2, key, stored, 3,
                                                       "seal key", _ARGON2_TEXT)
    else:
        params, (salt, sealing, check) = parse_derived(SEAL_KEY_SCHEME, key, stored, 3,
                                                       "seal key")
    if len(salt) != SEAL_SALT_BYTES or len(sealing) != 32 or len(check) != 32:
        raise ConfigError(key, "seal key has a bad salt, key or check length")
    return params, salt, sealing, check
