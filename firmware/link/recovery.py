"""Recovery of a replaced unit's config from a peer (sans-IO).

A unit whose config partition and identity are gone has a certificate no peer
pinned, so it cannot open a journey-link session.  It connects *without* a
client certificate instead; the peer then runs only this exchange on the
connection, and hands out nothing but the sealed backup, and only to a client
that proves it knows the admin password::

    client                                  peer (holds the sealed blob)
    RECOVER_HELLO {unit or null}    ->
                                    <-      RECOVER_CHALLENGE {unit, kdf cost, salt, nonce}
    (KDF(password, salt) -> key check: what the blob's header holds; the cost is
     {ln, r, p} for scrypt blobs, {kdf: "argon2id", m, t, p} for Argon2id ones)
    RECOVER_PROOF {HMAC(check, nonce, peer fingerprint, unit)}  ->
                                    <-      CONFIG_BLOB {unit, blob}  or  ERROR

The key check never crosses the wire, so an eavesdropper (there is none inside
TLS) or a client without the password learns nothing it could test passwords
against offline; each wrong proof costs the client an online attempt, limited
per source address by `RecoveryLimiter`.  The proof covers the peer's
certificate fingerprint, so it cannot be replayed to another peer, and a fresh
nonce, so it cannot be replayed at all.  Any other frame ends the connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from firmware.limits import source_prefix
from firmware.link.errors import LinkProtocolError
from firmware.link.frames import (
    RECOVER_NONCE_BYTES,
    Bye,
    ConfigBlob,
    ErrorFrame,
    Frame,
    FrameDecoder,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    encode_frame,
)

PROOF_LABEL = b"mirrorunit recovery proof v1"

log = logging.getLogger("mirrorunit.link")

ERR_PROTOCOL = "protocol"
ERR_NO_BACKUP = "no-backup"
ERR_NAME_UNIT = "name-the-unit"
ERR_RATE_LIMITED = "rate-limited"
ERR_WRONG_PASSWORD = "wrong-password"
ERR_DAMAGED = "backup-damaged"


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def recovery_proof(check: bytes, nonce: bytes, peer_fingerprint: str, unit_id: str) -> bytes:
    """What the client sends: keyed by the blob's key check, bound to this
    challenge, this peer and this unit."""
    fp = bytes.fromhex(peer_fingerprint.replace(":", ""))
    msg = PROOF_LABEL + _lp(nonce) + _lp(fp) + _lp(unit_id.encode())
    return hmac.new(check, msg, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class BackupKey:
    """What a sealed backup says of its key: the key derivation ("scrypt" or
    "argon2id") and its three cost numbers (see RecoverChallenge) and salt the client
    derives the key check with, and the check itself (never sent)."""

    kdf: str
    cost: tuple[int, int, int]
    salt: bytes
    check: bytes


class RecoveryBackups(Protocol):
    """The sealed backups a peer keeps; only their owner (the config) reads them."""

    def get(self, unit_id: str) -> bytes | None: ...

    def units(self) -> list[str]: ...

    def key_of(self, blob: bytes) -> BackupKey:
        """The key a blob is sealed under; `ValueError` saying why if it is damaged."""
        ...


@dataclass
class _Window:
    started: float
    attempts: int = 0
    failures: int = 0


@dataclass(frozen=True)
class Lockout:
    """One trip of the unit-wide budget: what an administrator is told.  Holds
    counts and source networks only; a proof is an HMAC, no password is ever seen."""

    #: How long every source is refused, in seconds.
    length_s: float
    #: Wrong proofs inside the window that tripped it.
    failures: int
    #: (source network, wrong proofs from it), most first.
    prefixes: tuple[tuple[str, int], ...]
    #: 1 for the first lockout since the process started, then 2, 3...
    number: int


@dataclass
class RecoveryLimiter:
    """Guesses are limited twice over.

    Per source network (its /24 or /64, `firmware.limits.source_prefix`, so one host
    cannot spread its guesses over its neighbours' addresses): at most `max_failures`
    wrong proofs and `max_attempts` challenges per `window_s`, the window starting at the
    first attempt.  And for the whole unit: more than `unit_max_failures` wrong proofs
    from all sources together inside one window lock every source out, for `window_s`
    the first time and twice as long each time after (a distributed guesser gains
    nothing from more addresses).  The table holds at most `max_sources` networks; it
    expires and evicts from its oldest end, so a call costs O(1) however many sources
    have come by, and a lock makes it safe from every connection thread."""

    max_failures: int = 5
    max_attempts: int = 30
    window_s: float = 600.0
    clock: Callable[[], float] = time.monotonic
    #: The exchange it limits, for the refusal text.
    what: str = "recovery"
    unit_max_failures: int = 50
    max_sources: int = 65536
    #: Oldest window first: every window has the same length, so the front ends first.
    _windows: OrderedDict[str, _Window] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _unit_window: _Window | None = None
    #: Wrong proofs per source network inside the unit window (at most
    #: unit_max_failures + 1 entries: it is cleared with the window).
    _unit_prefixes: dict[str, int] = field(default_factory=dict)
    _lockouts: int = 0
    _locked_until: float = 0.0
    _last_lockout: Lockout | None = None

    @property
    def last_lockout(self) -> Lockout | None:
        return self._last_lockout

    def snapshot(self) -> dict[str, object]:
        """The budget's state for a status report (and the notifier)."""
        with self._lock:
            last = self._last_lockout
            left = max(0.0, self._locked_until - self.clock())
            return {"what": self.what, "lockouts": self._lockouts,
                    "locked_for_s": round(left, 1),
                    "unit_max_failures": self.unit_max_failures, "window_s": self.window_s,
                    "last_lockout": None if last is None else {
                        "length_s": last.length_s, "failures": last.failures,
                        "number": last.number,
                        "prefixes": [[p, n] for p, n in last.prefixes]}}

    @property
    def lockouts(self) -> int:
        """How many times the unit-wide budget has locked every source out."""
        return self._lockouts

    @property
    def locked_until(self) -> float:
        """Until when (on `clock`) every source is locked out; 0 when it is not."""
        return self._locked_until if self._locked_until > self.clock() else 0.0

    def _window(self, source: str, now: float) -> _Window:
        while self._windows:
            oldest = next(iter(self._windows.values()))
            if now - oldest.started < self.window_s:
                break
            self._windows.popitem(last=False)
        key = source_prefix(source)
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.max_sources:
                self._windows.popitem(last=False)
            w = self._windows[key] = _Window(now)
        return w

    def admit(self, source: str) -> str | None:
        """None and the attempt counted, or why `source` must wait."""
        with self._lock:
            now = self.clock()
            if now < self._locked_until:
                return (f"too many failed {self.what} attempts on this unit; every source "
                        f"waits {self._locked_until - now:.0f} s")
            w = self._window(source, now)
            if w.failures >= self.max_failures or w.attempts >= self.max_attempts:
                wait = max(0.0, self.window_s - (now - w.started))
                return (f"too many {self.what} attempts from {source_prefix(source)}; try "
                        f"again in {wait:.0f} s")
            w.attempts += 1
            return None

    def failed(self, source: str) -> int:
        """Count a wrong proof; the attempts `source` has left in this window."""
        with self._lock:
            now = self.clock()
            w = self._window(source, now)
            w.failures += 1
            u = self._unit_window
            if u is None or now - u.started >= self.window_s:
                u = self._unit_window = _Window(now)
                self._unit_prefixes.clear()
            u.failures += 1
            prefix = source_prefix(source)
            self._unit_prefixes[prefix] = self._unit_prefixes.get(prefix, 0) + 1
            if u.failures > self.unit_max_failures:
                length = self.window_s * (2 ** self._lockouts)
                self._locked_until = now + length
                self._lockouts += 1
                self._last_lockout = Lockout(
                    length, u.failures,
                    tuple(sorted(self._unit_prefixes.items(), key=lambda kv: (-kv[1], kv[0]))),
                    self._lockouts)
                self._unit_window = None
                self._unit_prefixes.clear()
                log.error("%s: %d wrong proofs on this unit within %.0f s from %d source "
                          "networks: every source is locked out for %.0f s (lockout %d)",
                          self.what, u.failures, self.window_s,
                          len(self._last_lockout.prefixes), length, self._lockouts)
                return 0
            return max(0, self.max_failures - w.failures)


@dataclass(frozen=True)
class RecoveryChallenged:
    unit_id: str


@dataclass(frozen=True)
class RecoveryGranted:
    unit_id: str
    size: int


@dataclass(frozen=True)
class RecoveryDenied:
    unit_id: str | None
    code: str
    text: str


RecoveryEvent = RecoveryChallenged | RecoveryGranted | RecoveryDenied


class RecoveryState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    CHALLENGED = "challenged"
    DONE = "done"
    FAILED = "failed"


_ALLOWED: dict[RecoveryState, tuple[type, ...]] = {
    RecoveryState.AWAIT_HELLO: (RecoverHello, Bye),
    RecoveryState.CHALLENGED: (RecoverProof, Bye),
}


class RecoveryServerSession:
    """The peer's side of one unauthenticated connection."""

    def __init__(self, backups: RecoveryBackups, peer_fingerprint: str, source: str,
                 limiter: RecoveryLimiter,
                 nonce: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.backups = backups
        self.peer_fingerprint = peer_fingerprint
        self.source = source
        self.limiter = limiter
        self._nonce = nonce
        self.state = RecoveryState.AWAIT_HELLO
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._challenge: tuple[str, bytes, bytes, bytes] | None = None  # unit, nonce, check, blob

    @property
    def is_finished(self) -> bool:
        return self.state in (RecoveryState.DONE, RecoveryState.FAILED)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send(self, frame: Frame) -> None:
        self._out += encode_frame(frame)

    def _deny(self, unit: str | None, code: str, text: str) -> list[RecoveryEvent]:
        self._send(ErrorFrame(code=code, text=text))
        self.state = RecoveryState.FAILED
        self._challenge = None
        return [RecoveryDenied(unit, code, text)]

    def receive_data(self, data: bytes) -> list[RecoveryEvent]:
        """Feed bytes; raises `LinkProtocolError` (ERROR queued) on anything but
        the recovery exchange."""
        if self.is_finished:
            return []
        try:
            frames = self._decoder.receive_data(data)
        except LinkProtocolError as exc:
            self._fail(exc)
            raise
        events: list[RecoveryEvent] = []
        for frame in frames:
            events += self.receive_frame(frame)
            if self.is_finished:
                break
        return events

    def _fail(self, exc: LinkProtocolError) -> None:
        if self.state is not RecoveryState.FAILED:
            self._send(ErrorFrame(code=ERR_PROTOCOL, text=exc.reason))
            self.state = RecoveryState.FAILED
        self._challenge = None

    def receive_frame(self, frame: Frame) -> list[RecoveryEvent]:
        """One decoded frame (pairing.AnonymousServerSession decodes for both
        exchanges); same errors as `receive_data`."""
        if self.is_finished:
            return []
        try:
            allowed = _ALLOWED.get(self.state, ())
            if not isinstance(frame, allowed):
                raise LinkProtocolError(
                    f"{type(frame).__name__} frame not allowed from a client without a "
                    "certificate (only the recovery exchange is)")
            if isinstance(frame, Bye):
                self.state = RecoveryState.DONE
            elif isinstance(frame, RecoverHello):
                return self._on_hello(frame)
            elif isinstance(frame, RecoverProof):
                return self._on_proof(frame)
        except LinkProtocolError as exc:
            self._fail(exc)
            raise
        return []

    def _on_hello(self, hello: RecoverHello) -> list[RecoveryEvent]:
        wait = self.limiter.admit(self.source)
        if wait is not None:
            return self._deny(hello.unit_id, ERR_RATE_LIMITED, wait)
        unit = hello.unit_id
        if unit is None:
            units = self.backups.units()
            if len(units) > 1:
                return self._deny(None, ERR_NAME_UNIT, "this peer keeps the backups of "
                                  "several units: name the unit to recover")
            unit = units[0] if units else None
        try:
            blob = self.backups.get(unit) if unit is not None else None
        except ValueError:  # not a valid unit id: nothing kept under it
            blob = None
        if unit is None or blob is None:
            return self._deny(hello.unit_id, ERR_NO_BACKUP,
                              "this peer keeps no config backup "
                              + (f"of unit {hello.unit_id!r}" if hello.unit_id else "at all"))
        try:
            key = self.backups.key_of(blob)
        except ValueError as exc:
            return self._deny(unit, ERR_DAMAGED, f"the backup kept here is damaged: {exc}")
        nonce = self._nonce(RECOVER_NONCE_BYTES)
        self._challenge = (unit, nonce, key.check, blob)
        self._send(RecoverChallenge(unit, key.kdf, key.cost, key.salt, nonce))
        self.state = RecoveryState.CHALLENGED
        return [RecoveryChallenged(unit)]

    def _on_proof(self, frame: RecoverProof) -> list[RecoveryEvent]:
        assert self._challenge is not None
        unit, nonce, check, blob = self._challenge
        expected = recovery_proof(check, nonce, self.peer_fingerprint, unit)
        if not hmac.compare_digest(expected, frame.proof):
            left = self.limiter.failed(self.source)
            return self._deny(unit, ERR_WRONG_PASSWORD,
                              f"that is not the admin password of unit {unit!r} "
                              f"({left} attempts left)")
        self._send(ConfigBlob(unit, blob))
        self.state = RecoveryState.DONE
        self._challenge = None
        return [RecoveryGranted(unit, len(blob))]
