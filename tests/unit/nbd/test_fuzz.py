"""Garbage, truncated and hostile streams against a live NbdServer.

After every attack the server must still serve a well-behaved client, and the
backing data must be unchanged by everything the server rejected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.blockdev import FileBlockDevice
from firmware.nbd import protocol as p
from firmware.nbd.client import NbdClient
from firmware.nbd.protocol import build_info_request, build_option, build_request
from firmware.nbd.server import NbdServer
from tests.support.nbdwire import go, recv_exact

SIZE = 4 << 20
NAME = "mirrorunit"
FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@dataclass
class Live:
    server: NbdServer
    path: Path
    digest: str
    head: bytes

    @property
    def port(self) -> int:
        return self.server.port

    def backing_digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def assert_healthy(self) -> None:
        """A well-behaved client is served and nothing was modified."""
        with NbdClient("127.0.0.1", self.port, NAME) as c:
            assert c.size == SIZE
            assert c.read(0, 4096) == self.head
        assert self.backing_digest() == self.digest


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    path = tmp_path_factory.mktemp("nbd-fuzz") / "backing.img"
    content = os.urandom(SIZE)
    path.write_bytes(content)
    dev = FileBlockDevice(path)
    with NbdServer(dev, "127.0.0.1", 0) as server:
        yield Live(server, path, hashlib.sha256(content).hexdigest(), content[:4096])
    dev.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exact(sock, p.SERVER_GREETING.size)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes; fails if it never does."""
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def simple_replies(data: bytes) -> list[tuple[int, int]]:
    """(handle, error) of payload-less simple replies; asserts exact framing."""
    assert len(data) % p.SIMPLE_REPLY.size == 0, data
    out = []
    for pos in range(0, len(data), p.SIMPLE_REPLY.size):
        magic, error, handle = p.SIMPLE_REPLY.unpack_from(data, pos)
        assert magic == p.NBD_SIMPLE_REPLY_MAGIC
        out.append((handle, error))
    return out


def wait_for_idle(server: NbdServer) -> None:
    # Connection threads finish asynchronously after the peer is gone.
    deadline = time.monotonic() + 10
    while server.connection_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connection_count == 0


# --- handshake garbage -----------------------------------------------------------


@FUZZ_SETTINGS
@given(
    prefix=st.sampled_from([b"", struct.pack(">I", 3), struct.pack(">I", 1) + b"IHAVEOPT"]),
    garbage=st.binary(max_size=300),
)
def test_garbage_handshake(live: Live, prefix: bytes, garbage: bytes) -> None:
    sock = connect(live.port)
    try:
        sock.sendall(prefix + garbage)
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
    finally:
        sock.close()
    live.assert_healthy()


@FUZZ_SETTINGS
@given(
    options=st.lists(
        st.tuples(st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)), min_size=1, max_size=6
    )
)
def test_random_options_get_replies_and_a_go_still_works(
    live: Live, options: list[tuple[int, bytes]]
) -> None:
    sock = connect(live.port)
    try:
        sock.sendall(struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE))
        for option, data in options:
            if option in (p.NBD_OPT_EXPORT_NAME, p.NBD_OPT_ABORT, p.NBD_OPT_GO):
                continue  # those end the haggling; covered elsewhere
            sock.sendall(build_option(option, data))
            # Every option gets replies ending in a final ACK or error.
            while True:
                magic, echoed, rtype, length = p.OPTION_REPLY_HEADER.unpack(
                    recv_exact(sock, p.OPTION_REPLY_HEADER.size)
                )
                assert magic == p.NBD_OPTION_REPLY_MAGIC and echoed == option
                recv_exact(sock, length)
                if rtype == p.NBD_REP_ACK or rtype & p.NBD_REP_FLAG_ERROR:
                    break
        sock.sendall(build_info_request(p.NBD_OPT_GO, NAME))
        while True:
            _, _, rtype, length = p.OPTION_REPLY_HEADER.unpack(
                recv_exact(sock, p.OPTION_REPLY_HEADER.size)
            )
            recv_exact(sock, length)
            if rtype == p.NBD_REP_ACK:
                break
        sock.sendall(build_request(p.NBD_CMD_READ, 1, 0, 4096))
        handle_error = p.SIMPLE_REPLY.unpack(recv_exact(sock, 16))[1:]
        assert handle_error == (0, 1)
        assert recv_exact(sock, 4096) == live.head
    finally:
        sock.close()


