"""Security of the journey link against a real remote process: unknown certificates,
a pinned peer claiming another unit's id, garbage and oversized frames are refused
with a clear log line and nothing reaches the store."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from firmware.link.frames import FRAME_LENGTH, FrameDecoder, Writes, encode_body
from firmware.link.memory import MemorySource
from firmware.link.session import ErrorFrame, SenderConfig
from firmware.link.shell import Backoff, LinkClient
from firmware.link.tls import PeerStore, client_context, unit_identity
from tests.support.replication import RemoteProc, local_link_args, wait_for
from tests.support.unitproc import LocalProc, read_until_closed


@pytest.fixture
def remote(tmp_path: Path) -> Any:
    (tmp_path / "remote").mkdir()
    r = RemoteProc(tmp_path / "remote")
    unit_identity(r.state_dir)
    r.start()
    yield r
    r.stop()


def _nothing_stored(remote: RemoteProc) -> None:
    assert remote.call("status")["units"] == {}
    assert [p.name for p in remote.store.iterdir() if not p.name.startswith(".")] == []


def _peer(tmp_path: Path, name: str, remote: RemoteProc, *, pin_at_remote: bool,
          pin_remote: bool = True) -> tuple[Path, Any]:
    state = tmp_path / name
    ident, unit_id = unit_identity(state, name)
    rid, _ = unit_identity(remote.state_dir)
    if pin_remote:
        PeerStore.in_dir(state).pin("remote", rid.cert_der)
    if pin_at_remote:
        PeerStore.in_dir(remote.state_dir).pin(unit_id, ident.cert_der)
    return state, ident


def test_unknown_local_certificate_is_refused_before_any_data(
        remote: RemoteProc, tmp_path: Path) -> None:
    state, _ = _peer(tmp_path, "stranger", remote, pin_at_remote=False)
    wd = tmp_path / "local"
    wd.mkdir()
    local = LocalProc(wd, size="4M", buffer_size="4M",
                      extra=local_link_args("remote", ("127.0.0.1", remote.port), state))
    with local:
        local.call("volume.flush")
        wait_for(lambda: "before any data" in remote.log.read_text(), 20, "refusal logged")
        st = local.call("link.status")["peers"]["remote"]
        assert st["state"] == "retrying"
        assert st["sessions"] == 0
    line = next(x for x in remote.log.read_text().splitlines() if "before any data" in x)
    assert "not pinned" in line or "certificate" in line
    _nothing_stored(remote)


def test_local_refuses_a_remote_other_than_the_pinned_one(
        remote: RemoteProc, tmp_path: Path) -> None:
    state, _ = _peer(tmp_path, "site-a", remote, pin_at_remote=True, pin_remote=False)
    other, _ = unit_identity(tmp_path / "impostor")
    PeerStore.in_dir(state).pin("remote", other.cert_der)  # not the real remote's cert
    wd = tmp_path / "local"
    wd.mkdir()
    local = LocalProc(wd, size="4M", buffer_size="4M",
                      extra=local_link_args("remote", ("127.0.0.1", remote.port), state))
    with local:
        wait_for(lambda: "refusing remote" in local.log.read_text(), 20, "local refusal")
    assert "not pinned" in local.log.read_text()
    _nothing_stored(remote)


def test_pinned_peer_claiming_another_units_id_is_refused(
        remote: RemoteProc, tmp_path: Path) -> None:
    _peer(tmp_path, "site-a", remote, pin_at_remote=True)
    state_b, ident_b = _peer(tmp_path, "site-b", remote, pin_at_remote=True)
    src = MemorySource()
    src.append(0, b"\xee" * 4096)
    client = LinkClient(("127.0.0.1", remote.port), ident_b, PeerStore.in_dir(state_b),
                        "remote", SenderConfig(unit_id="site-a", volume_size=1 << 20,
                                               block_size=512), src,
                        backoff=Backoff(initial=5.0))
    client.start()
    try:
        wait_for(lambda: client.stats.refusals >= 1, 20, "refusal")
    finally:
        client.stop()
    assert "identity" in (client.stats.last_error or "")
    log = remote.log.read_text()
    assert "certificate belongs to unit 'site-b', HELLO claims 'site-a'" in log
    _nothing_stored(remote)


def _tls_to(remote: RemoteProc, state: Path, ident: Any) -> Any:
    ctx = client_context(ident, PeerStore.in_dir(state), "remote")
    raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    return ctx.wrap_socket(raw)


@pytest.mark.parametrize("payload,reason", [
    (b"\x00\x00\x00\x10" + b"garbage garbage!" + b"\x00\x00\x00\x00", "CRC32C mismatch"),
    (FRAME_LENGTH.pack(0xFFFFFFF0), "limit"),
    (encode_body(b"\xa1\x64type\x65WRITE"), "unknown frame type"),
])
def test_garbage_and_oversized_frames_close_the_connection_with_a_logged_reason(
        remote: RemoteProc, tmp_path: Path, payload: bytes, reason: str) -> None:
    state, ident = _peer(tmp_path, "site-a", remote, pin_at_remote=True)
    with _tls_to(remote, state, ident) as sock:
        sock.sendall(payload)
        reply = read_until_closed(sock)
    frames = FrameDecoder().receive_data(reply)
    assert frames and isinstance(frames[-1], ErrorFrame) and reason in frames[-1].text
    wait_for(lambda: "protocol error" in remote.log.read_text(), 10, "logged")
    line = [x for x in remote.log.read_text().splitlines() if "protocol error" in x][-1]
    assert reason in line
    _nothing_stored(remote)


def test_writes_before_hello_are_refused(remote: RemoteProc, tmp_path: Path) -> None:
    from firmware.link.frames import WriteRecord, encode_frame

    state, ident = _peer(tmp_path, "site-a", remote, pin_at_remote=True)
    with _tls_to(remote, state, ident) as sock:
        sock.sendall(encode_frame(Writes(1, "none", (WriteRecord(1, 0, b"\x01" * 512, 1),))))
        reply = read_until_closed(sock)
    frames = FrameDecoder().receive_data(reply)
    assert isinstance(frames[-1], ErrorFrame) and "not allowed" in frames[-1].text
    _nothing_stored(remote)


def test_a_client_without_a_certificate_gets_nothing_but_the_recovery_exchange(
        remote: RemoteProc, tmp_path: Path) -> None:
    from firmware.link.frames import WriteRecord, encode_frame
    from firmware.link.tls import anonymous_client_context

    _peer(tmp_path, "site-a", remote, pin_at_remote=True)
    raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    with anonymous_client_context().wrap_socket(raw) as sock:
        sock.sendall(encode_frame(Writes(1, "none", (WriteRecord(1, 0, b"\x01" * 512, 1),))))
        reply = read_until_closed(sock)
    frames = FrameDecoder().receive_data(reply)
    assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
    assert "only the recovery exchange" in frames[0].text
    wait_for(lambda: "recovery: closing connection" in remote.log.read_text(), 10, "logged")
    _nothing_stored(remote)
