"""TLS identity and peer pinning for the journey link.

Each unit owns an EC P-256 key and a self-signed certificate made on first start.
Peers are pinned at pairing: their certificate is stored under a name (a unit id, or
the remote's name on a local unit) together with its SHA-256 fingerprint.

Python's ssl module offers no verification callback, so pinning is done with what it
does offer: the pinned certificates are the *only* trust anchors of the context
(`cadata`), `VERIFY_X509_PARTIAL_CHAIN` lets a self-signed leaf be its own anchor, and
both sides use `CERT_REQUIRED`.  OpenSSL then refuses any other certificate inside the
handshake, before a byte of application data is read.  After the handshake the peer's
DER fingerprint is compared again and mapped to the pinned name (with several pinned
units in one context, the anchor check alone does not say *which* unit connected).

P-256 rather than Ed25519: both work for TLS 1.3 with OpenSSL 3, but P-256 keeps the
door open to OpenSSL builds and hardware tokens without EdDSA.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firmware.fsutil import write_atomic
from firmware.link.errors import LinkError, PeerNotPinned, TlsIdentityError
from firmware.units import fingerprint_hex

log = logging.getLogger(__name__)

KEY_FILE = "link-key.pem"
CERT_FILE = "link-cert.pem"
PEERS_FILE = "link-peers.json"
PEERS_FORMAT_VERSION = 1

# A board without a battery-backed clock can boot with a date in 1970 until NTP
# answers; a certificate that is "not yet valid" then would cut the link.  The
# validity window is therefore wide on purpose: pinning, not dates, carries the trust.
_NOT_BEFORE = datetime.datetime(1970, 1, 2, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the DER certificate, lowercase hex with colons (as openssl prints it)."""
    digest = hashlib.sha256(cert_der).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    hexdigits = fingerprint_hex(text)
    return ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2))


@dataclass(frozen=True)
class Identity:
    """This unit's TLS identity.  Holds paths, not the key: the key stays on disk."""

    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)

    @property
    def cert_pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.cert_der)


def load_or_create_identity(state_dir: Path, common_name: str) -> Identity:
    """Load the unit's key and certificate from `state_dir`, making them on first start."""
    state_dir.mkdir(parents=True, exist_ok=True)
    key_path = state_dir / KEY_FILE
    cert_path = state_dir / CERT_FILE
    if key_path.exists() != cert_path.exists():
        raise TlsIdentityError(
            f"only one of {key_path.name} and {cert_path.name} exists in {state_dir}; "
            "refusing to guess which one to trust"
        )
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("created link identity %s, fingerprint %s", common_name, fingerprint(
            cert.public_bytes(serialization.Encoding.DER)))
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("link key %s had mode %o; tightening to 600", key_path, mode)
        os.chmod(key_path, 0o600)
    try:
        cert_der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    except (ValueError, OSError) as exc:
        raise TlsIdentityError(f"cannot read certificate {cert_path}: {exc}") from None
    return Identity(key_path=key_path, cert_path=cert_path, cert_der=cert_der)


