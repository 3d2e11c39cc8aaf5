"""A bounded loopback load test: a real local replicates to a real remote while
2,000 unauthenticated connections, slow-loris clients and idle NBD clients
press on every listener.  Replication must go on, the remote must keep accepting,
and its memory must stay bounded.  The figures are printed (pytest -s)."""

from __future__ import annotations

import resource
import select
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.control import call
from firmware.demo import pair_both_ways
from firmware.nbd import protocol as nbd
from tests.support.nbdwire import go, recv_exact
from tests.support.replication import RemoteProc, Writer, local_link_args, wait_for
from tests.support.unitproc import LocalProc

#: Link connections opened at the remote, from this many /24s (so the per-source
#: cap does not turn them all away at once; the overall cap does the rest).
LINK_FLOOD = 2000
FLOOD_NETWORKS = 40
#: Of those, how many trickle a TLS ClientHello one byte a second (slow loris).
SLOW_LORIS = 120
#: NBD clients at the local that finish the handshake, announce a 32 MiB write
#: and send nothing more.
IDLE_NBD = 48
#: The remote's peak RSS must stay under this.
REMOTE_RSS_BOUND = 256 << 20
#: The remote's default connection cap (ListenerLimits.max_connections): its
#: threads stay near it however many connect.
CONNECTION_CAP = 256
#: The TLS handshake deadline the remote keeps by default (ListenerLimits).
HANDSHAKE_DEADLINE = 10.0


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _source(i: int) -> str:
    return f"127.0.{1 + i % FLOOD_NETWORKS}.{1 + i // FLOOD_NETWORKS % 250}"


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


class Flood:
    """Opens the link flood and trickles the slow-loris bytes from one thread."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.socks: list[socket.socket] = []
        self.refused = 0  # connect() itself failed (a full backlog)
        self.hello = _client_hello()
        self.sent: dict[socket.socket, int] = {}
        self.closed_by_server: dict[socket.socket, float] = {}
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def open(self) -> None:
        # The flood's own sockets: a shell's default soft limit (1,024) is too few.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = LINK_FLOOD + 512
        if soft < want:
            if hard != resource.RLIM_INFINITY and hard < want:
                pytest.skip(f"the flood needs {want} open files; the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        self.started = time.monotonic()
        for i in range(LINK_FLOOD):
            s = socket.socket()
            s.bind((_source(i), 0))
            s.settimeout(2)
            try:
                s.connect(self.address)
            except OSError:
                self.refused += 1
                s.close()
                continue
            s.setblocking(False)
            self.socks.append(s)
        for s in self.socks[:SLOW_LORIS]:
            self.sent[s] = 0
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            for s in list(self.sent):
                if s in self.closed_by_server:
                    continue
                try:
                    s.send(self.hello[self.sent[s]: self.sent[s] + 1])
                    self.sent[s] += 1
                except OSError:
                    self.closed_by_server[s] = time.monotonic() - self.started
            ready, _, _ = select.select([s for s in self.sent
                                         if s not in self.closed_by_server], [], [], 0)
            for s in ready:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.closed_by_server[s] = time.monotonic() - self.started

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for s in self.socks:
            s.close()


@pytest.fixture
def units(tmp_path: Path) -> Iterator[tuple[LocalProc, RemoteProc, str]]:
    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    remote = RemoteProc(tmp_path / "remote")
    local_state = tmp_path / "local" / "link"
    unit_id, _ = pair_both_ways(local_state, remote.state_dir)
    remote.start()
    local = LocalProc(tmp_path / "local", size="32M", buffer_size="16M",
                      extra=local_link_args("remote", ("127.0.0.1", remote.port), local_state))
    local.start()
    yield local, remote, unit_id
    for proc in (local, remote):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def _applied(remote: RemoteProc, unit_id: str) -> int:
    return int(remote.unit(unit_id).get("last_applied_seq") or 0)


def test_replication_goes_on_under_a_connection_flood(
        units: tuple[LocalProc, RemoteProc, str]) -> None:
    local, remote, unit_id = units
    assert remote.proc is not None
    writer = Writer(local, 32 << 20, seed=16, interval=0.01)
    writer.start()
    flood = Flood(("127.0.0.1", remote.port))
    idle_nbd: list[socket.socket] = []
    try:
        wait_for(lambda: _applied(remote, unit_id) > 0, 30, "replication to start")
        before_flood = _applied(remote, unit_id)

        for i in range(IDLE_NBD):
            # Spread over /24s so the per-source cap lets them all in.
            c = socket.create_connection(("127.0.0.1", local.port), timeout=10,
                                         source_address=(f"127.0.{100 + i % 8}.{1 + i}", 0))
            idle_nbd.append(c)
            recv_exact(c, nbd.SERVER_GREETING.size)
            go(c)
            c.sendall(nbd.build_request(nbd.NBD_CMD_WRITE, 0xBAD + i, 0, nbd.MAX_REQUEST_SIZE))
        flood.open()

        # While the flood holds the remote: seqs keep arriving, control answers.
        latencies = []
        threads = []
        seqs = [before_flood]
        deadline = time.monotonic() + HANDSHAKE_DEADLINE + 3.0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            call(remote.control, "status", timeout=10)
            latencies.append(time.monotonic() - t0)
            seqs.append(_applied(remote, unit_id))
            threads.append(_proc_status(remote.proc.pid, "Threads"))
            time.sleep(0.25)  # sampling, not synchronisation
        assert seqs[-1] > before_flood, "replication stopped under the flood"
        assert sorted(seqs) == seqs

        # The slow-loris clients were cut at the handshake deadline, not kept.
        loris = list(flood.sent)
        cut = [flood.closed_by_server.get(s) for s in loris]
        assert all(t is not None for t in cut), \
            f"{sum(t is None for t in cut)} slow-loris connections still open"
        assert max(t for t in cut if t is not None) < HANDSHAKE_DEADLINE + 3.0

        # The remote still accepts: a fresh client gets the server's half of the
        # handshake once the flood is gone.
        flood.close()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

        def handshakes() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", remote.port), timeout=5) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    return bool(tls.getpeercert(binary_form=True))
            except OSError:
                return False

        wait_for(handshakes, 10, "the remote to accept a new connection")
        after = _applied(remote, unit_id)
        wait_for(lambda: _applied(remote, unit_id) > after, 15, "replication after the flood")
        rss = _proc_status(remote.proc.pid, "VmHWM") * 1024
        print(f"\nlink flood: {LINK_FLOOD} connections from {FLOOD_NETWORKS} /24s "
              f"({flood.refused} refused at connect), {SLOW_LORIS} slow-loris cut after "
              f"{min(t for t in cut if t):.1f}-{max(t for t in cut if t):.1f}s, "
              f"{IDLE_NBD} idle NBD writers; seqs applied {before_flood} -> {seqs[-1]}; "
              f"control status latency median {statistics.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms; remote peak RSS {rss / 2**20:.1f} MiB, "
              f"peak threads {max(threads)}")
        # Over the cap, connections are closed at once: no thread each.
        assert max(threads) < CONNECTION_CAP + 64, f"{max(threads)} threads in the remote"
        assert rss < REMOTE_RSS_BOUND, f"remote peak RSS {rss / 2**20:.1f} MiB"
        # The machine is shared (2 cores): a single slow answer is tolerated, a slow
        # control socket in general is not.
        assert statistics.median(latencies) < 0.25
        assert max(latencies) < 10.0
    finally:
        flood.close()
        for c in idle_nbd:
            c.close()
        writer.stop_event.set()
        writer.join(10)
