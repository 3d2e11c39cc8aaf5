"""Peer backup: the whole config, encrypted under the admin password.

A unit hands its sealed config to its peers so a replacement unit can be
restored from them; the peers never see anything in clear.

Blob: a 76-byte header (magic, version, key derivation parameters, salt, nonce,
key check) followed by AES-256-GCM(CBOR body) with the header as associated data,
so any change to header or ciphertext fails authentication.  The key derivation
yields 64 bytes: the first 32 are the AES key, a hash of the last 32 is the key
check that tells a wrong password apart from a damaged blob.

Version 1 bodies are the config document alone.  Version 2 bodies are a map
``{"config": document, "identity": {"key", "cert", "peers"}}`` so a replaced
unit comes back with the TLS identity its peers pinned.  Versions 1 and 2 derive
the key with scrypt (SEAL_HEADER: log2 N, r, p); version 3 has the version 2 body
and derives it with Argon2id (SEAL_HEADER_V3: memory in KiB, passes, lanes).  New
blobs are version 3 unless the stored seal key is an old scrypt one (it is
replaced at the next login, see password.upgraded_password).  The parameters of
every header are bounded (kdf.py) before any derivation.

The derived key, its salt and check can be kept in the config itself
(``admin.seal_key``, a secret field): the unit then re-seals every new config
generation without anyone typing the password, and the blob still opens with
`unseal(blob, password)` because the salt is the same.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import cbor_strict
from .errors import ConfigError, SealFormatError, SealTampered, WrongPassword
from .kdf import (
    SEAL_KEY_PARAMS,
    SEAL_SALT_BYTES,
    Argon2Params,
    KdfParams,
    ScryptParams,
    format_derived,
    parse_seal_key_text,
    seal_key_scheme,
)
from .schema import BoardLimits, Config, from_document

SEAL_MAGIC = b"MUSEALED"
#: The version of a blob sealed with scrypt (a seal key from before Argon2id).
SEAL_VERSION_SCRYPT = 2
#: The version of a blob sealed with Argon2id: what new seal keys give.
SEAL_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
#: Versions 1 and 2: magic, version, log2(N), r, p, reserved, salt, nonce, key check
SEAL_HEADER = struct.Struct("<8sHBBB3x16s12s32s")
assert SEAL_HEADER.size == 76
#: Version 3: magic, version, memory (KiB), passes, lanes, salt, nonce, key check
SEAL_HEADER_V3 = struct.Struct("<8sHIBB16s12s32s")
assert SEAL_HEADER_V3.size == SEAL_HEADER.size
SALT_BYTES = SEAL_SALT_BYTES
NONCE_BYTES = 12
#: A blob sits on other units for years, so it gets a higher cost than a login.
SEAL_PARAMS: KdfParams = SEAL_KEY_PARAMS
_CHECK_LABEL = b"mirrorunit seal key check v1"
SEAL_KEY_FIELD = "admin.seal_key"


@dataclass(frozen=True)
class SealHeader:
    version: int
    params: KdfParams
    salt: bytes
    nonce: bytes
    check: bytes


@dataclass(frozen=True)
class SealKey:
    """What sealing needs besides the config: derived once from the password."""

    params: KdfParams
    salt: bytes
    key: bytes
    check: bytes

    def encode(self) -> str:
        return format_derived(seal_key_scheme(self.params), self.params, self.salt, self.key,
                              self.check)

    def __repr__(self) -> str:
        # Keeps the key out of tracebacks and logs.
        return f"SealKey(params={self.params!r}, salt=..., key=..., check=...)"


@dataclass(frozen=True)
class SealedIdentity:
    """A unit's link identity as carried in a version 2 blob (PEM bytes)."""

    key_pem: bytes
    cert_pem: bytes
    #: The pinned-peers file, when the unit had one.
    peers: bytes | None = None

    def __repr__(self) -> str:
        return "SealedIdentity(key_pem=..., cert_pem=..., peers=...)"


@dataclass(frozen=True)
class Unsealed:
    config: Config
    identity: SealedIdentity | None
    version: int


def _material(password: str, salt: bytes, params: KdfParams) -> tuple[bytes, bytes]:
    material = params.derive(password.encode("utf-8"), salt, 64)
    return material[:32], hashlib.sha256(_CHECK_LABEL + material[32:]).digest()


def key_check(password: str, salt: bytes, params: KdfParams) -> bytes:
    """The key check a blob sealed under `password` with this salt carries."""
    params.check("seal")
    return _material(password, salt, params)[1]


