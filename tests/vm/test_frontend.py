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
from firmware.usb_gadget.bot import CSW, CSW_SIGNATURE, make_cbw
from firmware.usb_gadget.configfs import GadgetSettings
from firmware.usb_gadget.functionfs import Ep0Event, EventType, SetupRequest, write_fd
from firmware.usb_gadget.server import UsbFrontEnd

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


def serve(tmp_path: Path, scenario: Scenario) -> None:
    """Run the front end in this (main) thread and `scenario` as the host in another."""
    device = FileBlockDevice(tmp_path / "disk.img", size=SIZE, create=True)
    target = ScsiTarget([LogicalUnit(device, serial="FRONT1")])
    front = UsbFrontEnd(target, GadgetSettings(), chunk_size=64 * 1024)
    ep0 = FakeEp0()
    host_out, dev_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host_in, dev_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (host_in, dev_in):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    errors: list[BaseException] = []
    bulk_in, bulk_out = SocketPipe(dev_in), SocketPipe(dev_out)
    player = Host(front, ep0, host_out, host_in, bulk_in, bulk_out)

    def host() -> None:
        try:
            scenario(player)
        except BaseException as exc:  # reported in the main thread below
            errors.append(exc)
        finally:
            front.stop()

    thread = threading.Thread(target=host)
    front.serve_endpoints(
        ep0, bulk_in, bulk_out,
        on_started=thread.start,
        on_stopping=lambda: ep0.events.put(Ep0Event(EventType.UNBIND)),
    )
    thread.join(timeout=10)
    for s in (host_out, dev_out, host_in, dev_in):
        s.close()
    if errors:
        raise errors[0]


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
            deadline = time.monotonic() + 10
            while front._in_busy is None and time.monotonic() < deadline:
                time.sleep(0.01)  # the writer's blocked CSW is the only observable
            assert front._in_busy is not None
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