def certificate_name(cert_der: bytes) -> str:
    """The common name a unit put in its certificate (its unit id)."""
    cert = x509.load_der_x509_certificate(cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise LinkError("certificate has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def unit_identity(state_dir: Path, unit_id: str | None = None) -> tuple[Identity, str]:
    """Load (or create on first start) this unit's identity; its id is the
    certificate's common name, chosen at random unless `unit_id` is given."""
    if not (state_dir / CERT_FILE).exists():
        identity = load_or_create_identity(state_dir, unit_id or f"unit-{secrets.token_hex(6)}")
    else:
        identity = load_or_create_identity(state_dir, unit_id or "unused")
    name = certificate_name(identity.cert_der)
    if unit_id is not None and unit_id != name:
        raise LinkError(f"the identity in {state_dir} belongs to unit {name!r}, not {unit_id!r}")
    return identity, name


@dataclass(frozen=True)
class PinnedPeer:
    name: str
    fingerprint: str
    cert_der: bytes


class PeerStore:
    """Pinned peers, kept in a small JSON file in the unit's state dir.

    The file holds certificates, not only fingerprints, because OpenSSL needs the
    certificate to use it as a trust anchor; the fingerprint is re-checked on load.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._peers: dict[str, PinnedPeer] = {}
        #: Bumped on every change, so shells know to rebuild their SSL contexts.
        self.generation = 0
        self._mtime: int | None = None
        if path.exists():
            self._load()

    def _stamp(self) -> int | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns ^ st.st_ino

    def refresh(self) -> bool:
        """Reload the file if another process (`mirrorunit pair`) changed it, so a
        running unit accepts a newly paired peer without a restart."""
        stamp = self._stamp()
        with self._lock:
            if stamp == self._mtime:
                return False
            self._peers = {}
            if stamp is not None:
                self._load()
            self.generation += 1
            return True

    @classmethod
    def in_dir(cls, state_dir: Path) -> PeerStore:
        return cls(state_dir / PEERS_FILE)

    def _load(self) -> None:
        self._mtime = self._stamp()
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise TlsIdentityError(f"cannot read pinned peers {self.path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != PEERS_FORMAT_VERSION:
            raise TlsIdentityError(f"{self.path}: not a version {PEERS_FORMAT_VERSION} peer file")
        peers = doc.get("peers")
        if not isinstance(peers, dict):
            raise TlsIdentityError(f"{self.path}: 'peers' must be a map")
        for name, entry in peers.items():
            try:
                der = ssl.PEM_cert_to_DER_cert(entry["certificate"])
                fp = normalize_fingerprint(entry["fingerprint"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TlsIdentityError(f"{self.path}: peer {name!r} is malformed: {exc}") from None
            if fingerprint(der) != fp:
                raise TlsIdentityError(
                    f"{self.path}: peer {name!r} certificate does not match its fingerprint"
                )
            self._peers[name] = PinnedPeer(name=name, fingerprint=fp, cert_der=der)

    def _save(self) -> None:
        doc = {
            "version": PEERS_FORMAT_VERSION,
            "peers": {
                p.name: {"fingerprint": p.fingerprint, "certificate": ssl.DER_cert_to_PEM_cert(
                    p.cert_der)}
                for p in self._peers.values()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), 0o644)

    def pin(
        self, name: str, cert_der: bytes, expected_fingerprint: str | None = None
    ) -> PinnedPeer:
        """Pin `cert_der` under `name`.  With `expected_fingerprint` (read to the operator
        out of band), a certificate with any other fingerprint is refused."""
        fp = fingerprint(cert_der)
        if expected_fingerprint is not None and normalize_fingerprint(expected_fingerprint) != fp:
            raise PeerNotPinned(
                f"certificate offered for {name!r} has fingerprint {fp}, "
                f"expected {normalize_fingerprint(expected_fingerprint)}"
            )
        with self._lock:
            other = self._by_fp(fp)
            if other is not None and other.name != name:
                raise TlsIdentityError(f"fingerprint {fp} is already pinned as {other.name!r}")
            peer = PinnedPeer(name=name, fingerprint=fp, cert_der=cert_der)
            self._peers[name] = peer
            self._save()
            self._mtime = self._stamp()
            self.generation += 1
        log.info("pinned peer %s with fingerprint %s", name, fp)
        return peer

    def unpin(self, name: str) -> None:
        with self._lock:
            if self._peers.pop(name, None) is not None:
                self._save()
                self._mtime = self._stamp()
                self.generation += 1
                log.info("unpinned peer %s", name)

    def _by_fp(self, fp: str) -> PinnedPeer | None:
        return next((p for p in self._peers.values() if p.fingerprint == fp), None)

    def by_fingerprint(self, fp: str) -> PinnedPeer | None:
        with self._lock:
            return self._by_fp(fp)

    def get(self, name: str) -> PinnedPeer | None:
        with self._lock:
            return self._peers.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    def cadata(self, names: list[str] | None = None) -> str:
        with self._lock:
            chosen = [p for p in self._peers.values() if names is None or p.name in names]
            return "".join(ssl.DER_cert_to_PEM_cert(p.cert_der) for p in chosen)


def _base_context(purpose: int, identity: Identity, cadata: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # units are named by pinned certificates, not host names
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(certfile=str(identity.cert_path), keyfile=str(identity.key_path))
    if cadata:
        ctx.load_verify_locations(cadata=cadata)
    return ctx


def server_context(identity: Identity, peers: PeerStore, *,
                   allow_anonymous: bool = False) -> ssl.SSLContext:
    """Context for the remote: every pinned unit is an acceptable client.

    With `allow_anonymous` a client may also present no certificate at all (a
    replaced unit recovering its config); the shell then allows it nothing but
    the recovery exchange.  A certificate that is presented must still be pinned:
    OpenSSL refuses any other inside the handshake, as before."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, identity, peers.cadata())
    if allow_anonymous:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def anonymous_client_context() -> ssl.SSLContext:
    """Context for a unit with no identity its peer knows (recovery).  It presents
    no certificate and checks the peer's by fingerprint after the handshake,
    before a byte of application data is sent (`check_fingerprint`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # no anchors here: the typed fingerprint is the pin
    return ctx


def check_fingerprint(sock: ssl.SSLSocket, expected: str) -> bytes:
    """The peer's DER certificate if its fingerprint is `expected`; else
    `PeerNotPinned` naming both fingerprints."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerNotPinned("peer presented no certificate")
    want = normalize_fingerprint(expected)
    got = fingerprint(der)
    if got != want:
        raise PeerNotPinned(f"the peer presents fingerprint {got}, not the expected {want}")
    return der


def export_identity(identity: Identity, peers_path: Path | None = None
                    ) -> tuple[bytes, bytes, bytes | None]:
    """Key, certificate (PEM) and pinned-peers file, for a sealed config backup."""
    peers = None
    if peers_path is not None:
        try:
            peers = peers_path.read_bytes()
        except FileNotFoundError:
            peers = None
    return identity.key_path.read_bytes(), identity.cert_path.read_bytes(), peers


def install_identity(state_dir: Path, key_pem: bytes, cert_pem: bytes,
                     peers: bytes | None = None) -> Identity:
    """Put a unit's identity (from its sealed backup) back into `state_dir`,
    replacing whatever identity is there.  The key must match the certificate,
    and the peers file must parse, before anything is written."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsIdentityError(f"the identity to install is malformed: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise TlsIdentityError("the identity to install has a key that does not match "
                               "its certificate")
    if peers is not None:
        try:
            doc = json.loads(peers)
        except ValueError as exc:
            raise TlsIdentityError(f"the pinned peers to install are malformed: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != PEERS_FORMAT_VERSION:
            raise TlsIdentityError("the pinned peers to install are of an unknown format")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / KEY_FILE, key_pem, 0o600)
    write_atomic(state_dir / CERT_FILE, cert_pem, 0o644)
    if peers is not None:
        write_atomic(state_dir / PEERS_FILE, peers, 0o644)
    log.warning("installed link identity %s from a sealed backup",
                fingerprint(cert.public_bytes(serialization.Encoding.DER)))
    return load_or_create_identity(state_dir, "unused")


def client_context(identity: Identity, peers: PeerStore, remote_name: str) -> ssl.SSLContext:
    """Context for the local: only the certificate pinned as `remote_name` is accepted."""
    if peers.get(remote_name) is None:
        raise PeerNotPinned(f"no certificate pinned for remote {remote_name!r}")
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, identity, peers.cadata([remote_name]))


def peer_identity(sock: ssl.SSLSocket, peers: PeerStore, expected: str | None = None) -> str:
    """Name of the pinned peer at the other end of a handshaken socket.

    Raises `PeerNotPinned` if its certificate is absent, not pinned, or pinned under a
    name other than `expected`.
    """
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerNotPinned("peer presented no certificate")
    fp = fingerprint(der)
    pinned = peers.by_fingerprint(fp)
    if pinned is None:
        raise PeerNotPinned(f"peer certificate {fp} is not pinned")
    if expected is not None and pinned.name != expected:
        raise PeerNotPinned(f"peer certificate {fp} is pinned as {pinned.name!r}, not {expected!r}")
    return pinned.name


def fetch_certificate(host: str, port: int, timeout: float = 10.0,
                      identity: Identity | None = None) -> bytes:
    """The certificate a unit listening at host:port presents.  Nothing is trusted
    here: the caller compares its fingerprint with one obtained out of band."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as sock:
            der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerNotPinned(f"{host}:{port} presented no certificate")
    return der


def describe_handshake_failure(exc: BaseException) -> str:
    """A log sentence for a failed handshake, naming the likely cause."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"peer certificate is not pinned here ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        # OpenSSL's reason code, not the message, says what went wrong.
        reason = getattr(exc, "reason", None)
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                      "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return f"the peer refused our certificate ({reason}): we are not pinned there"
        return f"TLS failure ({reason or exc})"
    return f"handshake failed ({type(exc).__name__}: {exc})"
