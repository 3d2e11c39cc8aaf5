"""A real remote's certificate-less path refuses a hostile CBOR body at once, logs the
reason, and an honest client is served right after."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.link.frames import (
    PROTOCOL_VERSION,
    ErrorFrame,
    FrameDecoder,
    Hello,
    HelloAck,
    encode_body,
    encode_frame,
)
from firmware.link.tls import PeerStore, anonymous_client_context, client_context, unit_identity
from tests.support.hostile_cbor import shared_body
from tests.support.replication import RemoteProc, wait_for
from tests.support.unitproc import read_until_closed

#: the link protocol versions a HELLO of this firmware offers
VERSIONS = (PROTOCOL_VERSION,)

@pytest.fixture
def remote(tmp_path: Path) -> Iterator[RemoteProc]:
    (tmp_path / "remote").mkdir()
    r = RemoteProc(tmp_path / "remote")
    unit_identity(r.state_dir)
    r.start()
    yield r
    assert r.proc is not None
    r.proc.send_signal(signal.SIGTERM)
    try:
        r.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:  # a remote frozen by a hostile body ignores SIGTERM
        r.proc.kill()
        r.proc.wait()


@pytest.mark.parametrize("ftype", ["RECOVER_HELLO", "PAIR_OFFER"])
def test_certificate_less_hostile_body_is_refused_and_an_honest_client_follows(
        remote: RemoteProc, tmp_path: Path, ftype: str) -> None:
    raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    with anonymous_client_context().wrap_socket(raw) as sock:
        start = time.monotonic()
        sock.sendall(encode_body(shared_body(40, ftype)))
        reply = read_until_closed(sock, timeout=10)
        elapsed = time.monotonic() - start
    frames = FrameDecoder().receive_data(reply)
    assert len(frames) == 1 and isinstance(frames[0], ErrorFrame), reply
    assert "tag 28" in frames[0].text
    assert elapsed < 5
    line = wait_for(lambda: [x for x in remote.log.read_text().splitlines()
                             if "closing connection" in x and "tag 28" in x], 10, "logged")
    assert "protocol error: frame body is not valid CBOR" in line[-1]

    # A pinned local right after: TLS handshake, HELLO, HELLO_ACK.
    state = tmp_path / "site-a"
    ident, unit_id = unit_identity(state, "site-a")
    rid, _ = unit_identity(remote.state_dir)
    PeerStore.in_dir(state).pin("remote", rid.cert_der)
    PeerStore.in_dir(remote.state_dir).pin(unit_id, ident.cert_der)
    ctx = client_context(ident, PeerStore.in_dir(state), "remote")
    raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    with ctx.wrap_socket(raw) as sock:
        sock.sendall(encode_frame(Hello(VERSIONS, unit_id, 1 << 22, 512, 0, ("none",), False)))
        dec = FrameDecoder()
        got: list[Any] = []
        while not got:
            data = sock.recv(65536)
            assert data, "the remote closed the connection instead of answering HELLO"
            got = dec.receive_data(data)
    assert isinstance(got[0], HelloAck) and got[0].durable_seq == 0
