"""Listeners keep accepting after resource errors, cap connections, and bound the
time and memory a client without credentials can hold."""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.control import ControlError, call
from firmware.control.socket import ControlServer
from firmware.limits import ConnectionGate, ListenerLimits, RateLimitedLog, source_prefix
from firmware.link.session import ReceiverConfig
from firmware.link.shell import LinkServer
from firmware.link.tls import PeerStore, load_or_create_identity
from tests.support import REPO

ROOT = REPO
FD_LIMIT = 64
FLOOD = 120


def _wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- the listeners under a low RLIMIT_NOFILE, in a child process

_CHILD = r"""
import json, os, resource, sys, threading
from pathlib import Path
kind, state, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kind == "link":
    from firmware.link.session import ReceiverConfig
    from firmware.link.shell import LinkServer
    from firmware.link.tls import PeerStore, load_or_create_identity
    ident = load_or_create_identity(state, "remote")
    kw = {}
    try:
        from firmware.limits import ListenerLimits
        # Caps high enough that the flood reaches the descriptor limit first.
        kw["limits"] = ListenerLimits(max_connections=1000, max_per_source=1000,
                                      handshake_deadline=30.0)
    except ImportError:
        pass
    server = LinkServer(("127.0.0.1", 0), ident, PeerStore.in_dir(state),
                        ReceiverConfig(known_units=set()), lambda hello: None, **kw)
    where = server.start()[1]
    thread = lambda: server._accept_thread
else:
    from firmware.control.socket import ControlServer
    server = ControlServer(state / "control.sock", {"status": lambda: "up"})
    server.start()
    where = str(state / "control.sock")
    thread = lambda: server._thread
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
print(json.dumps({"where": where}), flush=True)
def fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # EMFILE: every descriptor is taken
        return limit
for line in sys.stdin:
    print(json.dumps({"fds": fds(),
                      "accepting": thread().is_alive()}), flush=True)
"""


