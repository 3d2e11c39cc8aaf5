"""Peer backup: the whole config, encrypted under the admin password.

A unit hands its sealed config to its peers so a replacement unit can be
restored from them; the peers never see anything in clear.

Blob: SEAL_HEADER (magic, version, scrypt parameters, salt, nonce, key check)
followed by AES-256-GCM(CBOR document) with the header as associated data, so
any change to header or ciphertext fails authentication.  scrypt yields 64 bytes:
the first 32 are the AES key, a hash of the last 32 is the key check that tells
a wrong password apart from a damaged blob.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, SealFormatError, SealTampered, WrongPassword
from .password import ScryptParams
from .schema import BoardLimits, Config, from_document

SEAL_MAGIC = b"MUSEALED"
SEAL_VERSION = 1
#: magic, version, log2(N), r, p, reserved, salt, nonce, key check
SEAL_HEADER = struct.Struct("<8sHBBB3x16s12s32s")
assert SEAL_HEADER.size == 76
#: 2**15: a blob sits on other units for years, so it gets a higher cost than a login.
SEAL_PARAMS = ScryptParams(log2_n=15, r=8, p=1)
_CHECK_LABEL = b"mirrorunit seal key check v1"


def _keys(password: str, salt: bytes, params: ScryptParams) -> tuple[bytes, bytes]:
    material = params.derive(password.encode("utf-8"), salt, 64)
    return material[:32], hashlib.sha256(_CHECK_LABEL + material[32:]).digest()


def seal(cfg: Config, admin_password: str, *, params: ScryptParams = SEAL_PARAMS) -> bytes:
    if not admin_password:
        raise ConfigError("admin.password_hash", "an admin password is needed to seal a backup")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    key, check = _keys(admin_password, salt, params)
    header = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_VERSION, params.log2_n, params.r, params.p,
                              salt, nonce, check)
    body = cbor2.dumps(cfg.to_document(include_secrets=True), canonical=True)
    return header + AESGCM(key).encrypt(nonce, body, header)


def unseal(blob: bytes, admin_password: str, limits: BoardLimits | None = None) -> Config:
    """The Config inside `blob`; WrongPassword, SealTampered or SealFormatError otherwise."""
    if len(blob) < SEAL_HEADER.size + 16:
        raise SealFormatError(f"blob of {len(blob)} bytes is too short")
    magic, version, log2_n, r, p, salt, nonce, check = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC:
        raise SealFormatError("not a sealed MirrorUnit config (bad magic)")
    if version != SEAL_VERSION:
        raise SealFormatError(f"sealed config version {version} is not supported")
    params = ScryptParams(log2_n, r, p)
    try:
        params.check("seal")
    except ConfigError as e:
        raise SealFormatError(f"unacceptable key derivation parameters: {e.message}") from None
    key, expected = _keys(admin_password, salt, params)
    if not hmac.compare_digest(expected, check):
        raise WrongPassword("the admin password does not open this backup")
    header = blob[:SEAL_HEADER.size]
    try:
        body = AESGCM(key).decrypt(nonce, blob[SEAL_HEADER.size:], header)
    except InvalidTag:
        raise SealTampered("the backup was altered or damaged after sealing") from None
    try:
        doc = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as e:
        raise SealFormatError(f"sealed body is not CBOR: {e}") from None
    return from_document(doc, limits)
