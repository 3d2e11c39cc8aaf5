"""Journey link over real TLS on 127.0.0.1: pinning, refusals, faults, bandwidth cap."""

from __future__ import annotations

import logging
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware.link.errors import LinkError, LinkRefused, PeerNotPinned, TlsIdentityError
from firmware.link.frames import CODEC_NONE, ErrorFrame, FrameDecoder, Hello
from firmware.link.memory import MemorySink, MemorySource
from firmware.link.session import ReceiverConfig, SenderConfig
from firmware.link.shell import Backoff, LinkClient, LinkServer
from firmware.link.tls import (
    CERT_FILE,
    KEY_FILE,
    Identity,
    PeerStore,
    client_context,
    fingerprint,
    load_or_create_identity,
)
from tests.support.faultproxy import ConnectionFaults, FaultProxy

BS = 512
VOLUME = 4096 * BS
UNITS = ("unit-a", "unit-b")


@dataclass
class Remote:
    server: LinkServer
    address: tuple[str, int]
    identity: Identity
    sinks: dict[str, MemorySink]


@dataclass
class Unit:
    name: str
    identity: Identity
    peers: PeerStore


def _wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Wait for a condition another thread makes true (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def remote_identity(tmp_path: Path) -> Identity:
    return load_or_create_identity(tmp_path / "remote", "remote")


@pytest.fixture
def units(tmp_path: Path, remote_identity: Identity) -> dict[str, Unit]:
    out = {}
    for name in (*UNITS, "stranger"):
        ident = load_or_create_identity(tmp_path / name, name)
        peers = PeerStore.in_dir(tmp_path / name)
        peers.pin(
            "remote", remote_identity.cert_der, expected_fingerprint=remote_identity.fingerprint
        )
        out[name] = Unit(name, ident, peers)
    return out


@pytest.fixture
def remote(tmp_path: Path, remote_identity: Identity, units: dict[str, Unit]) -> Iterator[Remote]:
    peers = PeerStore.in_dir(tmp_path / "remote")
    for name in UNITS:  # the stranger is never paired
        peers.pin(name, units[name].identity.cert_der)
    sinks = {name: MemorySink(VOLUME, BS) for name in UNITS}

    def open_sink(hello: Hello) -> MemorySink:
        sink = sinks[hello.unit_id]
        if (hello.volume_size, hello.block_size) != (sink.volume_size, sink.block_size):
            raise LinkRefused("geometry", "volume size or block size differs from the mirror")
        return sink

    server = LinkServer(
        ("127.0.0.1", 0),
        remote_identity,
        peers,
        ReceiverConfig(known_units=set(UNITS)),
        open_sink,
        dead_after=5.0,
    )
    address = server.start()
    yield Remote(server, address, remote_identity, sinks)
    server.stop()


def make_client(
    unit: Unit,
    address: tuple[str, int],
    source: MemorySource,
    *,
    unit_id: str | None = None,
    **kw: object,
) -> LinkClient:
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in SenderConfig.__dataclass_fields__}
    config = SenderConfig(unit_id=unit_id or unit.name, volume_size=VOLUME, block_size=BS, **cfg_kw)  # type: ignore[arg-type]
    return LinkClient(
        address,
        unit.identity,
        unit.peers,
        "remote",
        config,
        source,
        backoff=Backoff(initial=0.05, maximum=0.5, rng=random.Random(7)),
        keepalive=1.0,
        dead_after=5.0,
        **kw,  # type: ignore[arg-type]
    )


