"""A TCP proxy for tests that sits between a client and a server and misbehaves on cue.

Faults: drop every connection (orderly close), reset every connection (RST), add
one-way delay, cap bandwidth, truncate a direction after N bytes, flip one byte at a
stream offset, refuse new connections.  Per-connection faults are queued with
`fault_next()` and taken by the next accepted connection.  It binds 127.0.0.1 only.
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

C2S = "c2s"
S2C = "s2c"
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class ConnectionFaults:
    truncate_c2s_after: int | None = None
    truncate_s2c_after: int | None = None
    corrupt_c2s_at: int | None = None
    corrupt_s2c_at: int | None = None
    #: A connection that ends before its fault took effect (e.g. refused early) hands
    #: the fault on to the next connection, so a queued fault is never lost silently.
    until_fired: bool = True


class _Pacer:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    def pace(self, n: int) -> None:
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate
        wait = self._next - now - 0.01  # allow a 10 ms burst
        if wait > 0:
            time.sleep(wait)


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket, faults: ConnectionFaults) -> None:
        self.proxy = proxy
        self.client = client
        self.server = socket.create_connection(proxy.target, timeout=5)
        self.server.settimeout(None)
        self.faults = faults
        self.closed = threading.Event()
        self.counts = {C2S: 0, S2C: 0}
        self.fired = False
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, self.server, C2S), daemon=True),
            threading.Thread(target=self._pump, args=(self.server, client, S2C), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def close(self, reset: bool = False) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            if self.faults.until_fired and self.faults != ConnectionFaults() and not self.fired:
                self.proxy.fault_next(self.faults, front=True)
            for s in (self.client, self.server):
                try:
                    if reset:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    else:
                        s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        truncate = getattr(self.faults, f"truncate_{direction}_after")
        corrupt = getattr(self.faults, f"corrupt_{direction}_at")
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                start = self.counts[direction]
                if truncate is not None and start + len(data) >= truncate:
                    data = data[: max(0, truncate - start)]
                    self._forward(dst, data, direction)
                    self.fired = True
                    self.proxy._fired(f"truncate-{direction}")
                    break
                if corrupt is not None and start <= corrupt < start + len(data):
                    buf = bytearray(data)
                    buf[corrupt - start] ^= 0xFF
                    data = bytes(buf)
                    self.fired = True
                    self.proxy._fired(f"corrupt-{direction}")
                self._forward(dst, data, direction)
        except (OSError, ValueError):
            pass  # the other pump or a fault closed the sockets under us
        self.close()

    def _forward(self, dst: socket.socket, data: bytes, direction: str) -> None:
        if self.proxy.delay:
            time.sleep(self.proxy.delay)
        pacer = self.proxy._pacers.get(direction)
        view = memoryview(data)
        step = 4096 if pacer is not None else len(view) or 1
        for off in range(0, len(view), step):
            chunk = view[off : off + step]
            if pacer is not None:
                pacer.pace(len(chunk))
            dst.sendall(chunk)
            self.counts[direction] += len(chunk)
            self.proxy._count(direction, len(chunk))


class FaultProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.refuse = False
        self._pacers: dict[str, _Pacer] = {}
        self._queue: collections.deque[ConnectionFaults] = collections.deque()
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connections = 0
        self.bytes = {C2S: 0, S2C: 0}
        #: Per-connection faults that took effect, in order ("corrupt-c2s", ...).
        self.fired: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap each direction to `rate` bytes/s (None: no cap)."""
        self._pacers = {} if rate is None else {C2S: _Pacer(rate), S2C: _Pacer(rate)}

    def fault_next(self, faults: ConnectionFaults, front: bool = False) -> None:
        with self._lock:
            if front:
                self._queue.appendleft(faults)
            else:
                self._queue.append(faults)

    def live_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.closed.is_set())

    def drop_all(self) -> int:
        return self._close_all(reset=False)

    def reset_all(self) -> int:
        return self._close_all(reset=True)

    def _close_all(self, reset: bool) -> int:
        with self._lock:
            conns = [c for c in self._conns if not c.closed.is_set()]
        for c in conns:
            c.close(reset=reset)
        return len(conns)

    def _fired(self, fault: str) -> None:
        with self._lock:
            self.fired.append(fault)

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.bytes[direction] += n

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refuse:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                client.close()
                continue
            with self._lock:
                faults = self._queue.popleft() if self._queue else ConnectionFaults()
                self.connections += 1
            try:
                conn = _Conn(self, client, faults)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns = [c for c in self._conns if not c.closed.is_set()]
                self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        self._close_all(reset=False)
        for c in list(self._conns):
            for t in c.threads:
                t.join(2)
