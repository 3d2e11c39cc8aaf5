"""The NBD listener bounds what its clients hold: write memory shared by every
connection, an idle timeout after the handshake, connection caps."""

from __future__ import annotations

import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.blockdev import FileBlockDevice
from firmware.limits import ListenerLimits
from firmware.nbd.client import NbdClient
from firmware.nbd.protocol import (
    MAX_REQUEST_SIZE,
    NBD_CMD_FLUSH,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_OPT_GO,
    ExportInfo,
    FlushRequest,
    HandshakeComplete,
    LocalProtocolError,
    NbdServerConnection,
    WriteRequest,
    build_info_request,
    build_request,
)
from firmware.nbd.server import WRITE_BUDGET, NbdServer

NAME = "mirrorunit"
MiB = 1 << 20
ATTACKERS = 8


@pytest.fixture
def device(tmp_path: Path) -> Iterator[FileBlockDevice]:
    dev = FileBlockDevice(tmp_path / "disk.img", size=64 * MiB, create=True)
    yield dev
    dev.close()


def _announce_big_write(server: NbdServer, payload: bytes = b"") -> NbdClient:
    c = NbdClient("127.0.0.1", server.port, NAME, timeout=10)
    c.sock.sendall(build_request(NBD_CMD_WRITE, 0xBAD, 0, MAX_REQUEST_SIZE) + payload)
    return c


def _wait_for_connections(server: NbdServer, n: int) -> None:
    deadline = time.monotonic() + 10
    while server.connection_count < n:
        assert time.monotonic() < deadline, f"{server.connection_count} of {n} connected"
        time.sleep(0.01)


def test_announced_writes_pin_no_memory_and_an_honest_client_is_served(
        device: FileBlockDevice) -> None:
    tracemalloc.start()
    try:
        with NbdServer(device, "127.0.0.1", 0) as server:
            attackers = [_announce_big_write(server) for _ in range(ATTACKERS)]
            _wait_for_connections(server, ATTACKERS)
            tracemalloc.reset_peak()
            data = bytes(range(256)) * 4096  # 1 MiB
            with NbdClient("127.0.0.1", server.port, NAME, timeout=10) as honest:
                honest.write(MiB, data)
                assert honest.read(MiB, len(data)) == data
            _, peak = tracemalloc.get_traced_memory()
            for a in attackers:
                a.close()
    finally:
        tracemalloc.stop()
    # Before the budget every header allocated its 32 MiB (256 MiB for eight).
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_writes_that_stall_hold_at_most_the_budget_until_their_idle_timeout(
        device: FileBlockDevice) -> None:
    limits = ListenerLimits(max_connections=64, max_per_source=16, idle_timeout=1.0)
    tracemalloc.start()
    try:
        with NbdServer(device, "127.0.0.1", 0, limits=limits) as server:
            tracemalloc.reset_peak()
            # Each sends one payload byte, then nothing: the first two take the budget.
            stallers = [_announce_big_write(server, b"x") for _ in range(4)]
            _wait_for_connections(server, 4)
            started = time.monotonic()
            with NbdClient("127.0.0.1", server.port, NAME, timeout=10) as honest:
                honest.write(0, b"y" * 4096)
                assert honest.read(0, 4096) == b"y" * 4096
            waited = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            assert server.write_budget.peak <= WRITE_BUDGET
            for s in stallers:
                s.close()
    finally:
        tracemalloc.stop()
    assert peak < WRITE_BUDGET + 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert waited < 8.0  # the stallers' idle timeouts freed the budget


def test_an_idle_client_is_dropped_after_the_idle_timeout(device: FileBlockDevice) -> None:
    limits = ListenerLimits(idle_timeout=0.5)
    with NbdServer(device, "127.0.0.1", 0, limits=limits) as server:
        c = NbdClient("127.0.0.1", server.port, NAME, timeout=10)
        c.sock.settimeout(5)
        started = time.monotonic()
        assert c.sock.recv(1) == b""
        assert 0.4 < time.monotonic() - started < 4.0
        c.close()


def test_connections_over_the_per_source_cap_are_closed(device: FileBlockDevice) -> None:
    limits = ListenerLimits(max_connections=10, max_per_source=2)
    with NbdServer(device, "127.0.0.1", 0, limits=limits) as server:
        held = [NbdClient("127.0.0.1", server.port, NAME, timeout=10) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert extra.recv(64) == b""
        assert server.refused_over_cap == 1
        held.pop().close()
        deadline = time.monotonic() + 10
        while server.connection_count > 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with NbdClient("127.0.0.1", server.port, NAME, timeout=10) as again:
            assert again.read(0, 512) == bytes(512)
        for c in held:
            c.close()


# -- the sans-IO core's metered payloads


def _metered_transmission() -> NbdServerConnection:
    conn = NbdServerConnection(
        ExportInfo(name=NAME, size=64 * MiB, min_block_size=512), metered_payloads=True)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
    [done] = conn.receive_data(build_info_request(NBD_OPT_GO, NAME, (NBD_INFO_BLOCK_SIZE,)))
    assert isinstance(done, HandshakeComplete)
    conn.data_to_send()
    return conn


def test_a_metered_write_allocates_nothing_until_granted() -> None:
    conn = _metered_transmission()
    header = build_request(NBD_CMD_WRITE, 7, 4096, 8192)
    assert conn.receive_data(header + b"\xaa" * 100) == []
    assert conn.payload_wanted == 8192 and conn.buffered_input == 100
    assert conn.payload_buffer() is None  # nowhere to receive into yet
    assert conn.grant_payload() == []
    assert conn.payload_wanted == 0 and conn.buffered_input == 0
    sink = conn.payload_buffer()
    assert sink is not None and len(sink) == 8192 - 100
    sink[:] = b"\xbb" * len(sink)
    [event] = conn.payload_received(len(sink))
    assert isinstance(event, WriteRequest) and event.handle == 7
    assert bytes(event.data) == b"\xaa" * 100 + b"\xbb" * (8192 - 100)
    with pytest.raises(LocalProtocolError):
        conn.grant_payload()


def test_a_metered_write_received_whole_completes_at_the_grant() -> None:
    conn = _metered_transmission()
    data = b"\xcc" * 4096
    follow = build_request(NBD_CMD_FLUSH, 8)
    assert conn.receive_data(build_request(NBD_CMD_WRITE, 7, 0, 4096) + data + follow) == []
    write, flush = conn.grant_payload()
    assert isinstance(write, WriteRequest) and bytes(write.data) == data
    assert isinstance(flush, FlushRequest) and flush.handle == 8
