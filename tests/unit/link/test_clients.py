"""The client sides of the short exchanges (config fetch, recovery, pairing offer)
as sans-IO sessions: what they send, what they accept, how they end."""

from __future__ import annotations

import pytest

from firmware.link.clients import ConfigFetchSession, PairOfferSession, RecoveryClientSession
from firmware.link.errors import LinkProtocolError, LinkRefused
from firmware.link.frames import (
    Bye,
    ConfigBlob,
    ConfigGet,
    ConfigPut,
    ErrorFrame,
    FrameDecoder,
    Paired,
    PairOffer,
    RecoverChallenge,
    RecoverHello,
    RecoverProof,
    encode_frame,
)

CHALLENGE = RecoverChallenge("unit-a", "scrypt", (4, 8, 1), b"s" * 16, b"n" * 32)


def sent(session: ConfigFetchSession | RecoveryClientSession | PairOfferSession) -> list[object]:
    return list(FrameDecoder().receive_data(session.data_to_send()))


def byte_at_a_time(session: ConfigFetchSession | RecoveryClientSession | PairOfferSession,
                   wire: bytes) -> None:
    for i in range(len(wire)):
        session.receive_data(wire[i:i + 1])


def test_config_fetch_asks_then_takes_only_its_own_blob() -> None:
    s = ConfigFetchSession("unit-a")
    assert sent(s) == [ConfigGet("unit-a")] and not s.is_finished
    byte_at_a_time(s, encode_frame(ConfigPut("remote-1", b"theirs"))
                   + encode_frame(ConfigBlob("unit-b", b"other"))
                   + encode_frame(ConfigBlob("unit-a", b"mine")))
    assert s.is_finished and s.result == b"mine"


def test_config_fetch_of_a_unit_the_peer_keeps_nothing_of() -> None:
    s = ConfigFetchSession("unit-a")
    s.receive_data(encode_frame(ConfigBlob("unit-a", None)))
    assert s.is_finished and s.result is None


def test_an_error_answer_is_a_refusal_with_its_code() -> None:
    s = RecoveryClientSession(None, lambda ch: b"p" * 32)
    with pytest.raises(LinkRefused) as err:
        s.receive_data(encode_frame(ErrorFrame("rate-limited", "wait")))
    assert (err.value.code, err.value.text) == ("rate-limited", "wait")


def test_recovery_proves_then_takes_the_blob() -> None:
    s = RecoveryClientSession("unit-a", lambda ch: ch.nonce[:8] * 4)
    assert sent(s) == [RecoverHello("unit-a")]
    byte_at_a_time(s, encode_frame(CHALLENGE))
    assert sent(s) == [RecoverProof(b"n" * 32)] and not s.is_finished
    s.receive_data(encode_frame(ConfigBlob("unit-a", b"sealed")))
    assert s.is_finished and s.result == ("unit-a", b"sealed")


def test_a_probe_says_bye_after_the_challenge() -> None:
    s = RecoveryClientSession(None, None)
    s.data_to_send()
    s.receive_data(encode_frame(CHALLENGE))
    assert sent(s) == [Bye()] and s.is_finished and s.result == ("unit-a", None)


@pytest.mark.parametrize("frame", [ConfigBlob("unit-a", b"early"), Paired("x")])
def test_recovery_refuses_frames_out_of_turn(frame: object) -> None:
    s = RecoveryClientSession("unit-a", lambda ch: b"p" * 32)
    with pytest.raises(LinkProtocolError, match="recovery exchange"):
        s.receive_data(encode_frame(frame))  # type: ignore[arg-type]


def test_pair_offer_gets_the_pinned_name_or_a_protocol_error() -> None:
    s = PairOfferSession("unit-a", b"der")
    assert sent(s) == [PairOffer("unit-a", b"der")]
    s.receive_data(encode_frame(Paired("unit-a")))
    assert s.is_finished and s.result == "unit-a"
    other = PairOfferSession("unit-a", b"der")
    with pytest.raises(LinkProtocolError, match="PAIR_OFFER"):
        other.receive_data(encode_frame(ConfigBlob("unit-a", b"x")))
