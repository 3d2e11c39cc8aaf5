"""The USB front end's threading over fake endpoints (no VM, no FunctionFS).

Sockets stand in for the endpoints: a SOCK_SEQPACKET pair keeps bulk-out
transfer boundaries, a small-buffered stream pair makes bulk-in writes block
the way an IN transfer waits for the host.  What is checked here cannot be
provoked through Linux's usb-storage: a Bulk-Only Mass Storage Reset arriving
while a data-in transfer is stuck must cancel it, so no stale data reaches the
host's next command.
"""

from __future__ import annotations

import errno
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware.blockdev import FileBlockDevice
from firmware.scsi import LogicalUnit, ScsiTarget
from firmware.usb_gadget.aio import Transfer
from firmware.usb_gadget.bot import CSW, CSW_SIGNATURE, make_cbw
from firmware.usb_gadget.configfs import GadgetSettings
from firmware.usb_gadget.functionfs import Ep0Event, EventType, SetupRequest, write_fd
from firmware.usb_gadget.server import AioEndpoints, UsbFrontEnd

TUR = bytes(6)
SIZE = 4 << 20


class FakeEp0:
    def __init__(self) -> None:
        self.events: queue.Queue[Ep0Event] = queue.Queue()
        self.answers: queue.Queue[tuple[str, SetupRequest, bytes]] = queue.Queue()

    def read_events(self) -> list[Ep0Event]:
        return [self.events.get()]

    def reply(self, setup: SetupRequest, data: bytes) -> None:
        self.answers.put(("reply", setup, data))

    def stall(self, setup: SetupRequest) -> None:
        self.answers.put(("stall", setup, b""))

    def setup(self, request_type: int, request: int, length: int) -> tuple[str, bytes]:
        setup = SetupRequest(request_type, request, 0, 0, length)
        self.events.put(Ep0Event(EventType.SETUP, setup))
        kind, _, data = self.answers.get(timeout=10)
        return kind, data


class SocketPipe:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.halts = 0
        #: set by a scenario: the next read fails as a UDC reports a babbling host
        self.overflow_next = False

    def read_into(self, buffer: memoryview) -> int:
        n = os.readv(self.sock.fileno(), [buffer])
        if self.overflow_next:
            self.overflow_next = False
            raise OSError(errno.EOVERFLOW, os.strerror(errno.EOVERFLOW))
        return n

    def write_all(
        self, data: bytes | memoryview, cancelled: Callable[[], bool] | None = None
    ) -> None:
        write_fd(self.sock.fileno(), data, cancelled)

    def halt(self) -> None:
        self.halts += 1


def recv_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "bulk-in closed"
        out += chunk
    return out


def read_csw(sock: socket.socket, tag: int) -> int:
    signature, got_tag, residue, status = CSW.unpack(recv_exact(sock, CSW.size))
    assert (signature, got_tag) == (CSW_SIGNATURE, tag)
    return status


@dataclass
class Host:
    """What a scenario plays the USB host with, plus the device-side pipes to inspect."""

    front: UsbFrontEnd
    ep0: FakeEp0
    out: socket.socket
    inp: socket.socket
    bulk_in: SocketPipe
    bulk_out: SocketPipe


Scenario = Callable[[Host], None]


def socket_link() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """host_out, dev_out (packets, as bulk-out transfers) and host_in, dev_in (a
    small-buffered stream, so a data-in blocks until the host reads it)."""
    host_out, dev_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host_in, dev_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (host_in, dev_in):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return host_out, dev_out, host_in, dev_in


def serve_against(front: UsbFrontEnd, ep0: FakeEp0, bulk_in: SocketPipe, bulk_out: SocketPipe,
                  play: Callable[[], None], aio: AioEndpoints | None = None) -> None:
    """Serve in this (main) thread while `play` runs as the host in another; the
    front end stops when the host is done.  Re-raises what the host raised."""
    errors: list[BaseException] = []

    def host() -> None:
        try:
            play()
        except BaseException as exc:  # reported in the main thread below
            errors.append(exc)
        finally:
            front.stop()

    thread = threading.Thread(target=host)
    front.serve_endpoints(
        ep0, bulk_in, bulk_out,
        on_started=thread.start,
        on_stopping=lambda: ep0.events.put(Ep0Event(EventType.UNBIND)),
        aio=aio,
    )
    thread.join(timeout=10)
    if errors:
        raise errors[0]


