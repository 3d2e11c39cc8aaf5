"""The NBD listener bounds what its clients hold: write memory shared by every
connection, an idle timeout after the handshake, connection caps."""

from __future__ import annotations

import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.blockdev import FileBlockDevice
from firmware.limits import ListenerLimits
from firmware.nbd.client import NbdClient
from firmware.nbd.protocol import MAX_REQUEST_SIZE, NBD_CMD_WRITE, build_request
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