@pytest.mark.parametrize("option", [p.NBD_OPT_GO, p.NBD_OPT_EXPORT_NAME, 12345])
@pytest.mark.parametrize("length", [p.MAX_OPTION_LENGTH + 1, 1 << 31, 0xFFFFFFFF])
def test_option_length_over_limit(
    live: Live, option: int, length: int, caplog: pytest.LogCaptureFixture
) -> None:
    sock = connect(live.port)
    with caplog.at_level(logging.WARNING, logger="mirrorunit.nbd"):
        try:
            sock.sendall(struct.pack(">I", 1) + p.OPTION_HEADER.pack(p.IHAVEOPT, option, length))
            sock.sendall(b"x" * 1000)
            reply = read_until_closed(sock)
        finally:
            sock.close()
        if option != p.NBD_OPT_EXPORT_NAME:
            magic, echoed, rtype, _ = p.OPTION_REPLY_HEADER.unpack(reply[:20])
            assert (magic, echoed, rtype) == (
                p.NBD_OPTION_REPLY_MAGIC,
                option,
                p.NBD_REP_ERR_TOO_BIG,
            )
        else:
            assert reply == b""
        wait_for_idle(live.server)
    assert "over the limit" in caplog.text
    live.assert_healthy()


def test_unknown_client_flags_and_bad_option_magic_close(live: Live) -> None:
    for stream in (
        struct.pack(">I", 0x80000001),
        struct.pack(">I", 1) + p.OPTION_HEADER.pack(0x4948415645, p.NBD_OPT_GO, 0),
    ):
        sock = connect(live.port)
        try:
            sock.sendall(stream)
            assert read_until_closed(sock) == b""
        finally:
            sock.close()
    live.assert_healthy()


# --- transmission garbage ---------------------------------------------------------


@FUZZ_SETTINGS
@given(garbage=st.binary(min_size=1, max_size=500))
def test_garbage_requests(live: Live, garbage: bytes) -> None:
    sock = connect(live.port)
    try:
        go(sock)
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
    finally:
        sock.close()
    live.assert_healthy()


RO_FLAGS = p.NBD_CMD_FLAG_FUA


