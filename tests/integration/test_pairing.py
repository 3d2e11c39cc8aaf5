"""A remote pins its locals from its own config (PAIR_OFFER): real remote and local
processes over real TLS, and hand-made offers on a connection without a client
certificate."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from firmware.config import ConfigStore, StoreSettings
from firmware.link.errors import LinkProtocolError, LinkRefused
from firmware.link.frames import (
    MAX_ANONYMOUS_BODY,
    FrameDecoder,
    Paired,
    PairOffer,
    encode_body,
    encode_frame,
)
from firmware.link.pairing import (
    AnonymousServerSession,
    ConfiguredPeer,
    PairDenied,
    PairGranted,
    PairingPolicy,
    PairingServerSession,
)
from firmware.link.recovery import RecoveryLimiter
from firmware.link.session import ErrorFrame
from firmware.link.shell import pair_offer_exchange
from firmware.link.tls import PEERS_FILE, PeerStore, anonymous_client_context, unit_identity
from firmware.nbd.client import NbdClient
from tests.support.replication import (
    RemoteProc,
    local_link_args,
    peer_status,
    wait_for,
)
from tests.support.unitproc import LocalProc, read_until_closed


def sha(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def remote_config(path: Path, peers: list[tuple[str, str]]) -> Path:
    ConfigStore(StoreSettings(str(path))).update({
        "role": "remote",
        "peers": [{"name": n, "address": "192.0.2.10:7310", "fingerprint": fp}
                  for n, fp in peers]})
    return path


class Units:
    """Identities made up front: the remote's, and locals that pin the remote."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "remote").mkdir()
        self.remote_state = tmp / "remote" / "store" / ".link-state"
        self.remote_ident, _ = unit_identity(self.remote_state, "remote-1")

    def local(self, unit_id: str) -> tuple[Path, Any]:
        state = self.tmp / unit_id / "link"
        ident, _ = unit_identity(state, unit_id)
        PeerStore.in_dir(state).pin("remote", self.remote_ident.cert_der)
        return state, ident

    def start_remote(self, peers: list[tuple[str, str]], *extra: str) -> RemoteProc:
        cfg = remote_config(self.tmp / "remote" / "config.slots", peers)
        r = RemoteProc(self.tmp / "remote", extra=("--config", str(cfg), *extra))
        r.start()
        return r


@pytest.fixture()
def units(tmp_path: Path) -> Any:
    u = Units(tmp_path)
    procs: list[Any] = []
    u.procs = procs  # type: ignore[attr-defined]
    yield u
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()


def pins(state_dir: Path) -> dict[str, str]:
    path = state_dir / PEERS_FILE
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {name: e["fingerprint"].replace(":", "") for name, e in doc["peers"].items()}


def nothing_stored(remote: RemoteProc) -> None:
    assert remote.call("status")["units"] == {}
    assert [p.name for p in remote.store.iterdir() if not p.name.startswith(".")] == []


# ------------------------------------------------------------------ real processes


def test_a_configured_local_is_pinned_and_replicates(units: Units) -> None:
    state, ident = units.local("site-a")
    remote = units.start_remote([("site-a", sha(ident.cert_der))])
    units.procs.append(remote)  # type: ignore[attr-defined]
    assert pins(remote.state_dir) == {}
    wd = units.tmp / "site-a" / "unit"
    wd.mkdir()
    local = LocalProc(wd, size="4M", buffer_size="4M",
                      extra=local_link_args("remote", ("127.0.0.1", remote.port), state))
    units.procs.append(local)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    local.start()
    wait_for(lambda: peer_status(local)["sessions"] >= 1, 30, "a session after pairing")
    paired_in = time.monotonic() - t0
    assert pins(remote.state_dir) == {"site-a": sha(ident.cert_der)}
    st = peer_status(local)
    assert st["pairings"] == 1 and st["pair_offers"] >= 1
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(8192, b"\x5a" * 4096)
        c.flush()
    wait_for(lambda: remote.unit("site-a").get("last_applied_seq", 0) >= 1, 30, "applied")
    assert remote.call("remote.read", unit="site-a", offset=8192, length=4096) == \
        b"\x5a" * 4096
    log = remote.log.read_text()
    assert "pairing: 127.0.0.1" in log and "offered the certificate of unit site-a" in log \
        and "pinned" in log
    assert "pinned this unit's certificate as unit site-a" in local.log.read_text()
    # The first connection was refused inside TLS: nothing before the pin.
    assert "refused connection from" in log
    print(f"local started, paired and its first session up in {paired_in:.2f} s")