class Child:
    def __init__(self, kind: str, state: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        argv = [sys.executable, "-c", _CHILD, kind, str(state), str(FD_LIMIT)]
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     text=True)
        self.where = self._line()["where"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready, "the listener process did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the listener process exited ({self.proc.poll()})"
        return dict(json.loads(line))

    def probe(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child_factory(tmp_path: Path) -> Iterator[Callable[[str], Child]]:
    children: list[Child] = []

    def make(kind: str) -> Child:
        c = Child(kind, tmp_path)
        children.append(c)
        return c

    yield make
    for c in children:
        c.close()


def _flood(connect: Callable[[], socket.socket], child: Child) -> list[socket.socket]:
    flood = []
    for _ in range(FLOOD):
        try:
            flood.append(connect())
        except OSError:
            break  # a full backlog: the flood is as big as it gets
    # The child is saturated once its descriptors reach the limit (or its loop died).
    assert _wait_for(lambda: (p := child.probe())["fds"] >= FD_LIMIT - 2
                     or not p["accepting"], 10)
    return flood


def _unix_connect(path: str, patience: float = 5.0) -> socket.socket:
    """Connect to a unix socket, waiting while its backlog is full (EAGAIN)."""
    deadline = time.monotonic() + patience
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_link_listener_keeps_accepting_after_emfile(
        child_factory: Callable[[str], Child]) -> None:
    child = child_factory("link")
    address = ("127.0.0.1", int(child.where))
    flood = _flood(lambda: socket.create_connection(address, timeout=5), child)
    for s in flood:
        s.close()
    # An honest client is served afterwards: the server's half of the TLS handshake
    # arrives (a unit we never paired with gets refused later, which does not matter).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(address, timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            assert tls.getpeercert(binary_form=True)
    assert child.probe()["accepting"]


def test_control_listener_keeps_accepting_after_emfile(
        child_factory: Callable[[str], Child]) -> None:
    child = child_factory("control")

    flood = _flood(lambda: _unix_connect(child.where, 0.5), child)
    for s in flood:
        s.close()
    # The flood's connections end as the server reads their EOF; then it answers.

    def answers() -> bool:
        try:
            return bool(call(child.where, "status", timeout=2) == "up")
        except ControlError:
            return False  # its backlog is still full of the flood

    assert _wait_for(answers, 10)
    assert child.probe()["accepting"]


def test_link_listener_survives_a_failed_thread_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ident = load_or_create_identity(tmp_path, "remote")
    server = LinkServer(("127.0.0.1", 0), ident, PeerStore.in_dir(tmp_path),
                        ReceiverConfig(known_units=set()), lambda hello: None)
    real_start = threading.Thread.start
    failures = [1]

    def start(self: threading.Thread) -> None:
        if self.name.startswith("link-conn-") and failures:
            failures.pop()
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    address = server.start()
    try:
        with socket.create_connection(address, timeout=5) as first:
            first.settimeout(5)
            assert first.recv(1) == b""  # closed at once, not left hanging
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(address, timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                assert tls.getpeercert(binary_form=True)
        assert server.stats.resource_errors == 1
    finally:
        server.stop()


# -- caps and deadlines on the link listener


def test_source_prefix_groups_ipv4_by_24_and_ipv6_by_64() -> None:
    assert source_prefix("192.0.2.7") == source_prefix("192.0.2.250") == "192.0.2.0/24"
    assert source_prefix("192.0.3.7") != source_prefix("192.0.2.7")
    assert source_prefix("2001:db8:1:2::5") == source_prefix("2001:db8:1:2:ffff::1")
    assert source_prefix("2001:db8:1:3::5") != source_prefix("2001:db8:1:2::5")
    assert source_prefix("::ffff:192.0.2.9") == "192.0.2.0/24"


def test_gate_caps_overall_and_per_source() -> None:
    gate = ConnectionGate(ListenerLimits(max_connections=3, max_per_source=2))
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.2") is None
    assert gate.admit("192.0.2.3") is not None  # third from one /24
    assert gate.admit("198.51.100.1") is None
    assert gate.admit("203.0.113.1") is not None  # fourth overall
    assert (gate.refused_source, gate.refused_total) == (1, 1)
    gate.release("192.0.2.1")
    assert gate.admit("192.0.2.3") is None
    assert gate.active == 3


def test_rate_limited_log_says_how_many_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.rl"):
        for _ in range(50):
            rl.warning("cap", "refused %s", "x")
        now[0] = 11.0
        rl.warning("cap", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "refused y (49 more like it not logged)"]


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_per_source"):
        ListenerLimits(max_per_source=0)
    with pytest.raises(ValueError, match="handshake_deadline"):
        ListenerLimits(handshake_deadline=0)


@pytest.fixture
def link_server(tmp_path: Path) -> Iterator[Callable[..., LinkServer]]:
    servers: list[LinkServer] = []
    ident = load_or_create_identity(tmp_path, "remote")

    def make(**kw: Any) -> LinkServer:
        server = LinkServer(("127.0.0.1", 0), ident, PeerStore.in_dir(tmp_path),
                            ReceiverConfig(known_units=set()), lambda hello: None, **kw)
        server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def test_link_listener_closes_connections_over_the_per_source_cap(
        link_server: Callable[..., LinkServer]) -> None:
    server = link_server(limits=ListenerLimits(max_connections=100, max_per_source=3))
    address = server._listener.getsockname()  # type: ignore[union-attr]
    held = [socket.create_connection(address, timeout=5) for _ in range(3)]
    assert _wait_for(lambda: server.active_connections == 3)
    with socket.create_connection(address, timeout=5) as extra:
        assert extra.recv(1) == b""  # closed at once
    assert server.stats.over_cap == 1
    held.pop().close()
    assert _wait_for(lambda: server.active_connections == 2)
    with socket.create_connection(address, timeout=5) as again:
        assert _wait_for(lambda: server.active_connections == 3)
        again.settimeout(0.2)
        with pytest.raises(TimeoutError):
            again.recv(1)  # admitted: the server waits for its ClientHello
    for s in held:
        s.close()


def test_a_trickling_handshake_is_closed_at_the_deadline(
        link_server: Callable[..., LinkServer]) -> None:
    # One byte every 0.3 s keeps every per-read timeout happy; the deadline still ends it.
    server = link_server(handshake_timeout=1.0)
    address = server._listener.getsockname()  # type: ignore[union-attr]
    hello = _client_hello()
    with socket.create_connection(address, timeout=5) as s:
        started = time.monotonic()
        closed_after = None
        for b in hello[:40]:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            ready, _, _ = select.select([s], [], [], 0.3)
            if ready:
                try:
                    data = s.recv(1)
                except OSError:
                    data = b""
                if not data:
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None, "the server kept a trickling handshake open"
        assert 0.9 <= closed_after < 3.0
    assert server.stats.deadlines_missed == 1


def test_a_trickling_certificate_less_exchange_is_closed_at_its_deadline(
        tmp_path: Path) -> None:
    from firmware.link.pairing import PairingPolicy
    from firmware.link.recovery import RecoveryLimiter

    ident = load_or_create_identity(tmp_path, "remote")
    peers = PeerStore.in_dir(tmp_path)
    server = LinkServer(("127.0.0.1", 0), ident, peers, ReceiverConfig(known_units=set()),
                        lambda hello: None,
                        pairing=PairingPolicy(lambda: [], RecoveryLimiter()),
                        limits=ListenerLimits(exchange_deadline=1.0))
    address = server.start()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(address, timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            started = time.monotonic()
            tls.settimeout(0.3)
            # A frame header announcing a body that comes one byte at a time.
            closed_after = None
            for b in b"\x00\x00\x01\x00" + bytes(60):
                try:
                    tls.sendall(bytes([b]))
                    if tls.recv(1) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - started
                    break
            assert closed_after is not None, "the exchange was kept open"
            assert 0.9 <= closed_after < 3.0
        assert server.stats.deadlines_missed == 1
    finally:
        server.stop()


def _client_hello() -> bytes:
    """The first bytes a TLS client sends, to trickle at a server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_control_server_serves_after_its_cap_frees(tmp_path: Path) -> None:
    from firmware.control import socket as control_socket

    server = ControlServer(tmp_path / "c.sock", {"status": lambda: "up"})
    server.start()
    try:
        held = []
        for _ in range(control_socket.MAX_CONNECTIONS):
            held.append(_unix_connect(str(tmp_path / "c.sock")))
        over = _unix_connect(str(tmp_path / "c.sock"))
        assert over.recv(1) == b""  # closed at once
        over.close()
        for s in held:
            s.close()
        assert _wait_for(lambda: call(tmp_path / "c.sock", "status", timeout=5) == "up")
    finally:
        server.stop()