def serve(tmp_path: Path, scenario: Scenario) -> None:
    """Run the front end in this (main) thread and `scenario` as the host in another."""
    device = FileBlockDevice(tmp_path / "disk.img", size=SIZE, create=True)
    target = ScsiTarget([LogicalUnit(device, serial="FRONT1")])
    front = UsbFrontEnd(target, GadgetSettings(), chunk_size=64 * 1024)
    ep0 = FakeEp0()
    host_out, dev_out, host_in, dev_in = socket_link()
    bulk_in, bulk_out = SocketPipe(dev_in), SocketPipe(dev_out)
    player = Host(front, ep0, host_out, host_in, bulk_in, bulk_out)
    try:
        serve_against(front, ep0, bulk_in, bulk_out, lambda: scenario(player))
    finally:
        for s in (host_out, dev_out, host_in, dev_in):
            s.close()


@pytest.mark.timeout(60)
def test_class_requests_and_a_command(tmp_path: Path) -> None:
    def scenario(h: Host) -> None:
        ep0, out, inp = h.ep0, h.out, h.inp
        ep0.events.put(Ep0Event(EventType.ENABLE))
        assert ep0.setup(0xA1, 0xFE, 1) == ("reply", b"\x00")  # Get Max LUN: one LUN
        assert ep0.setup(0x41, 0x01, 0)[0] == "stall"  # vendor request
        out.send(make_cbw(1, 0, False, TUR))
        assert read_csw(inp, 1) == 1  # unit attention after the (re)enable
        out.send(make_cbw(2, 0, False, TUR))
        assert read_csw(inp, 2) == 0

    serve(tmp_path, scenario)


@pytest.mark.timeout(60)
def test_reset_cancels_a_stuck_data_in_transfer(tmp_path: Path) -> None:
    def scenario(h: Host) -> None:
        front, ep0, out, inp = h.front, h.ep0, h.out, h.inp
        ep0.events.put(Ep0Event(EventType.ENABLE))
        out.send(make_cbw(1, 0, False, TUR))
        read_csw(inp, 1)
        # READ(10) of 2 MiB; the "host" takes only the first 4 KiB, so the
        # front end ends up blocked writing to bulk-in
        read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 4096, 0)
        out.send(make_cbw(2, 2 << 20, True, read10))
        recv_exact(inp, 4096)
        deadline = time.monotonic() + 10
        while front._blocked_for is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait for the write to block; nothing else to wait on
        # Bulk-Only Mass Storage Reset; its status stage is answered only once
        # the bulk side has dropped the READ
        assert ep0.setup(0x21, 0xFF, 0) == ("reply", b"")
        inp.setblocking(False)
        try:
            while inp.recv(65536):
                pass
        except BlockingIOError:
            pass
        inp.setblocking(True)
        out.send(make_cbw(3, 0, False, TUR))
        assert read_csw(inp, 3) == 0  # a CSW, not leftover READ data

    serve(tmp_path, scenario)


@pytest.mark.timeout(60)
def test_stop_ends_a_blocked_bulk_read(tmp_path: Path) -> None:
    def scenario(h: Host) -> None:
        ep0, out, inp = h.ep0, h.out, h.inp
        ep0.events.put(Ep0Event(EventType.ENABLE))
        out.send(make_cbw(1, 0, False, TUR))
        read_csw(inp, 1)
        # the front end now waits for the next CBW; front.stop() (in serve) must end it

    started = time.monotonic()
    serve(tmp_path, scenario)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_overlong_cbw_transfer_stalls_until_reset(tmp_path: Path) -> None:
    def scenario(h: Host) -> None:
        ep0, out, inp = h.ep0, h.out, h.inp
        bulk_in, bulk_out = h.bulk_in, h.bulk_out
        ep0.events.put(Ep0Event(EventType.ENABLE))
        out.send(make_cbw(1, 0, False, TUR))
        read_csw(inp, 1)
        bulk_out.overflow_next = True
        out.send(make_cbw(2, 0, False, TUR))
        deadline = time.monotonic() + 10
        while (bulk_in.halts == 0 or bulk_out.halts == 0) and time.monotonic() < deadline:
            time.sleep(0.01)  # the stalls are the only observable; nothing to wait on
        assert bulk_in.halts and bulk_out.halts
        assert ep0.setup(0x21, 0xFF, 0) == ("reply", b"")  # reset recovery
        out.send(make_cbw(3, 0, False, TUR))
        assert read_csw(inp, 3) == 0

    serve(tmp_path, scenario)