def test_an_unlisted_local_is_refused_and_nothing_is_pinned_or_stored(units: Units) -> None:
    state, ident = units.local("stranger")
    other_state, other = units.local("site-a")
    remote = units.start_remote([("site-a", sha(other.cert_der))])
    units.procs.append(remote)  # type: ignore[attr-defined]
    wd = units.tmp / "stranger" / "unit"
    wd.mkdir()
    local = LocalProc(wd, size="4M", buffer_size="4M",
                      extra=local_link_args("remote", ("127.0.0.1", remote.port), state))
    units.procs.append(local)  # type: ignore[attr-defined]
    local.start()
    with NbdClient("127.0.0.1", local.port, "mirrorunit") as c:
        c.write(0, b"\x01" * 4096)
        c.flush()
    wait_for(lambda: "refused this unit's pairing offer" in local.log.read_text(), 30,
             "the refusal")
    assert "unknown-fingerprint" in local.log.read_text()
    st = peer_status(local)
    assert st["sessions"] == 0 and st["pairings"] == 0
    line = next(x for x in remote.log.read_text().splitlines() if "pairing: refused" in x)
    assert "unit stranger" in line and sha(ident.cert_der) in line
    assert pins(remote.state_dir) == {}
    nothing_stored(remote)


# ------------------------------------------------------------------ hand-made offers


def anonymous(remote: RemoteProc) -> Any:
    raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    return anonymous_client_context().wrap_socket(raw)


def answer(sock: Any) -> list[Any]:
    return FrameDecoder().receive_data(read_until_closed(sock))


@pytest.mark.parametrize("payload,reason", [
    # Refused at its length prefix, before its body is read (a client still sending
    # the rest would see the connection reset; the log says why all the same).
    (encode_frame(PairOffer("site-a", b"\x30" * (MAX_ANONYMOUS_BODY + 1)))[:64], "limit"),
    (encode_body(b"\xa3\x64type\x6aPAIR_OFFER\x64unit\x66site-a\x64cert\x63abc"),
     "must be a byte string"),
    (encode_body(b"\xa3\x64type\x6aPAIR_OFFER\x64unit\x60\x64cert\x41\x30"),
     "must not be empty"),
    (b"\x00\x00\x00\x10" + b"garbage garbage!" + b"\x00\x00\x00\x00", "CRC32C mismatch"),
], ids=["oversized", "cert-not-bytes", "no-unit", "garbage"])
def test_garbage_and_oversized_offers_are_refused(units: Units, payload: bytes,
                                                  reason: str) -> None:
    _, ident = units.local("site-a")
    remote = units.start_remote([("site-a", sha(ident.cert_der))])
    units.procs.append(remote)  # type: ignore[attr-defined]
    with anonymous(remote) as sock:
        sock.sendall(payload)
        frames = answer(sock)
    assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
    assert reason in frames[0].text
    wait_for(lambda: "closing connection" in remote.log.read_text(), 10, "logged")
    assert pins(remote.state_dir) == {}
    nothing_stored(remote)


def test_offers_never_replace_or_double_a_pin(units: Units) -> None:
    _, a = units.local("site-a")
    _, b = units.local("site-b")
    _, c = units.local("site-c")
    # The config names c's fingerprint under site-a (a replaced unit), b correctly,
    # and a's fingerprint once more under site-d (an operator's slip).
    remote = units.start_remote([("site-a", sha(c.cert_der)), ("site-b", sha(b.cert_der)),
                                 ("site-d", sha(a.cert_der))])
    units.procs.append(remote)  # type: ignore[attr-defined]
    PeerStore.in_dir(remote.state_dir).pin("site-a", a.cert_der)
    addr = ("127.0.0.1", remote.port)
    fp = units.remote_ident.fingerprint
    before = pins(remote.state_dir)
    with pytest.raises(LinkRefused) as ei:
        pair_offer_exchange(addr, fp, "site-a", c.cert_der)
    assert ei.value.code == "pinned-otherwise" and "never replaces a pin" in ei.value.text
    with pytest.raises(LinkRefused) as ei:
        pair_offer_exchange(addr, fp, "site-d", a.cert_der)
    assert ei.value.code == "pinned-otherwise" and "already pinned as 'site-a'" in ei.value.text
    with pytest.raises(LinkRefused) as ei:
        pair_offer_exchange(addr, fp, "site-a", b.cert_der)  # b claiming a's name
    assert ei.value.code == "unit-mismatch"
    assert pins(remote.state_dir) == before
    # The one well-configured offer is pinned, and offering it again changes nothing.
    assert pair_offer_exchange(addr, fp, "site-b", b.cert_der) == "site-b"
    assert pair_offer_exchange(addr, fp, "site-b", b.cert_der) == "site-b"
    assert pins(remote.state_dir) == {**before, "site-b": sha(b.cert_der)}