def _rejected_requests() -> st.SearchStrategy[tuple[bytes, int]]:
    """Well-framed requests the server must refuse, with the expected errno."""
    in_range = st.integers(0, SIZE // 512 - 1).map(lambda b: b * 512)
    beyond = st.integers(SIZE, 1 << 62).map(lambda o: o - o % 512)
    bad_flags = st.integers(1, 0xFFFF).filter(lambda f: f & ~p.NBD_CMD_FLAG_FUA)

    def write(offset: int, length: int, flags: int = 0) -> bytes:
        return build_request(p.NBD_CMD_WRITE, 0, offset, length, flags) + b"\xa5" * length

    return st.one_of(
        # WRITE past the end: ENOSPC, payload consumed.
        st.builds(lambda o: (write(o, 512), p.NBD_ENOSPC), beyond),
        st.builds(lambda o: (write(SIZE - 512, 1024 + o), p.NBD_ENOSPC), in_range),
        # WRITE with flags it may not carry.
        st.builds(lambda o, f: (write(o, 512, f), p.NBD_EINVAL), in_range, bad_flags),
        # Misaligned WRITE after block sizes were negotiated (kept inside the export: a
        # request both misaligned and past the end may get either error).
        st.builds(lambda o: (write(o + 1, 512), p.NBD_EINVAL),
                  st.integers(0, SIZE // 512 - 2).map(lambda b: b * 512)),
        st.builds(lambda o: (write(o, 100), p.NBD_EINVAL), in_range),
        st.just((write(0, 0), p.NBD_EINVAL)),
        # TRIM / WRITE_ZEROES out of range or with bad flags.
        st.builds(lambda o: (build_request(p.NBD_CMD_TRIM, 0, o, 512), p.NBD_EINVAL), beyond),
        st.builds(
            lambda o: (build_request(p.NBD_CMD_WRITE_ZEROES, 0, o, 512), p.NBD_ENOSPC), beyond
        ),
        st.builds(
            lambda o: (
                build_request(p.NBD_CMD_WRITE_ZEROES, 0, o, 512, p.NBD_CMD_FLAG_FAST_ZERO),
                p.NBD_EINVAL,
            ),
            in_range,
        ),
        # Huge lengths that carry no payload.
        st.builds(
            lambda o, n: (build_request(p.NBD_CMD_READ, 0, o, n), p.NBD_EINVAL),
            in_range,
            st.integers((1 << 25) + 1, 0xFFFFFFFF),
        ),
        st.builds(
            lambda n: (build_request(p.NBD_CMD_TRIM, 0, 0, n), p.NBD_EINVAL),
            st.integers(SIZE + 1, 0xFFFFFFFF),
        ),
        # Commands this server does not offer, with any flags.
        st.builds(
            lambda c, f, o: (build_request(c, 0, o, 512, f), p.NBD_EINVAL),
            st.integers(5, 0xFFFF).filter(lambda c: c != p.NBD_CMD_WRITE_ZEROES),
            st.integers(0, 0xFFFF),
            in_range,
        ),
        st.builds(
            lambda o: (build_request(p.NBD_CMD_FLUSH, 0, o, 0), p.NBD_EINVAL),
            st.integers(1, 1 << 63),
        ),
    )


@FUZZ_SETTINGS
@given(requests=st.lists(_rejected_requests(), min_size=1, max_size=20))
def test_rejected_requests_leave_data_unchanged_and_stream_in_sync(
    live: Live, requests: list[tuple[bytes, int]]
) -> None:
    sock = connect(live.port)
    try:
        go(sock)
        # Pipelined: each request gets its own handle; a READ closes the batch.
        stream = b""
        for i, (raw, _) in enumerate(requests):
            stream += raw[:8] + struct.pack(">Q", i + 1) + raw[16:]
        stream += build_request(p.NBD_CMD_READ, 999, 0, 4096)
        sock.sendall(stream)
        replies = simple_replies(recv_exact(sock, 16 * len(requests)))
        assert replies == [(i + 1, err) for i, (_, err) in enumerate(requests)]
        assert p.SIMPLE_REPLY.unpack(recv_exact(sock, 16))[1:] == (0, 999)
        assert recv_exact(sock, 4096) == live.head
    finally:
        sock.close()
    assert live.backing_digest() == live.digest


def test_oversized_write_payload_is_drained(live: Live) -> None:
    sock = connect(live.port)
    try:
        go(sock)
        n = (1 << 25) + 512
        sock.sendall(build_request(p.NBD_CMD_WRITE, 1, 0, n) + b"\x99" * n)
        sock.sendall(build_request(p.NBD_CMD_READ, 2, 0, 4096))
        # Past the end of this small export, so ENOSPC; what matters is that
        # 32 MiB of payload were drained and the next request is in sync.
        assert simple_replies(recv_exact(sock, 16)) == [(1, p.NBD_ENOSPC)]
        assert simple_replies(recv_exact(sock, 16)) == [(2, 0)]
        assert recv_exact(sock, 4096) == live.head
    finally:
        sock.close()
    live.assert_healthy()


@pytest.mark.parametrize(
    "stream",
    [
        build_request(p.NBD_CMD_WRITE, 1, 0, 4096) + b"\x77" * 4095,
        build_request(p.NBD_CMD_WRITE, 1, 0, 0xFFFFFFFF) + b"\x77" * 10000,
        build_request(p.NBD_CMD_WRITE, 1, 0, 1 << 25) + b"\x77" * 100000,
        build_request(p.NBD_CMD_READ, 1, 0, 4096)[:20],
    ],
    ids=["short-payload", "huge-length", "max-length-truncated", "short-header"],
)
def test_truncated_requests_are_never_applied(live: Live, stream: bytes) -> None:
    sock = connect(live.port)
    try:
        go(sock)
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
    live.assert_healthy()


@pytest.mark.parametrize("magic", [0, 0x25609514, p.NBD_SIMPLE_REPLY_MAGIC, 0xFFFFFFFF])
def test_bad_request_magic_answers_earlier_requests_then_closes(
    live: Live, magic: int, caplog: pytest.LogCaptureFixture
) -> None:
    sock = connect(live.port)
    with caplog.at_level(logging.WARNING, logger="mirrorunit.nbd"):
        try:
            go(sock)
            bad = p.REQUEST_HEADER.pack(magic, 0, p.NBD_CMD_WRITE, 2, 0, 512) + b"\x55" * 512
            sock.sendall(
                build_request(p.NBD_CMD_FLUSH, 1) + bad + build_request(p.NBD_CMD_FLUSH, 3)
            )
            assert simple_replies(read_until_closed(sock)) == [(1, 0)]
        finally:
            sock.close()
        wait_for_idle(live.server)
    assert f"bad request magic {magic:#010x}" in caplog.text
    live.assert_healthy()


def test_abrupt_resets_do_not_leak_connections(live: Live) -> None:
    for i in range(30):
        sock = connect(live.port)
        if i % 3 == 1:
            go(sock)
        if i % 3 == 2:
            go(sock)
            sock.sendall(build_request(p.NBD_CMD_WRITE, 1, 0, 1 << 20) + b"\x01" * 1000)
        # SO_LINGER 0: close with RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for_idle(live.server)
    live.assert_healthy()


def test_idle_handshake_times_out_and_connections_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    dev = FileBlockDevice(path, size=1 << 20, create=True)
    with NbdServer(dev, "127.0.0.1", 0, handshake_timeout=0.5, max_connections=2) as server:
        idle = [connect(server.port), connect(server.port)]
        # A third client is turned away while two are connected...
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert read_until_closed(extra) == b""
        extra.close()
        # ...and the idle ones are dropped once the handshake deadline passes.
        for sock in idle:
            assert read_until_closed(sock) == b""
            sock.close()
        wait_for_idle(server)
        # A client that completes the handshake is not subject to the deadline.
        with NbdClient("127.0.0.1", server.port, NAME) as c:
            time.sleep(1.0)  # longer than the handshake deadline, on purpose
            assert c.read(0, 512) == bytes(512)
    dev.close()
