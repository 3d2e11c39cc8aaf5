"""TCP shell around the sans-IO NBD core: sockets, threads and a BlockDevice.

One thread per client connection; the requests of a connection are executed
in the order they arrive.  What clients can hold is bounded (`ListenerLimits`):
connections overall and per source network, an overall deadline for the
handshake, an idle timeout after it, and one write budget shared by every
connection — a write's buffer is allocated only once its payload starts to
arrive and its length fits the budget, so headers announcing 32 MiB writes pin
nothing.  Write payloads are received straight into the
buffer the request will carry (``recv_into``) and read replies leave with one
``sendmsg`` of header and data, so large transfers are never handled per
sector in Python.

The device's addressing unit is its logical block size.  Clients that
negotiated block sizes (NBD_OPT_GO with NBD_INFO_BLOCK_SIZE) are held to it by
the core; clients that did not may legally send byte-granular requests, which
are served here by widening reads and read-modify-writing the edge blocks.
"""

from __future__ import annotations

import errno
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from firmware.blockdev import (
    BlockDevice,
    BlockDeviceError,
    FrontEnd,
    HostCommand,
    MediumError,
    MediumNotPresent,
    NotReady,
    OutOfRange,
    WriteProtected,
    flush_for,
    pwrite_for,
)
from firmware.limits import (
    RESOURCE_ERRNOS,
    ByteBudget,
    ConnectionGate,
    ListenerLimits,
    RateLimitedLog,
)
from firmware.nbd.protocol import (
    COMMAND_NAMES,
    MAX_REQUEST_SIZE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    Disconnect,
    Event,
    ExportInfo,
    FlushRequest,
    HandshakeComplete,
    InvalidRequest,
    NbdError,
    NbdServerConnection,
    ProtocolViolation,
    ReadRequest,
    State,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from firmware.units import split_host_port

DEFAULT_PORT = 10809
DEFAULT_EXPORT_NAME = "mirrorunit"
#: Bytes asked of the kernel per recv() for request headers (and any payload
#: that arrives with them).
RECV_SIZE = 256 * 1024
#: WRITE_ZEROES and TRIM are split so neither a zero buffer nor a device call
#: grows with the request length.
ZERO_CHUNK = 1 << 20
TRIM_CHUNK = MAX_REQUEST_SIZE
_ZEROES = bytes(ZERO_CHUNK)
#: Write payload bytes all connections may hold at once: two writes of the
#: largest size, so one big writer never waits on itself.
WRITE_BUDGET = 2 * MAX_REQUEST_SIZE
#: A client silent this long after its handshake is dropped, so idle clients
#: cannot hold every slot.  A kernel nbd client with no I/O for that long
#: reconnects (nbd-client -persist); qemu and libnbd clients reconnect on use.
IDLE_TIMEOUT = 300.0
#: Connections at once from one IPv4 /24 or IPv6 /64.
MAX_PER_SOURCE = 16

log = logging.getLogger("mirrorunit.nbd")


class ServerStopped(NbdError):
    """start() after stop(): a stopped server is not restarted."""


def parse_hostport(s: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[V6ADDR]:PORT``, ``HOST`` or ``:PORT``.

    An empty host means every interface.  Raises ValueError naming what is wrong.
    """
    return split_host_port(s, default_port, empty_host=True)


def export_info_for(device: BlockDevice, name: str, description: str = "") -> ExportInfo:
    """Advertised limits of a device: its block size, 4 KiB preferred, 32 MiB max."""
    block = device.block_size
    if block <= 0 or block & (block - 1) or block > 65536:
        # Not expressible as an NBD minimum block size; byte-granular requests
        # are served by read-modify-write anyway.
        block = 1
    return ExportInfo(
        name=name,
        size=device.size,
        read_only=device.read_only,
        can_trim=device.supports_trim,
        min_block_size=block,
        preferred_block_size=max(4096, block),
        max_block_size=MAX_REQUEST_SIZE - MAX_REQUEST_SIZE % block,
        description=description,
    )


def nbd_errno(exc: Exception, command: int) -> int:
    """The NBD error value a BlockDevice failure is reported with."""
    if isinstance(exc, OutOfRange):
        return NBD_ENOSPC if command in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
    if isinstance(exc, WriteProtected):
        return NBD_EPERM
    if isinstance(exc, MediumNotPresent):
        return NBD_EIO  # the disk unplugged: an I/O error, as a block device gives
    if isinstance(exc, NotReady):
        return NBD_ESHUTDOWN
    if isinstance(exc, MediumError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NBD_ENOSPC
    return NBD_EIO


# --- byte-granular access over a block-addressed device ------------------------


def _block_of(device: BlockDevice) -> int:
    block = device.block_size
    return block if block > 0 else 1


def read_range(device: BlockDevice, offset: int, length: int) -> bytes | memoryview:
    block = _block_of(device)
    start = offset - offset % block
    end = -(-(offset + length) // block) * block
    if start == offset and end == offset + length:
        return device.pread(offset, length)
    data = device.pread(start, end - start)
    return memoryview(data)[offset - start : offset - start + length]


def write_range(
    device: BlockDevice, offset: int, data: bytes | memoryview, fua: bool = False,
    command: HostCommand | None = None,
) -> None:
    """Write ``data`` at any byte offset; callers serialise writers (RMW).  With FUA,
    ``command`` is the barrier its completion records (see blockdev.pwrite_for)."""
    block = _block_of(device)
    length = len(data)
    start = offset - offset % block
    end = -(-(offset + length) // block) * block
    if start == offset and end == offset + length:
        pwrite_for(device, offset, data, fua, command)
        return
    merged = bytearray(end - start)
    if offset != start:
        merged[:block] = device.pread(start, block)
    if (offset + length) % block:
        merged[-block:] = device.pread(end - block, block)
    merged[offset - start : offset - start + length] = data
    pwrite_for(device, start, merged, fua, command)


def zero_range(device: BlockDevice, offset: int, length: int, fua: bool = False,
               command: HostCommand | None = None) -> None:
    # Explicit zeroes: the BlockDevice contract does not promise that trimmed
    # ranges read back as zero, so a hole is never punched for this command.
    if length <= ZERO_CHUNK:
        write_range(device, offset, memoryview(_ZEROES)[:length], fua, command)
        return
    end = offset + length
    pos = offset
    while pos < end:
        n = min(ZERO_CHUNK - pos % ZERO_CHUNK, end - pos)
        write_range(device, pos, memoryview(_ZEROES)[:n])
        pos += n
    if fua:
        if command is not None:
            flush_for(device, command)
        else:
            device.flush()


def trim_range(device: BlockDevice, offset: int, length: int, fua: bool = False) -> None:
    # Trim is advisory, so partial edge blocks are simply left alone.
    block = _block_of(device)
    start = -(-offset // block) * block
    end = (offset + length) // block * block
    pos = start
    while pos < end:
        n = min(TRIM_CHUNK, end - pos)
        device.trim(pos, n)
        pos += n
    if fua:
        device.flush()


def _send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


class NbdServer:
    """Serves one BlockDevice as one NBD export to any number of clients."""

    def __init__(
        self,
        device: BlockDevice,
        host: str,
        port: int,
        export_name: str = DEFAULT_EXPORT_NAME,
        logger: logging.Logger | None = None,
        description: str = "",
        handshake_timeout: float | None = 30.0,
        max_connections: int = 64,
        limits: ListenerLimits | None = None,
        write_budget: int = WRITE_BUDGET,
    ) -> None:
        """`limits`, when given, replaces `handshake_timeout` and `max_connections`."""
        self.device = device
        if limits is None:
            limits = ListenerLimits(
                max_connections=max_connections,
                max_per_source=min(MAX_PER_SOURCE, max_connections),
                handshake_deadline=handshake_timeout or 30.0,
                idle_timeout=IDLE_TIMEOUT,
            )
        else:
            handshake_timeout = limits.handshake_deadline
        self.limits = limits
        #: A client that has not finished option haggling by then is dropped,
        #: however slowly its bytes trickle, so idle sockets cannot pin threads.
        self.handshake_timeout = handshake_timeout
        self.max_connections = limits.max_connections
        if write_budget < MAX_REQUEST_SIZE:
            raise ValueError(f"a write budget under {MAX_REQUEST_SIZE} bytes would refuse "
                             "the largest write the export advertises")
        self.write_budget = ByteBudget(write_budget)
        self._gate = ConnectionGate(limits)
        self._ratelog = RateLimitedLog(logger if logger is not None else log,
                                       limits.log_interval)
        self.host = host
        self._requested_port = port
        self.export_name = export_name
        self.description = description
        self.log = logger if logger is not None else log
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()
        # Mutations are serialised so a read-modify-write of an edge block
        # cannot interleave with another connection's write of that block.
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._loop_idle = threading.Event()
        self._loop_idle.set()
        self._stopped = False
        self._clients: dict[socket.socket, threading.Thread] = {}
        #: Ids of this server's connections, recorded with the barriers they send.
        self._next_connection = 1
        self._serve_thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._closed_address: tuple[str, int] | None = None
        # Fail early on a device whose geometry cannot be advertised.
        export_info_for(device, export_name, description)

    # --- lifecycle -----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def address(self) -> tuple[str, int]:
        """Bound address; after ``stop()`` the one that was bound."""
        listener = self._listener
        if listener is not None:
            name = listener.getsockname()
            return str(name[0]), int(name[1])
        if self._closed_address is not None:
            return self._closed_address
        return self.host, self._requested_port

    @property
    def connection_count(self) -> int:
        """Client connections currently being served."""
        with self._lock:
            return len(self._clients)

    def start(self) -> None:
        """Bind and listen; port 0 picks a free port (see ``.port``)."""
        with self._lock:
            if self._stopped:
                raise ServerStopped("server was stopped")
            if self._listener is not None:
                return
            infos = socket.getaddrinfo(
                self.host or None,
                self._requested_port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            family, type_, proto, _, sockaddr = infos[0]
            listener = socket.socket(family, type_, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(sockaddr)
                listener.listen(16)
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            self._wake_r, self._wake_w = socket.socketpair()
            self._listener = listener
        self.log.info("NBD export %r listening on %s:%d", self.export_name, *self.address)

    def serve_forever(self) -> None:
        """Accept clients until ``stop()``; starts the listener if needed."""
        try:
            self.start()
        except ServerStopped:
            return
        with self._lock:
            if self._stopping.is_set():
                return
            listener, wake_r = self._listener, self._wake_r
            assert listener is not None and wake_r is not None
            self._loop_thread = threading.current_thread()
            self._loop_idle.clear()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ)
                sel.register(wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is listener:
                            self._accept(listener)
        finally:
            self._loop_idle.set()
            self._loop_thread = None
            if self._stopping.is_set():
                self._close_listener()

    def stop(self) -> None:
        """Stop accepting, disconnect clients, release the port. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            if self._wake_w is not None:
                self._wake_w.send(b"x")
            clients = dict(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected by the client
        # Called from the accept loop's own thread (a signal handler), the loop
        # cannot exit before we return; it then closes the listener itself.
        if self._loop_thread is not threading.current_thread():
            if not self._loop_idle.wait(10):
                self.log.error("NBD accept loop did not exit")
            self._close_listener()
        for thread in clients.values():
            thread.join(10)
        if self._serve_thread is not None and self._serve_thread is not threading.current_thread():
            self._serve_thread.join(10)
        self.log.info("NBD export %r stopped", self.export_name)

    def _close_listener(self) -> None:
        with self._lock:
            sockets = (self._listener, self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = None
            listener_name = self.address if self._listener is not None else None
            self._listener = None
        for s in sockets:
            if s is not None:
                s.close()
        if listener_name is not None:
            self._closed_address = listener_name

    def __enter__(self) -> NbdServer:
        """Start serving on a background thread."""
        self.start()
        self._serve_thread = threading.Thread(
            target=self.serve_forever, name=f"nbd-accept-{self.port}", daemon=True
        )
        self._serve_thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # ECONNABORTED: this client is lost, the server is not.  EMFILE and kin
            # leave the client in the backlog, so the listener stays readable: pause,
            # or the loop spins.
            self._ratelog.warning("accept", "NBD accept failed: %s", e)
            if e.errno in RESOURCE_ERRNOS:
                self._stopping.wait(self.limits.resource_backoff)
            return
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = None if self._stopping.is_set() else self._gate.admit(host)
        if self._stopping.is_set() or refusal is not None:
            if refusal is not None:
                self._ratelog.warning("cap", "NBD client %s refused: %s", peer, refusal)
            sock.close()
            return
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=self._run_client, args=(sock, peer, host), name=f"nbd-client-{peer}",
            daemon=True
        )
        with self._lock:
            self._clients[sock] = thread
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread"
            with self._lock:
                self._clients.pop(sock, None)
            sock.close()
            self._gate.release(host)
            self._ratelog.warning("thread", "NBD client %s refused: %s", peer, e)
            self._stopping.wait(self.limits.resource_backoff)

    @property
    def refused_over_cap(self) -> int:
        """Connections closed at once over the overall or the per-source cap."""
        return self._gate.refused_total + self._gate.refused_source

    # --- one connection ------------------------------------------------------------

    def _run_client(self, sock: socket.socket, peer: object, host: str) -> None:
        self.log.info("NBD client %s connected", peer)
        reason = "connection closed"
        try:
            reason = self._converse(sock, peer)
        except OSError as e:
            reason = f"connection error: {e}"
        except Exception:
            # The boundary of one client: a bug must cost this connection only.
            self.log.exception("NBD client %s: internal error, closing connection", peer)
            reason = "internal error"
        finally:
            with self._lock:
                self._clients.pop(sock, None)
            sock.close()
            self._gate.release(host)
            self.log.info("NBD client %s disconnected: %s", peer, reason)

    def _converse(self, sock: socket.socket, peer: object) -> str:
        with self._lock:
            conn_id, self._next_connection = self._next_connection, self._next_connection + 1
        conn = NbdServerConnection(
            export_info_for(self.device, self.export_name, self.description),
            metered_payloads=True,
        )
        deadline = None
        if self.handshake_timeout is not None:
            deadline = time.monotonic() + self.handshake_timeout
            sock.settimeout(self.handshake_timeout)
        idle = self.limits.idle_timeout
        held = 0  # write budget this connection holds
        events: list[Event] = []
        sink: memoryview | None = None
        try:
            sock.sendall(conn.data_to_send())
            while True:
                if deadline is not None and not conn.in_transmission:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return f"handshake not done within {self.handshake_timeout}s"
                    sock.settimeout(left)
                wanted = conn.payload_wanted
                if wanted:
                    # Budget only once the payload is on its way: a header alone
                    # (or a client gone quiet after it) holds nothing.
                    if not conn.buffered_input and not select.select([sock], [], [], idle)[0]:
                        return f"idle for {idle}s in the middle of a write"
                    # The idle timeout and then some: long enough for a stalled holder
                    # to be dropped even on a loaded unit, so only live writers make a
                    # write wait that long (a refusal costs the client its connection).
                    budget_wait = max(2 * idle, idle + 5.0)
                    if not self.write_budget.acquire(wanted, budget_wait):
                        self._ratelog.warning(
                            "budget", "NBD client %s: no write budget for %d bytes in %ss",
                            peer, wanted, budget_wait)
                        return "write budget exhausted"
                    held = wanted
                    events = conn.grant_payload()
                else:
                    sink = conn.payload_buffer()
                    if sink is not None:
                        events = conn.payload_received(sock.recv_into(sink))
                        sink = None
                    else:
                        events = conn.receive_data(sock.recv(RECV_SIZE))
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                ended = self._handle_all(conn, sock, peer, events, conn_id)
                # The events carried the write's buffer; drop it before waiting for
                # more input, or an idle client would keep it past its budget.
                events = []
                if held and conn.state is not State.RECEIVING_PAYLOAD:
                    self.write_budget.release(held)
                    held = 0
                if ended is not None:
                    return ended
        except TimeoutError:
            if conn.in_transmission:
                return f"idle for {idle}s"
            return f"handshake not done within {self.handshake_timeout}s"
        finally:
            if held:
                # Free the half-received buffer before its budget goes to another.
                del conn
                events = []
                sink = None
                self.write_budget.release(held)

    def _handle_all(
        self, conn: NbdServerConnection, sock: socket.socket, peer: object, events: list[Event],
        conn_id: int = 0,
    ) -> str | None:
        for event in events:
            ended = self._handle(conn, sock, peer, event, conn_id)
            if ended is not None:
                return ended
        return None

    def _handle(
        self, conn: NbdServerConnection, sock: socket.socket, peer: object, event: Event,
        conn_id: int = 0,
    ) -> str | None:
        """Execute one event; returns the reason when the connection ends."""
        device = self.device
        if isinstance(event, ReadRequest):
            try:
                data = read_range(device, event.offset, event.length)
            except (BlockDeviceError, OSError) as e:
                self._report_device_error(peer, "READ", e)
                sock.sendall(conn.reply_error(event.handle, nbd_errno(e, NBD_CMD_READ)))
            else:
                _send_buffers(sock, conn.reply_read(event.handle, data))
            return None
        if isinstance(event, WriteRequest):
            self._execute(
                conn,
                sock,
                peer,
                event.handle,
                NBD_CMD_WRITE,
                lambda: write_range(
                    device, event.offset, event.data, event.fua,
                    HostCommand(FrontEnd.NBD, NBD_CMD_WRITE, True, conn_id) if event.fua
                    else None),
            )
            return None
        if isinstance(event, WriteZeroesRequest):
            self._execute(
                conn,
                sock,
                peer,
                event.handle,
                NBD_CMD_WRITE_ZEROES,
                lambda: zero_range(
                    device, event.offset, event.length, event.fua,
                    HostCommand(FrontEnd.NBD, NBD_CMD_WRITE_ZEROES, True, conn_id) if event.fua
                    else None),
            )
            return None
        if isinstance(event, TrimRequest):
            self._execute(
                conn,
                sock,
                peer,
                event.handle,
                NBD_CMD_TRIM,
                lambda: trim_range(device, event.offset, event.length, event.fua),
            )
            return None
        if isinstance(event, FlushRequest):
            self._execute(
                conn, sock, peer, event.handle, NBD_CMD_FLUSH,
                lambda: flush_for(device, HostCommand(FrontEnd.NBD, NBD_CMD_FLUSH,
                                                      connection=conn_id)),
                exclusive=False,
            )
            return None
        if isinstance(event, InvalidRequest):
            self.log.info("NBD client %s: refused request: %s", peer, event.reason)
            sock.sendall(conn.reply_error(event.handle, event.error))
            return None
        if isinstance(event, HandshakeComplete):
            sock.settimeout(self.limits.idle_timeout)
            self.log.info(
                "NBD client %s: export %r, flags %#06x, block sizes %s",
                peer,
                event.export_name,
                event.transmission_flags,
                "negotiated" if event.block_size_negotiated else "default",
            )
            return None
        if isinstance(event, Disconnect):
            return event.reason
        assert isinstance(event, ProtocolViolation)
        self.log.warning("NBD client %s: protocol error: %s", peer, event.reason)
        return f"protocol error: {event.reason}"

    def _execute(
        self,
        conn: NbdServerConnection,
        sock: socket.socket,
        peer: object,
        handle: int,
        command: int,
        action: Callable[[], None],
        exclusive: bool = True,
    ) -> None:
        try:
            if exclusive:
                with self._write_lock:
                    action()
            else:
                action()
        except (BlockDeviceError, OSError) as e:
            self._report_device_error(peer, COMMAND_NAMES.get(command, str(command)), e)
            reply = conn.reply_error(handle, nbd_errno(e, command))
        else:
            reply = conn.reply_ok(handle)
        sock.sendall(reply)

    def _report_device_error(self, peer: object, what: str, exc: Exception) -> None:
        self.log.warning("NBD client %s: %s failed: %s", peer, what, exc)