def make_seal_key(password: str, params: KdfParams = SEAL_PARAMS,
                  salt: bytes | None = None) -> SealKey:
    if not password:
        raise ConfigError("admin.password_hash", "an admin password is needed to seal a backup")
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    key, check = _material(password, salt, params)
    return SealKey(params, salt, key, check)


def parse_seal_key(field: str, stored: str) -> SealKey:
    return SealKey(*parse_seal_key_text(field, stored))


def seal_key_matches(sk: SealKey, password: str) -> bool:
    return hmac.compare_digest(_material(password, sk.salt, sk.params)[1], sk.check)


def _body(cfg: Config, identity: SealedIdentity | None) -> bytes:
    doc: dict[str, Any] = {"config": cfg.to_document(include_secrets=True)}
    if identity is not None:
        doc["identity"] = {"key": identity.key_pem, "cert": identity.cert_pem,
                           **({} if identity.peers is None else {"peers": identity.peers})}
    return cbor2.dumps(doc, canonical=True)


def seal_with_key(cfg: Config, sk: SealKey, identity: SealedIdentity | None = None) -> bytes:
    """Seal with stored key material: a fresh nonce every time, the key's salt."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    p = sk.params
    if isinstance(p, Argon2Params):
        header = SEAL_HEADER_V3.pack(SEAL_MAGIC, SEAL_VERSION, p.memory_kib, p.time_cost,
                                     p.parallelism, sk.salt, nonce, sk.check)
    else:
        header = SEAL_HEADER.pack(SEAL_MAGIC, SEAL_VERSION_SCRYPT, p.log2_n, p.r, p.p,
                                  sk.salt, nonce, sk.check)
    return header + AESGCM(sk.key).encrypt(nonce, _body(cfg, identity), header)


def seal(cfg: Config, admin_password: str, *, params: KdfParams = SEAL_PARAMS,
         identity: SealedIdentity | None = None) -> bytes:
    return seal_with_key(cfg, make_seal_key(admin_password, params), identity)


def read_header(blob: bytes) -> SealHeader:
    """The header of a sealed blob, checked for shape (not for authenticity: only
    the password does that)."""
    if len(blob) < SEAL_HEADER.size + 16:
        raise SealFormatError(f"blob of {len(blob)} bytes is too short")
    magic, version, a, b, c, salt, nonce, check = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC:
        raise SealFormatError("not a sealed MirrorUnit config (bad magic)")
    if version not in SUPPORTED_VERSIONS:
        raise SealFormatError(f"sealed config version {version} is not supported")
    params: KdfParams
    if version >= 3:
        _, _, memory_kib, passes, lanes, salt, nonce, check = SEAL_HEADER_V3.unpack_from(blob)
        params = Argon2Params(memory_kib, passes, lanes)
    else:
        params = ScryptParams(a, b, c)
    try:
        params.check("seal")
    except ConfigError as e:
        raise SealFormatError(f"unacceptable key derivation parameters: {e.message}") from None
    return SealHeader(version, params, salt, nonce, check)


def _identity(doc: Any) -> SealedIdentity | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), bytes) \
            or not isinstance(doc.get("cert"), bytes) \
            or not isinstance(doc.get("peers", b""), bytes):
        raise SealFormatError("sealed identity is malformed")
    return SealedIdentity(doc["key"], doc["cert"], doc.get("peers"))


def unseal_bundle(blob: bytes, admin_password: str,
                  limits: BoardLimits | None = None) -> Unsealed:
    """The config (and, from version 2, the link identity) inside `blob`;
    WrongPassword, SealTampered or SealFormatError otherwise."""
    h = read_header(blob)
    key, expected = _material(admin_password, h.salt, h.params)
    if not hmac.compare_digest(expected, h.check):
        raise WrongPassword("the admin password does not open this backup")
    header = blob[:SEAL_HEADER.size]
    try:
        body = AESGCM(key).decrypt(h.nonce, blob[SEAL_HEADER.size:], header)
    except InvalidTag:
        raise SealTampered("the backup was altered or damaged after sealing") from None
    try:
        doc = cbor_strict.loads(body, floats=True)
    except (ValueError, TypeError) as e:
        raise SealFormatError(f"sealed body is not CBOR: {e}") from None
    if h.version == 1:
        return Unsealed(from_document(doc, limits), None, 1)
    if not isinstance(doc, dict) or "config" not in doc:
        raise SealFormatError("sealed body has no config")
    return Unsealed(from_document(doc["config"], limits), _identity(doc.get("identity")),
                    h.version)


def unseal(blob: bytes, admin_password: str, limits: BoardLimits | None = None) -> Config:
    """The Config inside `blob`; WrongPassword, SealTampered or SealFormatError otherwise."""
    return unseal_bundle(blob, admin_password, limits).config
