"""A remote pins its locals from its own config: the PAIR_OFFER exchange (sans-IO).

A local pins its remote by fetching the remote's certificate and comparing it with
the fingerprint in the local's config.  The remote cannot do the same (locals do
not listen), so the local brings its certificate to the remote instead, on a
connection *without* a client certificate (the remote has not pinned it yet)::

    local (no client certificate)            remote (its config lists the locals)
    PAIR_OFFER {unit, cert (DER)}    ->
                                     <-      PAIRED {unit}   or   ERROR {code, text}

The remote pins the certificate only if its SHA-256 is the fingerprint of a peer
in the remote's own config, under that peer's configured name, which must be the
unit id the local offers (the id its HELLO will claim).  It never replaces a pin
of another certificate and never pins one certificate under two names.  The offer
proves nothing about the key: the normally authenticated session that follows
does, since TLS makes the local sign with the key of the pinned certificate.

Like recovery, offers are limited per source address (`RecoveryLimiter`; an
offer of an unlisted certificate counts as a failure) and logged; the frames of
a client without a certificate are small and bounded (`MAX_ANONYMOUS_BODY`).
`AnonymousServerSession` lets such a client run one of the two exchanges and
nothing else.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from firmware.link.errors import LinkProtocolError, TlsIdentityError
from firmware.link.frames import (
    MAX_ANONYMOUS_BODY,
    Bye,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Paired,
    PairOffer,
    RecoverHello,
    encode_frame,
)
from firmware.link.recovery import (
    ERR_PROTOCOL,
    ERR_RATE_LIMITED,
    RecoveryEvent,
    RecoveryLimiter,
    RecoveryServerSession,
)

ERR_UNKNOWN_FINGERPRINT = "unknown-fingerprint"
ERR_UNIT_MISMATCH = "unit-mismatch"
ERR_PINNED_OTHERWISE = "pinned-otherwise"
ERR_NOT_PAIRING = "pairing-disabled"


def plain_fingerprint(text: str) -> str:
    """64 lowercase hex digits, whichever way it was written."""
    return "".join(c for c in text.lower() if c in "0123456789abcdef")


@dataclass(frozen=True)
class ConfiguredPeer:
    """A local unit as the remote's config names it."""

    name: str
    fingerprint: str


class PinStore(Protocol):
    """What pairing needs of `tls.PeerStore`."""

    def get(self, name: str) -> object | None: ...

    def pin(self, name: str, cert_der: bytes, expected_fingerprint: str | None = None
            ) -> object: ...


@dataclass(frozen=True)
class PairingPolicy:
    """The remote's side: whom its config lists, and how often an address may offer."""

    #: Read on every offer, so a config change needs no restart.
    configured: Callable[[], Sequence[ConfiguredPeer]]
    limiter: RecoveryLimiter


@dataclass(frozen=True)
class PairGranted:
    unit_id: str
    fingerprint: str
    #: False when the certificate was already pinned under that name.
    new: bool


@dataclass(frozen=True)
class PairDenied:
    unit_id: str
    fingerprint: str
    code: str
    text: str


PairEvent = PairGranted | PairDenied


class PairState(enum.Enum):
    AWAIT_OFFER = "await-offer"
    DONE = "done"
    FAILED = "failed"


def _is_certificate(der: bytes) -> bool:
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True