def test_offers_are_limited_per_address(units: Units) -> None:
    _, a = units.local("site-a")
    _, stranger = units.local("stranger")
    remote = units.start_remote([("site-a", sha(a.cert_der))], "--pairing-max-failures", "2")
    units.procs.append(remote)  # type: ignore[attr-defined]
    addr, fp = ("127.0.0.1", remote.port), units.remote_ident.fingerprint
    for left in (1, 0):
        with pytest.raises(LinkRefused) as ei:
            pair_offer_exchange(addr, fp, "stranger", stranger.cert_der)
        assert ei.value.code == "unknown-fingerprint" and f"({left} attempts left)" in \
            ei.value.text
    with pytest.raises(LinkRefused) as ei:
        pair_offer_exchange(addr, fp, "site-a", a.cert_der)  # even a good one, for now
    assert ei.value.code == "rate-limited" and "too many pairing attempts" in ei.value.text
    assert pins(remote.state_dir) == {}


def test_the_offer_goes_only_to_the_pinned_remote(units: Units) -> None:
    from firmware.link.errors import PeerNotPinned

    _, a = units.local("site-a")
    remote = units.start_remote([("site-a", sha(a.cert_der))])
    units.procs.append(remote)  # type: ignore[attr-defined]
    with pytest.raises(PeerNotPinned):
        pair_offer_exchange(("127.0.0.1", remote.port), "ab" * 32, "site-a", a.cert_der)
    assert pins(remote.state_dir) == {}


def test_a_remote_without_a_config_pairs_nobody(tmp_path: Path) -> None:
    (tmp_path / "remote").mkdir()
    remote = RemoteProc(tmp_path / "remote")
    ident, _ = unit_identity(remote.state_dir)
    a, _ = unit_identity(tmp_path / "a", "site-a")
    with remote:
        with pytest.raises(LinkRefused) as ei:
            pair_offer_exchange(("127.0.0.1", remote.port), ident.fingerprint, "site-a",
                                a.cert_der)
        assert ei.value.code == "pairing-disabled"
    assert pins(remote.state_dir) == {}


# ------------------------------------------------------------------ the sans-IO core


class MemoryPins:
    def __init__(self) -> None:
        self.pinned: dict[str, bytes] = {}

    def get(self, name: str) -> object | None:
        der = self.pinned.get(name)
        return None if der is None else type("P", (), {"fingerprint": sha(der)})()

    def pin(self, name: str, cert_der: bytes, expected_fingerprint: str | None = None
            ) -> object:
        self.pinned[name] = cert_der
        return name


def test_session_events_and_bytes(tmp_path: Path) -> None:
    a, _ = unit_identity(tmp_path / "a", "site-a")
    store = MemoryPins()
    policy = PairingPolicy(lambda: [ConfiguredPeer("site-a", a.fingerprint)],
                           RecoveryLimiter(what="pairing"))
    session = AnonymousServerSession("10.0.0.9", recovery=None,
                                     pairing=PairingServerSession(policy, store, "10.0.0.9"))
    wire = encode_frame(PairOffer("site-a", a.cert_der))
    events: list[Any] = []
    for i in range(len(wire)):  # byte at a time: the same outcome
        events += session.receive_data(wire[i:i + 1])
    assert events == [PairGranted("site-a", sha(a.cert_der), new=True)]
    assert FrameDecoder().receive_data(session.data_to_send()) == [Paired("site-a")]
    assert session.is_finished and store.pinned == {"site-a": a.cert_der}

    # Not a certificate, though listed (a fingerprint anyone could copy from a config).
    junk = b"\x30\x03\x02\x01\x00"
    bad = PairingServerSession(PairingPolicy(lambda: [ConfiguredPeer("x", sha(junk))],
                                             RecoveryLimiter()), MemoryPins(), "s")
    ev = bad.receive_frame(PairOffer("x", junk))
    assert isinstance(ev[0], PairDenied) and "not an X.509 certificate" in ev[0].text

    # Anything but an offer or a recovery hello first ends the connection.
    other = AnonymousServerSession("s", recovery=None, pairing=bad)
    with pytest.raises(LinkProtocolError, match="or a pairing offer"):
        other.receive_data(encode_frame(Paired("x")))