def fill(source: MemorySource, n: int, seed: int = 3, random_data: bool = False) -> None:
    rng = random.Random(seed)
    for i in range(n):
        blocks = 1 + rng.randrange(8)
        if random_data:
            data = rng.randbytes(blocks * BS)
        else:
            data = (i.to_bytes(4, "big") + rng.randbytes(4)) * (blocks * BS // 8)
        source.append(rng.randrange(VOLUME // BS - blocks), data)


def image_of(source: MemorySource) -> bytes:
    img = bytearray(VOLUME)
    for r in source.history:
        img[r.lbn * BS : r.lbn * BS + len(r.data)] = r.data
    return bytes(img)


# --------------------------------------------------------------------------- identity


def test_identity_is_made_once_with_a_private_key_file(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path, "unit-a")
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path, "unit-a")
    assert again.cert_der == a.cert_der
    assert a.fingerprint == fingerprint(a.cert_der)
    assert len(a.fingerprint) == 95 and a.fingerprint.count(":") == 31
    (tmp_path / CERT_FILE).unlink()
    with pytest.raises(TlsIdentityError, match="only one of"):
        load_or_create_identity(tmp_path, "unit-a")


def test_peer_store_round_trips_and_detects_tampering(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a", "unit-a")
    b = load_or_create_identity(tmp_path / "b", "unit-b")
    store = PeerStore(tmp_path / "peers.json")
    with pytest.raises(PeerNotPinned, match="expected"):
        store.pin("unit-a", a.cert_der, expected_fingerprint=b.fingerprint)
    store.pin("unit-a", a.cert_der, expected_fingerprint=a.fingerprint.upper())
    with pytest.raises(TlsIdentityError, match="already pinned"):
        store.pin("unit-z", a.cert_der)
    again = PeerStore(tmp_path / "peers.json")
    assert again.names() == ["unit-a"]
    pinned = again.by_fingerprint(a.fingerprint)
    assert pinned is not None and pinned.name == "unit-a"
    text = (tmp_path / "peers.json").read_text()
    (tmp_path / "peers.json").write_text(text.replace(a.fingerprint, b.fingerprint))
    with pytest.raises(TlsIdentityError, match="does not match"):
        PeerStore(tmp_path / "peers.json")


# --------------------------------------------------------------------------- reconnects


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    b = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    bases = [min(2.0, 0.1 * 2**i) for i in range(10)]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    assert len(set(delays)) == len(delays)
    b.reset()
    assert b.next_delay() <= 0.1


# --------------------------------------------------------------------------- over TLS


def test_mutual_auth_with_pinned_certificates_streams_everything(
    remote: Remote, units: dict[str, Unit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = MemorySource()
    fill(source, 300)
    client = make_client(units["unit-a"], remote.address, source)
    client.start()
    try:
        assert client.wait_acked(300, timeout=30)
        fill(source, 50, seed=9)  # writes that arrive while the link is up
        client.wakeup()
        assert client.wait_acked(350, timeout=30)
    finally:
        client.stop()
    sink = remote.sinks["unit-a"]
    assert sink.applied_log == list(range(1, 351))
    assert bytes(sink.image) == image_of(source)
    assert remote.sinks["unit-b"].applied_log == []
    assert "authenticated as unit unit-a" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_unpinned_client_is_refused_before_any_data(
    remote: Remote, units: dict[str, Unit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = MemorySource()
    fill(source, 10)
    # The stranger pinned the remote, but the remote never pinned the stranger; it
    # even claims to be a known unit.
    client = make_client(units["stranger"], remote.address, source, unit_id="unit-a")
    with pytest.raises(LinkError):
        client.run_once()
    assert _wait_for(lambda: remote.server.stats.handshake_failures == 1)
    assert remote.server.stats.sessions == 0
    assert remote.sinks["unit-a"].applied_log == []
    assert source.acked_seq == 0
    refusals = [r.getMessage() for r in caplog.records if "before any data" in r.getMessage()]
    assert len(refusals) == 1 and "not pinned" in refusals[0]


def test_client_refuses_a_remote_with_another_certificate(
    tmp_path: Path, remote: Remote, units: dict[str, Unit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    impostor = load_or_create_identity(tmp_path / "impostor", "remote")
    peers = PeerStore(tmp_path / "a-peers.json")
    peers.pin("remote", impostor.cert_der)  # the unit was paired with some other remote
    unit = Unit("unit-a", units["unit-a"].identity, peers)
    source = MemorySource()
    fill(source, 10)
    client = make_client(unit, remote.address, source)
    with pytest.raises(LinkError, match="not pinned"):
        client.run_once()
    assert client.stats.handshake_failures == 1 and client.stats.sessions == 0
    assert any("refusing remote" in r.getMessage() for r in caplog.records)
    assert remote.sinks["unit-a"].applied_log == []
    assert remote.server.stats.sessions == 0


def test_peer_claiming_another_units_id_is_refused(
    remote: Remote, units: dict[str, Unit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = MemorySource()
    fill(source, 10)
    client = make_client(units["unit-b"], remote.address, source, unit_id="unit-a")
    with pytest.raises(LinkError, match="identity"):
        client.run_once()
    assert remote.sinks["unit-a"].applied_log == [] and remote.sinks["unit-b"].applied_log == []
    assert _wait_for(lambda: remote.server.stats.refusals == 1)
    assert "certificate belongs to unit 'unit-b', HELLO claims 'unit-a'" in caplog.text


def test_unknown_unit_is_refused_with_a_reason(
    tmp_path: Path, remote: Remote, units: dict[str, Unit]
) -> None:
    # Pinned at TLS level but not a unit this remote mirrors.
    remote.server.peers.pin("unit-c", units["stranger"].identity.cert_der)
    source = MemorySource()
    fill(source, 3)
    client = make_client(units["stranger"], remote.address, source, unit_id="unit-c")
    with pytest.raises(LinkError, match="unknown-unit"):
        client.run_once()


def test_second_connection_for_the_same_unit_is_refused(
    remote: Remote, units: dict[str, Unit]
) -> None:
    source = MemorySource()
    first = make_client(units["unit-a"], remote.address, source)
    first.start()
    try:
        assert _wait_for(lambda: "unit-a" in remote.server.busy_units())
        second = make_client(units["unit-a"], remote.address, MemorySource())
        with pytest.raises(LinkError, match="busy"):
            second.run_once()
        # The first connection is unharmed.
        fill(source, 20)
        first.wakeup()
        assert first.wait_acked(20, timeout=20)
    finally:
        first.stop()
    assert remote.sinks["unit-a"].applied_log == list(range(1, 21))


def test_every_seq_arrives_once_in_order_through_drops_resets_and_corruption(
    remote: Remote, units: dict[str, Unit]
) -> None:
    total = 3000
    source = MemorySource()
    fill(source, total // 2)
    proxy = FaultProxy(remote.address)
    proxy.delay = 0.001
    client = make_client(
        units["unit-a"],
        proxy.address,
        source,
        window_bytes=256 * 1024,
        batch_bytes=32 * 1024,
        signature=True,
    )
    sink = remote.sinks["unit-a"]
    client.start()
    faults: list[str] = []
    try:
        # (name, action, fault the proxy must report before the next step)
        steps: list[tuple[str, Callable[[], object], str | None]] = [
            ("reset", proxy.reset_all, None),
            ("drop", proxy.drop_all, None),
            (
                "truncate",
                lambda: proxy.fault_next(ConnectionFaults(truncate_c2s_after=6_000)),
                "truncate-c2s",
            ),
            (
                "corrupt",
                lambda: proxy.fault_next(ConnectionFaults(corrupt_c2s_at=4_000)),
                "corrupt-c2s",
            ),
            (
                "corrupt-s2c",
                lambda: proxy.fault_next(ConnectionFaults(corrupt_s2c_at=3_000)),
                "corrupt-s2c",
            ),
        ]
        for i, (name, act, fault) in enumerate(steps):
            mark = (i + 1) * total // (2 * len(steps) + 2)
            assert _wait_for(lambda m=mark: sink.last_durable_seq() >= m, 60), name  # type: ignore[misc]
            act()
            if fault is not None:
                proxy.reset_all()  # the next connection carries the fault
                assert _wait_for(lambda f=fault: f in proxy.fired, 60), fault  # type: ignore[misc]
            faults.append(name)
            if i == 2:
                fill(source, total - total // 2, seed=11)  # more writes arrive mid-outage
                client.wakeup()
        assert client.wait_acked(total, timeout=90)
    finally:
        client.stop()
        proxy.close()
    assert faults == [s[0] for s in steps]
    assert proxy.fired == ["truncate-c2s", "corrupt-c2s", "corrupt-s2c"]
    assert sink.applied_log == list(range(1, total + 1))
    assert bytes(sink.image) == image_of(source)
    assert client.stats.sessions >= len(steps) + 1
    assert proxy.connections >= len(steps) + 1


def test_bandwidth_cap_is_respected_over_a_transfer(remote: Remote, units: dict[str, Unit]) -> None:
    rate = 256 * 1024
    source = MemorySource()
    fill(source, 160, random_data=True)  # ~360 KiB of incompressible data
    client = make_client(
        units["unit-a"], remote.address, source, bandwidth=rate, compression=(CODEC_NONE,)
    )
    started = time.monotonic()
    client.start()
    try:
        assert client.wait_acked(160, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        client.stop()
    sent = client.stats.bytes_sent
    assert sent > 300 * 1024
    assert client.pacer.rate == rate
    # Only the initial burst may go faster than the cap; allow 25 % for timer slack.
    floor = (sent - client.pacer.burst) / rate
    assert elapsed >= 0.75 * floor, (elapsed, floor)
    assert elapsed < 5 * floor + 5  # and the cap does not throttle far below itself
    print(f"bandwidth cap {rate} B/s: {sent} bytes in {elapsed:.2f}s = {sent / elapsed:.0f} B/s")


def test_proxy_bandwidth_cap_slows_an_uncapped_client(
    remote: Remote, units: dict[str, Unit]
) -> None:
    rate = 200 * 1024
    source = MemorySource()
    fill(source, 100, random_data=True)
    proxy = FaultProxy(remote.address)
    proxy.set_bandwidth(rate)
    client = make_client(units["unit-a"], proxy.address, source, compression=(CODEC_NONE,))
    started = time.monotonic()
    client.start()
    try:
        assert client.wait_acked(100, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        client.stop()
        proxy.close()
    assert elapsed >= 0.75 * (proxy.bytes["c2s"] - 10 * 1024) / rate
    assert threading.active_count() < 50


def test_malformed_frame_from_an_authenticated_peer_closes_with_a_logged_reason(
    remote: Remote, units: dict[str, Unit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    unit = units["unit-a"]
    ctx = client_context(unit.identity, unit.peers, "remote")
    with socket.create_connection(remote.address, timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"\x00\x00\x00\x05not-cbor-at-all")
            reply = b""
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                reply += chunk
    frames = FrameDecoder().receive_data(reply)
    assert len(frames) == 1 and isinstance(frames[0], ErrorFrame) and frames[0].code == "protocol"
    assert "CRC32C mismatch" in frames[0].text
    assert _wait_for(lambda: remote.server.stats.protocol_errors == 1)
    assert "protocol error: frame 0 CRC32C mismatch" in caplog.text
    assert remote.sinks["unit-a"].applied_log == []