class PairingServerSession:
    """The remote's side of one offer.  `pins` is the remote's pinned-peer store."""

    def __init__(self, policy: PairingPolicy, pins: PinStore, source: str) -> None:
        self.policy = policy
        self.pins = pins
        self.source = source
        self.state = PairState.AWAIT_OFFER
        self._out = bytearray()

    @property
    def is_finished(self) -> bool:
        return self.state is not PairState.AWAIT_OFFER

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _deny(self, offer: PairOffer, fp: str, code: str, text: str) -> list[PairEvent]:
        self._out += encode_frame(ErrorFrame(code=code, text=text))
        self.state = PairState.FAILED
        return [PairDenied(offer.unit_id, fp, code, text)]

    def receive_frame(self, frame: Frame) -> list[PairEvent]:
        if self.is_finished:
            return []
        if isinstance(frame, Bye):
            self.state = PairState.DONE
            return []
        if not isinstance(frame, PairOffer):
            self._out += encode_frame(ErrorFrame(code=ERR_PROTOCOL, text="expected PAIR_OFFER"))
            self.state = PairState.FAILED
            raise LinkProtocolError(f"{type(frame).__name__} frame in the pairing exchange")
        return self._on_offer(frame)

    def _on_offer(self, offer: PairOffer) -> list[PairEvent]:
        fp = hashlib.sha256(offer.cert_der).hexdigest()
        wait = self.policy.limiter.admit(self.source)
        if wait is not None:
            return self._deny(offer, fp, ERR_RATE_LIMITED, wait)
        match = next((p for p in self.policy.configured()
                      if plain_fingerprint(p.fingerprint) == fp), None)
        if match is None:
            left = self.policy.limiter.failed(self.source)
            return self._deny(offer, fp, ERR_UNKNOWN_FINGERPRINT,
                              f"no peer in this unit's config has fingerprint {fp} "
                              f"({left} attempts left)")
        if match.name != offer.unit_id:
            return self._deny(offer, fp, ERR_UNIT_MISMATCH,
                              f"this certificate is configured here as unit {match.name!r}, "
                              f"the offer names unit {offer.unit_id!r}: the peer's name in "
                              "this unit's config must be the local's unit id")
        # A hash match means these are the very bytes the operator's fingerprint
        # names; checked anyway so nothing but a certificate becomes a trust anchor.
        if not _is_certificate(offer.cert_der):
            return self._deny(offer, fp, ERR_PROTOCOL, "the offer is not an X.509 certificate")
        have = self.pins.get(match.name)
        have_fp = plain_fingerprint(str(getattr(have, "fingerprint", ""))) if have else ""
        if have is not None and have_fp == fp:
            self.state = PairState.DONE
            self._out += encode_frame(Paired(match.name))
            return [PairGranted(match.name, fp, new=False)]
        if have is not None:
            return self._deny(offer, fp, ERR_PINNED_OTHERWISE,
                              f"unit {match.name!r} is pinned here with another certificate "
                              f"({have_fp}); an offer never replaces a pin: unpin it first")
        try:
            self.pins.pin(match.name, offer.cert_der, fp)
        except TlsIdentityError as exc:
            return self._deny(offer, fp, ERR_PINNED_OTHERWISE, str(exc))
        self.state = PairState.DONE
        self._out += encode_frame(Paired(match.name))
        return [PairGranted(match.name, fp, new=True)]


class AnonymousServerSession:
    """A client without a certificate: its first frame picks the recovery or the
    pairing exchange (whichever this unit offers); any other frame ends it."""

    def __init__(self, source: str, *, recovery: RecoveryServerSession | None,
                 pairing: PairingServerSession | None) -> None:
        self.source = source
        self._recovery = recovery
        self._pairing = pairing
        self.chosen: RecoveryServerSession | PairingServerSession | None = None
        self._decoder = FrameDecoder(max_body=MAX_ANONYMOUS_BODY)
        self._out = bytearray()
        self._failed = False
        self._closed = False

    @property
    def exchange(self) -> str:
        return "pairing" if isinstance(self.chosen, PairingServerSession) else "recovery"

    @property
    def is_finished(self) -> bool:
        return self._failed or self._closed or (self.chosen is not None
                                                and self.chosen.is_finished)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        if self.chosen is not None:
            out += self.chosen.data_to_send()
        return out

    def _refuse(self, reason: str) -> LinkProtocolError:
        self._out += encode_frame(ErrorFrame(code=ERR_PROTOCOL, text=reason))
        self._failed = True
        return LinkProtocolError(reason)

    def receive_data(self, data: bytes) -> list[RecoveryEvent | PairEvent]:
        """Feed bytes; raises `LinkProtocolError` (ERROR queued) on anything else."""
        if self.is_finished:
            return []
        try:
            frames = self._decoder.receive_data(data)
        except LinkProtocolError as exc:
            raise self._refuse(exc.reason) from None
        events: list[RecoveryEvent | PairEvent] = []
        for frame in frames:
            chosen = self.chosen
            if chosen is None:
                if isinstance(frame, Bye):
                    self._closed = True
                    break
                if isinstance(frame, RecoverHello) and self._recovery is not None:
                    chosen = self.chosen = self._recovery
                elif isinstance(frame, PairOffer) and self._pairing is not None:
                    chosen = self.chosen = self._pairing
                elif isinstance(frame, PairOffer):
                    self._out += encode_frame(ErrorFrame(
                        code=ERR_NOT_PAIRING,
                        text="this unit pairs no peer from its config (no --config given)"))
                    self._failed = True
                    return events
                else:
                    offered = " or a pairing offer" if self._pairing is not None else ""
                    raise self._refuse(
                        f"{type(frame).__name__} frame not allowed from a client without a "
                        f"certificate (only the recovery exchange is{offered})")
            events += chosen.receive_frame(frame)
            if chosen.is_finished:
                break
        return events