class FdPipe(SocketPipe):
    """Bulk-in as a plain pipe, whose capacity can be set to the byte."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.halts = 0
        self.overflow_next = False

    def write_all(
        self, data: bytes | memoryview, cancelled: Callable[[], bool] | None = None
    ) -> None:
        write_fd(self.fd, data, cancelled)


@pytest.mark.timeout(60)
def test_reset_drops_a_csw_the_host_never_took(tmp_path: Path) -> None:
    """A READ's data goes out, its CSW is queued but stuck (the host stopped reading);
    after a Bulk-Only Mass Storage Reset that CSW must never reach the host."""
    import fcntl

    device = FileBlockDevice(tmp_path / "disk.img", size=SIZE, create=True)
    target = ScsiTarget([LogicalUnit(device, serial="FRONT2")])
    front = UsbFrontEnd(target, GadgetSettings(), chunk_size=64 * 1024)
    ep0 = FakeEp0()
    host_out, dev_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    in_read, in_write = os.pipe()
    fcntl.fcntl(in_write, fcntl.F_SETPIPE_SZ, 4096)
    assert fcntl.fcntl(in_write, fcntl.F_GETPIPE_SZ) == 4096
    errors: list[BaseException] = []

    def read_exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(in_read, n - len(out))
            assert chunk
            out += chunk
        return out

    def host() -> None:
        try:
            ep0.events.put(Ep0Event(EventType.ENABLE))
            host_out.send(make_cbw(1, 0, False, TUR))
            assert CSW.unpack(read_exact(CSW.size))[1] == 1
            # READ(10) of 8 blocks: exactly the pipe's 4096 bytes, so the data write
            # completes and the CSW write blocks
            read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
            host_out.send(make_cbw(2, 4096, True, read10))
            def csw_stuck() -> bool:
                # the data went out and the writer is busy: with the READ's CSW, not
                # still finishing the TUR's (a loaded machine showed that window)
                return front.counters()["bytes_in"] >= 4096 and front._in_busy is not None

            deadline = time.monotonic() + 10
            while not csw_stuck() and time.monotonic() < deadline:
                time.sleep(0.01)  # the writer's blocked CSW is the only observable
            assert csw_stuck()
            assert ep0.setup(0x21, 0xFF, 0) == ("reply", b"")
            assert len(read_exact(4096)) == 4096  # the data that was already sent
            host_out.send(make_cbw(3, 0, False, TUR))
            _, tag, _, status = CSW.unpack(read_exact(CSW.size))
            assert tag == 3, "the stale CSW of the reset command reached the host"
        except BaseException as exc:
            errors.append(exc)
        finally:
            front.stop()

    thread = threading.Thread(target=host)
    front.serve_endpoints(
        ep0, FdPipe(in_write), SocketPipe(dev_out),
        on_started=thread.start,
        on_stopping=lambda: ep0.events.put(Ep0Event(EventType.UNBIND)),
    )
    thread.join(timeout=10)
    for s in (host_out, dev_out):
        s.close()
    os.close(in_read)
    os.close(in_write)
    if errors:
        raise errors[0]


# -- the AIO bulk loop over a fake AIO context ------------------------------------------


class FakeAio:
    """aio.AioContext's interface over sockets: one worker per file runs that file's
    transfers in submission order (like a UDC endpoint queue); cancel ends a queued
    or blocked transfer with -ECONNRESET, and every transfer reports exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flight: dict[int, Transfer] = {}
        self._done: list[Transfer] = []
        self._cancelled: set[int] = set()
        self._queues: dict[int, queue.Queue[Transfer | None]] = {}
        self._workers: list[threading.Thread] = []
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.overflow_next = False
        self.cancels = 0
        self.max_out_posted = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._flight)

    def transfers(self) -> list[Transfer]:
        with self._lock:
            return list(self._flight.values())

    #: like io_setup's nr_events: requests in flight plus events not reaped yet
    max_events = 16

    def submit(self, transfers: list[Transfer]) -> int:
        with self._lock:
            if len(self._flight) + len(transfers) > self.max_events:
                raise OSError(errno.EAGAIN, "AIO ring full: events not reaped")
        for t in transfers:
            t.result = None
            if not t.is_read:
                t.buffer = bytes(t.buffer)  # f_fs copies write data at submit
            with self._lock:
                self._flight[id(t)] = t
                posted = sum(1 for x in self._flight.values() if x.is_read)
                self.max_out_posted = max(self.max_out_posted, posted)
                q = self._queues.get(t.fd)
                if q is None:
                    q = self._queues[t.fd] = queue.Queue()
                    worker = threading.Thread(target=self._run, args=(q,), daemon=True)
                    self._workers.append(worker)
                    worker.start()
            q.put(t)
        return len(transfers)

    def _run(self, q: queue.Queue[Transfer | None]) -> None:
        while (t := q.get()) is not None:
            self._complete(t, self._perform(t))

    def _perform(self, t: Transfer) -> int:
        view = memoryview(t.buffer).cast("B")[: t.length]
        poller = select.poll()
        poller.register(t.fd, select.POLLIN if t.is_read else select.POLLOUT)
        while True:
            with self._lock:
                if id(t) in self._cancelled:
                    return -errno.ECONNRESET
            if not poller.poll(10):
                continue
            if t.is_read:
                n = os.readv(t.fd, [view])
                if self.overflow_next:
                    self.overflow_next = False
                    return -errno.EOVERFLOW
                return n
            try:
                sent = os.write(t.fd, view[: 4096])
            except BlockingIOError:
                continue
            view = view[sent:]
            if not view:
                return t.length

    def _complete(self, t: Transfer, result: int) -> None:
        with self._lock:
            t.result = result
            self._cancelled.discard(id(t))
            self._done.append(t)
        os.eventfd_write(self.eventfd, 1)

    def reap(self) -> list[Transfer]:
        with self._lock:
            done, self._done = self._done, []
            for t in done:
                del self._flight[id(t)]
            return done

    def wait(self, timeout: float | None = None) -> bool:
        ready, _, _ = select.select([self.eventfd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(self.eventfd)
            except BlockingIOError:
                pass
        return bool(ready)

    def wake(self) -> None:
        os.eventfd_write(self.eventfd, 1)

    def cancel(self, transfer: Transfer) -> bool:
        with self._lock:
            if id(transfer) not in self._flight or transfer.result is not None:
                return False
            self._cancelled.add(id(transfer))
            self.cancels += 1
            return True

    def close(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        os.close(self.eventfd)


@dataclass
class AioHost:
    front: UsbFrontEnd
    ep0: FakeEp0
    out: socket.socket
    inp: socket.socket
    aio: FakeAio
    device: FileBlockDevice
    bulk_out: SocketPipe


def serve_aio(tmp_path: Path, scenario: Callable[[AioHost], None],
              chunk_size: int = 64 * 1024) -> FakeAio:
    device = FileBlockDevice(tmp_path / "disk.img", size=SIZE, create=True)
    target = ScsiTarget([LogicalUnit(device, serial="FRONT3")])
    front = UsbFrontEnd(target, GadgetSettings(), chunk_size=chunk_size)
    ep0 = FakeEp0()
    host_out, dev_out, host_in, dev_in = socket_link()
    dev_in.setblocking(False)
    aio = FakeAio()
    bulk_out = SocketPipe(dev_out)
    player = AioHost(front, ep0, host_out, host_in, aio, device, bulk_out)
    try:
        serve_against(front, ep0, SocketPipe(dev_in), bulk_out, lambda: scenario(player),
                      aio=AioEndpoints(aio, dev_in.fileno(), dev_out.fileno()))
    finally:
        aio.close()
        for s in (host_out, dev_out, host_in, dev_in):
            s.close()
    assert aio.in_flight == 0, "transfers left in flight after stop"
    return aio


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


@pytest.mark.timeout(60)
def test_aio_pipelined_write_and_read_back(tmp_path: Path) -> None:
    """1 MiB WRITE in 64 KiB pieces with reads posted ahead, then READ it back."""
    payload = os.urandom(1 << 20)

    def scenario(h: AioHost) -> None:
        h.ep0.events.put(Ep0Event(EventType.ENABLE))
        h.out.send(make_cbw(1, 0, False, TUR))
        assert read_csw(h.inp, 1) == 1  # unit attention after the enable
        h.out.send(make_cbw(2, len(payload), False, write10(8, len(payload) // 512)))
        # one SEQPACKET message is one transfer: sent in the device's 64 KiB pieces
        for off in range(0, len(payload), 64 * 1024):
            h.out.send(payload[off:off + 64 * 1024])
        assert read_csw(h.inp, 2) == 0
        h.out.send(make_cbw(3, len(payload), True, read10(8, len(payload) // 512)))
        assert recv_exact(h.inp, len(payload)) == payload
        assert read_csw(h.inp, 3) == 0
        # more commands than the ring holds events: completions must be reaped
        # even when nothing waits for them
        for tag in range(4, 4 + 3 * FakeAio.max_events):
            h.out.send(make_cbw(tag, 512, False, write10(0, 1)))
            h.out.send(payload[:512])
            assert read_csw(h.inp, tag) == 0

    aio = serve_aio(tmp_path, scenario)
    # the next pieces were posted while one went to the medium (plus no CBW read)
    assert aio.max_out_posted >= 2


@pytest.mark.timeout(60)
def test_aio_short_data_out_cancels_the_reads_posted_ahead(tmp_path: Path) -> None:
    """The host ends a WRITE's data early with a short transfer: the reads posted
    beyond it are cancelled, a phase error follows, and the next CBW is read as one."""

    def scenario(h: AioHost) -> None:
        h.ep0.events.put(Ep0Event(EventType.ENABLE))
        h.out.send(make_cbw(1, 0, False, TUR))
        read_csw(h.inp, 1)
        h.out.send(make_cbw(2, 512 * 1024, False, write10(0, 1024)))
        h.out.send(b"\xaa" * (64 * 1024))
        h.out.send(b"\xbb" * 1000)  # short: ends the data phase
        assert read_csw(h.inp, 2) == 2
        h.out.send(make_cbw(3, 0, False, TUR))
        assert read_csw(h.inp, 3) == 0

    aio = serve_aio(tmp_path, scenario)
    assert aio.cancels >= 1


@pytest.mark.timeout(60)
def test_aio_reset_cancels_a_stuck_data_in_and_its_csw(tmp_path: Path) -> None:
    """A READ's data and CSW are queued at once; the host takes 4 KiB and resets.
    Nothing of that READ (data or CSW) may reach the host after the reset."""

    def scenario(h: AioHost) -> None:
        h.ep0.events.put(Ep0Event(EventType.ENABLE))
        h.out.send(make_cbw(1, 0, False, TUR))
        read_csw(h.inp, 1)
        h.out.send(make_cbw(2, 2 << 20, True, read10(0, 4096)))
        recv_exact(h.inp, 4096)
        deadline = time.monotonic() + 10
        while h.front._in_flight_in == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the queued data-in is the only observable
        assert h.front._in_flight_in
        assert h.ep0.setup(0x21, 0xFF, 0) == ("reply", b"")
        assert h.aio.cancels >= 1
        h.inp.setblocking(False)
        try:
            while h.inp.recv(65536):
                pass
        except BlockingIOError:
            pass
        h.inp.setblocking(True)
        h.out.send(make_cbw(3, 0, False, TUR))
        assert read_csw(h.inp, 3) == 0  # a CSW of the new command, not leftovers

    serve_aio(tmp_path, scenario)


@pytest.mark.timeout(60)
def test_aio_overlong_cbw_stalls_until_reset_and_stop_ends_the_wait(tmp_path: Path) -> None:
    def scenario(h: AioHost) -> None:
        h.ep0.events.put(Ep0Event(EventType.ENABLE))
        h.out.send(make_cbw(1, 0, False, TUR))
        read_csw(h.inp, 1)
        h.bulk_out.overflow_next = True  # CBWs are read with a blocking read
        h.out.send(make_cbw(2, 0, False, TUR))
        deadline = time.monotonic() + 10
        while h.front.bot.state.value != "needs-reset" and time.monotonic() < deadline:
            time.sleep(0.01)  # the stall is the only observable
        assert h.front.bot.state.value == "needs-reset"
        assert h.ep0.setup(0x21, 0xFF, 0) == ("reply", b"")
        h.out.send(make_cbw(3, 0, False, TUR))
        assert read_csw(h.inp, 3) == 0
        # the loop now waits for the next CBW; stop() (in serve_aio) must end it

    started = time.monotonic()
    serve_aio(tmp_path, scenario)
    assert time.monotonic() - started < 10
