"""Sans-IO client sides of the journey link's short exchanges, each one connection
long, beside the long-running `SenderSession`:

- `ConfigFetchSession`: a unit with its identity asks a peer for its sealed config
  backup (CONFIG_GET before any HELLO; the server side is `ReceiverSession`).
- `RecoveryClientSession`: a replaced unit without a certificate proves the admin
  password for its backup (recovery.py has the exchange and its server side).
- `PairOfferSession`: a local offers its certificate to a remote (pairing.py).

Like the other sessions they are fed bytes (`receive_data`) and queue bytes
(`data_to_send`); the shell owns the socket.  An ERROR answer raises `LinkRefused`
with its code; a frame the exchange does not allow raises `LinkProtocolError`.
Once `is_finished`, `result` holds what the exchange brought back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from firmware.link.errors import LinkError, LinkProtocolError, LinkRefused
from firmware.link.frames import (
    Bye,
    ConfigBlob,
    ConfigGet,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Paired,
    PairOffer,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    encode_frame,
)

T = TypeVar("T")


class _ShortClient(Generic[T]):
    def __init__(self, first: Frame) -> None:
        self._decoder = FrameDecoder()
        self._out = bytearray(encode_frame(first))
        self._result: T | None = None
        self._finished = False

    @property
    def is_finished(self) -> bool:
        return self._finished

    @property
    def result(self) -> T:
        if not self._finished:
            raise LinkError("the exchange has not finished")
        return self._result  # type: ignore[return-value]

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed the peer's bytes; frames after the one that finished are ignored."""
        for frame in self._decoder.receive_data(data):
            if self._finished:
                return
            if isinstance(frame, ErrorFrame):
                raise LinkRefused(frame.code, frame.text)
            self._on_frame(frame)

    def _send(self, frame: Frame) -> None:
        self._out += encode_frame(frame)

    def _finish(self, result: T) -> None:
        self._result = result
        self._finished = True

    def _on_frame(self, frame: Frame) -> None:
        raise NotImplementedError


class ConfigFetchSession(_ShortClient[bytes | None]):
    """Asks for unit `unit_id`'s sealed config backup; `result` is the blob, None
    when the peer keeps none."""

    def __init__(self, unit_id: str) -> None:
        super().__init__(ConfigGet(unit_id))
        self.unit_id = unit_id

    def _on_frame(self, frame: Frame) -> None:
        # Anything else the peer may say first is not an answer to this question.
        if isinstance(frame, ConfigBlob) and frame.unit_id == self.unit_id:
            self._finish(frame.blob)


class RecoveryClientSession(_ShortClient[tuple[str, bytes | None]]):
    """Recovers unit `unit_id`'s backup (None: the only unit the peer keeps).
    `prove` turns the challenge into the proof (see recovery.py); without it the
    exchange says BYE after the challenge.  `result` is (unit id, blob or None)."""

    def __init__(self, unit_id: str | None,
                 prove: Callable[[RecoverChallenge], bytes] | None) -> None:
        super().__init__(RecoverHello(unit_id))
        self._prove = prove
        self._challenge: RecoverChallenge | None = None

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, RecoverChallenge) and self._challenge is None:
            self._challenge = frame
            if self._prove is None:
                self._send(Bye())
                self._finish((frame.unit_id, None))
            else:
                self._send(RecoverProof(self._prove(frame)))
        elif isinstance(frame, ConfigBlob) and self._challenge is not None \
                and frame.unit_id == self._challenge.unit_id and frame.blob:
            self._finish((frame.unit_id, frame.blob))
        else:
            raise LinkProtocolError(
                f"unexpected {type(frame).__name__} in the recovery exchange")


class PairOfferSession(_ShortClient[str]):
    """Offers this unit's certificate; `result` is the name the peer pinned it under."""

    def __init__(self, unit_id: str, cert_der: bytes) -> None:
        super().__init__(PairOffer(unit_id, cert_der))

    def _on_frame(self, frame: Frame) -> None:
        if not isinstance(frame, Paired):
            raise LinkProtocolError(
                f"unexpected {type(frame).__name__} in answer to PAIR_OFFER")
        self._finish(frame.unit_id)
