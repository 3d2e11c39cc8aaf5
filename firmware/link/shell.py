"""Blocking TCP + TLS shells around the link sessions: `LinkClient` and `LinkServer`.

All protocol decisions live in `session.py`; these classes only move bytes, keep
time (keepalive, dead peers, reconnect backoff, bandwidth cap) and log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from firmware.limits import (
    ConnectionGate,
    ListenerLimits,
    RateLimitedLog,
    accept_failure_is_transient,
)
from firmware.link.clients import (
    ConfigFetchSession,
    FailbackClientSession,
    FailbackResult,
    PairOfferSession,
    RecoveryClientSession,
    SwitchoverClientSession,
)
from firmware.link.errors import LinkError, LinkProtocolError, LinkRefused, PeerNotPinned
from firmware.link.frames import (
    FailbackStart,
    Hello,
    RecoverChallenge,
    SwitchoverDone,
    SwitchoverStart,
)
from firmware.link.pacing import TokenBucket
from firmware.link.pairing import (
    AnonymousServerSession,
    PairDenied,
    PairGranted,
    PairingPolicy,
    PairingServerSession,
)
from firmware.link.recovery import (
    RecoveryChallenged,
    RecoveryDenied,
    RecoveryGranted,
    RecoveryLimiter,
    RecoveryServerSession,
)
from firmware.link.session import (
    Acknowledged,
    BatchAborted,
    ConfigBackups,
    ConfigReceived,
    ConfigServed,
    Established,
    FailbackCommitted,
    FailbackSource,
    FailbackStarted,
    PeerClosed,
    PeerRefusal,
    ReceiverConfig,
    ReceiverSession,
    Refused,
    ResyncFinished,
    ResyncStarted,
    SenderConfig,
    SenderSession,
    SessionEvent,
    SessionState,
    SwitchedOver,
    WriteSink,
    WriteSource,
)
from firmware.link.tls import (
    Identity,
    PeerStore,
    anonymous_client_context,
    check_fingerprint,
    client_context,
    describe_handshake_failure,
    peer_identity,
    server_context,
)

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
ERR_BUSY = "busy"
REMOTE_CLOSED = "remote closed the connection"


class Backoff:
    """Exponential reconnect delay with jitter, so a fleet does not reconnect in step."""

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempts = 0


class _Wakeup:
    """A socketpair a waiting loop can select on, so stop() or new data wakes it."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)

    def set(self) -> None:
        try:
            self.w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closing: either way the loop will wake

    def drain(self) -> None:
        try:
            while self.r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


def _readable(sock: ssl.SSLSocket, wake: _Wakeup, timeout: float) -> bool:
    # TLS may hold decrypted bytes the kernel socket no longer shows as readable.
    if sock.pending():
        return True
    ready, _, _ = select.select([sock, wake.r], [], [], timeout)
    if wake.r in ready:
        wake.drain()
    return sock in ready


class LinkClosed(LinkError):
    """The connection ended (EOF, reset, timeout) without a protocol reason."""


class RemoteClosed(LinkClosed):
    """The remote closed the connection cleanly (EOF) without saying why."""

    def __init__(self) -> None:
        super().__init__(REMOTE_CLOSED)


class ClosedBeforeSession(LinkClosed):
    """The remote ended the connection after the TLS handshake and before the
    session was up, as a remote that has not pinned our certificate does (TLS 1.3
    lets it refuse the certificate only after our side of the handshake is done,
    so the refusal arrives as an alert, or as a reset when we were sending)."""


@dataclass
class ClientStats:
    connects: int = 0
    sessions: int = 0
    handshake_failures: int = 0
    refusals: int = 0
    bytes_sent: int = 0
    last_error: str | None = None
    #: PAIR_OFFERs sent after a refusal, and those the remote answered PAIRED.
    pair_offers: int = 0
    pairings: int = 0
    #: Uncompressed record bytes of the WRITES sent, and those frames' bytes.
    write_data_bytes: int = 0
    write_wire_bytes: int = 0


class LinkClient:
    """The local unit's side: connect, authenticate, stream a `WriteSource`, reconnect."""

    def __init__(
        self,
        address: tuple[str, int],
        identity: Identity,
        peers: PeerStore,
        remote_name: str,
        config: SenderConfig,
        source: WriteSource,
        *,
        bandwidth: float | None = None,
        backoff: Backoff | None = None,
        keepalive: float = 5.0,
        dead_after: float = 20.0,
        connect_timeout: float = 10.0,
        idle_poll: float = 0.05,
        offer_pairing: bool = True,
        pair_retry: float = 30.0,
        pair_retry_refused: float = 120.0,
    ) -> None:
        """With `offer_pairing`, a connection the remote ends before the session is
        up makes the client offer its certificate (PAIR_OFFER, see pairing.py), at
        most every `pair_retry` seconds (`pair_retry_refused` after the remote
        refused an offer), and reconnect at once when the remote pinned it."""
        self.address = address
        self.identity = identity
        self.peers = peers
        self.remote_name = remote_name
        self.config = config
        self.source = source
        #: Paces WRITES and resync chunks of every session to `bandwidth` bytes/s.
        self.pacer = TokenBucket(bandwidth)
        self._settings_lock = threading.Lock()
        self._bandwidth = bandwidth or None
        self._rate_pending = False
        self._codecs_pending: tuple[str, ...] | None = None
        self._reconnect_now = False
        self.backoff = backoff or Backoff()
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.connect_timeout = connect_timeout
        #: How often an idle sender looks at its source (besides `wakeup()`).
        self.idle_poll = idle_poll
        self.offer_pairing = offer_pairing
        self.pair_retry = pair_retry
        self.pair_retry_refused = pair_retry_refused
        self._next_offer = 0.0
        self._session_up = False
        self.stats = ClientStats()
        self.acked_seq = config.resume_seq
        self._acked_cond = threading.Condition()
        self._stop = threading.Event()
        self._wake = _Wakeup()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self._ping_nonce = 0
        #: The session of the current connection (None between connections).
        self.session: SenderSession | None = None
        self.connected = False
        #: Called with every session event (from the link thread).
        self.listeners: list[Callable[[SessionEvent], None]] = []
        #: This unit's sealed config backup (None: none), handed to the remote on
        #: every session and again whenever it changes.
        self.config_backup: Callable[[], bytes | None] | None = None

    # -- control

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="link-client", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake.close()

    def wakeup(self) -> None:
        """New records are in the source: send them without waiting for the idle poll."""
        self._wake.set()

    @property
    def bandwidth(self) -> float | None:
        """The cap in bytes/s (None: none), as last set."""
        return self._bandwidth

    @property
    def codec(self) -> str | None:
        """The codec of the next batch on the current session (None: no session)."""
        session = self.session
        return session.compression if session is not None and self.connected else None

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap the replication traffic to `rate` bytes/s (None or 0: no cap) from the
        next frame on, on this session: nothing reconnects."""
        with self._settings_lock:
            self._bandwidth = rate or None
            self._rate_pending = True
        self._wake.set()

    def set_codecs(self, codecs: tuple[str, ...]) -> None:
        """Offer `codecs` (best first) from now on.  The session takes the change at its
        next batch when it can (see `SenderSession.prefer_codecs`); otherwise the link
        alone reconnects with the new offer, once no resync is running."""
        if not codecs:
            raise ValueError("at least one codec")
        with self._settings_lock:
            self.config = dataclasses.replace(self.config, compression=tuple(codecs))
            self._codecs_pending = tuple(codecs)
        self._wake.set()

    def _apply_settings(self, session: SenderSession) -> None:
        """Takes up what `set_bandwidth` and `set_codecs` asked for (in the link thread,
        which alone touches the session)."""
        with self._settings_lock:
            new_rate, rate = self._rate_pending, self._bandwidth
            self._rate_pending = False
            codecs = self._codecs_pending
        if new_rate:
            self.pacer.set_rate(rate)
            log.info("link to %s:%d: bandwidth %s", *self.address,
                     f"capped at {rate:.0f} B/s" if rate else "not capped")
        if codecs is None or session.state is not SessionState.STREAMING:
            return
        if session.prefer_codecs(codecs):
            log.info("link to %s:%d: batches compressed with %s", *self.address,
                     session.compression)
        elif session.resync_active:
            return  # a reconnect would start the resync over: after it
        else:
            log.warning("link to %s:%d: %s was not negotiated on this session; "
                        "reconnecting the link to offer it", *self.address, codecs[0])
            self._reconnect_now = True
            session.close()
        with self._settings_lock:
            if self._codecs_pending == codecs:
                self._codecs_pending = None

    def wait_acked(self, seq: int, timeout: float) -> bool:
        """Block until the remote acknowledged `seq` (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._acked_cond:
            while self.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acked_cond.wait(left)
            return True

    # -- loops

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except ClosedBeforeSession as exc:
                self.stats.last_error = str(exc)
                log.warning("link to %s:%d closed before the session: %s", *self.address,
                            exc)
                if not self._stop.is_set() and self.offer_pairing and self.offer_pair():
                    continue  # pinned now: the normal session, at once
            except (OSError, LinkError) as exc:
                self.stats.last_error = str(exc)
                log.warning("link to %s:%d lost: %s", *self.address, exc)
            if self._stop.is_set():
                break
            if self._reconnect_now:
                self._reconnect_now = False
                continue
            delay = self.backoff.next_delay()
            log.info("link to %s:%d: reconnecting in %.2fs", *self.address, delay)
            self._stop.wait(delay)

    def offer_pair(self) -> bool:
        """Offer our certificate to the remote (if the last offer is long enough
        ago); True when the remote pinned it."""
        pinned = self.peers.get(self.remote_name)
        now = time.monotonic()
        if pinned is None or now < self._next_offer:
            return False
        self.stats.pair_offers += 1
        try:
            name = pair_offer_exchange(self.address, pinned.fingerprint, self.config.unit_id,
                                       self.identity.cert_der, timeout=self.connect_timeout)
        except LinkRefused as exc:
            self._next_offer = time.monotonic() + self.pair_retry_refused
            self.stats.last_error = f"pairing offer refused: {exc.code}: {exc.text}"
            log.error("remote %s:%d refused this unit's pairing offer: %s: %s", *self.address,
                      exc.code, exc.text)
            return False
        except (OSError, LinkError) as exc:
            self._next_offer = time.monotonic() + self.pair_retry
            log.warning("remote %s:%d: pairing offer failed: %s", *self.address, exc)
            return False
        self._next_offer = time.monotonic() + self.pair_retry
        self.stats.pairings += 1
        self.backoff.reset()
        log.warning("remote %s:%d pinned this unit's certificate as unit %s (its config "
                    "lists our fingerprint); reconnecting", *self.address, name)
        return True

    def run_once(self) -> None:
        """One connection: handshake, stream until it ends.  Raises why it ended."""
        self.peers.refresh()
        ctx = client_context(self.identity, self.peers, self.remote_name)
        raw = socket.create_connection(self.address, timeout=self.connect_timeout)
        self.stats.connects += 1
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                sock = ctx.wrap_socket(raw)
                self._sock = sock  # owns the fd now: wrap_socket detached `raw`
                peer_identity(sock, self.peers, expected=self.remote_name)
            except (ssl.SSLError, PeerNotPinned) as exc:
                self.stats.handshake_failures += 1
                why = describe_handshake_failure(exc) if isinstance(exc, ssl.SSLError) else exc
                log.warning("refusing remote %s:%d: %s", *self.address, why)
                raise LinkClosed(f"TLS handshake: {why}") from None
            sock.settimeout(self.dead_after)
            self._session_up = False
            try:
                self._stream(sock)
            except ssl.SSLError as exc:
                # In TLS 1.3 the server checks our certificate after our side of the
                # handshake is done, so its refusal shows up on the first read or write.
                why = describe_handshake_failure(exc)
                log.warning("link to %s:%d closed: %s", *self.address, why)
                if not self._session_up:
                    raise ClosedBeforeSession(why) from None
                raise LinkClosed(why) from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                if not self._session_up:
                    raise ClosedBeforeSession(f"connection reset: {exc}") from None
                raise LinkClosed(f"connection lost: {exc}") from None
            except OSError as exc:
                raise LinkClosed(f"connection lost: {exc}") from None
            except RemoteClosed as exc:
                if not self._session_up:
                    raise ClosedBeforeSession(str(exc)) from None
                raise
        finally:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            raw.close()

    def _send(self, sock: ssl.SSLSocket, data: bytes) -> None:
        sock.sendall(data)
        self.stats.bytes_sent += len(data)

    def _stream(self, sock: ssl.SSLSocket) -> None:
        with self._settings_lock:
            config = dataclasses.replace(self.config, resume_seq=self.acked_seq)
            # This session's HELLO offers them: nothing is left to apply.
            self._codecs_pending = None
        session = SenderSession(config, self.source, pacer=self.pacer)
        self.session = session
        session.start()
        last_rx = time.monotonic()
        backup_sent: bytes | None = None
        try:
            while True:
                if self._stop.is_set():
                    session.close()
                if self.config_backup is not None and session.state is SessionState.STREAMING:
                    blob = self.config_backup()
                    if blob is not None and blob != backup_sent:
                        session.put_config(blob)
                        backup_sent = blob
                self._apply_settings(session)
                data_before, wire_before = session.writes_data_bytes, session.writes_wire_bytes
                session.pump()
                self.stats.write_data_bytes += session.writes_data_bytes - data_before
                self.stats.write_wire_bytes += session.writes_wire_bytes - wire_before
                for event in session.take_events():
                    self._on_event(event)
                out = session.data_to_send()
                if out:
                    self._send(sock, out)
                if session.is_finished:
                    return
                room = session.state is SessionState.STREAMING and (
                    session.in_flight_bytes < session.config.window_bytes
                    or session.resync_active
                )
                timeout = self.idle_poll if room else self.keepalive
                paced = session.send_delay()
                if paced > 0.0:
                    timeout = min(timeout, paced)
                if _readable(sock, self._wake, timeout):
                    data = sock.recv(RECV_SIZE)
                    if not data:
                        raise RemoteClosed()
                    last_rx = time.monotonic()
                    for event in session.receive_data(data):
                        self._on_event(event)
                elif time.monotonic() - last_rx > self.dead_after:
                    raise LinkClosed(f"remote silent for {self.dead_after}s")
                elif time.monotonic() - last_rx > self.keepalive:
                    self._ping_nonce += 1
                    session.ping(self._ping_nonce)
        except LinkProtocolError as exc:
            log.warning("link to %s:%d: protocol error: %s", *self.address, exc.reason)
            try:
                sock.sendall(session.data_to_send())  # the ERROR frame, best effort
            except OSError:
                pass
            raise
        finally:
            self.connected = False

    def _on_event(self, event: SessionEvent) -> None:
        for listener in self.listeners:
            listener(event)
        if isinstance(event, ResyncStarted):
            log.warning("link to %s:%d: %s %d of %d chunks from seq %d", *self.address,
                        "verify" if event.verify else "checksum resync", event.resync_id,
                        event.chunks, event.seq)
        elif isinstance(event, ResyncFinished):
            log.warning("link to %s:%d: %s %d done at seq %d: %d chunks compared, %d differ, "
                        "%d bytes sent", *self.address,
                        "verify" if event.verify else "checksum resync", event.resync_id,
                        event.seq, event.chunks_compared, len(event.differing),
                        event.bytes_sent)
            if not event.verify:
                self._set_acked(event.seq)
        elif isinstance(event, Established):
            self.connected = True
            self._session_up = True
            self.stats.sessions += 1
            self.backoff.reset()
            log.info(
                "link up to %s:%d as %s: v%d, %s, signature=%s, remote durable seq %d",
                *self.address, event.unit_id, event.version, event.compression,
                event.signature, event.durable_seq,
            )
            self._set_acked(event.durable_seq)
        elif isinstance(event, Acknowledged):
            self._set_acked(event.durable_seq)
        elif isinstance(event, BatchAborted):
            log.warning("batch %d at seq %d aborted: %s", event.batch_id, event.first_seq,
                        event.reason)
        elif isinstance(event, Refused):
            self.stats.refusals += 1
            log.error("link to %s:%d given up: %s: %s", *self.address, event.code, event.text)
        elif isinstance(event, PeerRefusal):
            self.stats.refusals += 1
            log.error("remote %s:%d refused: %s: %s", *self.address, event.code, event.text)
            raise LinkClosed(f"remote refused: {event.code}: {event.text}")
        elif isinstance(event, PeerClosed):
            raise LinkClosed("remote said BYE")

    def _set_acked(self, seq: int) -> None:
        with self._acked_cond:
            self.acked_seq = seq
            self._acked_cond.notify_all()


# --------------------------------------------------------------------------- server


@dataclass
class ServerStats:
    accepted: int = 0
    handshake_failures: int = 0
    refusals: int = 0
    sessions: int = 0
    protocol_errors: int = 0
    #: Connections closed at once over the overall or the per-source cap.
    over_cap: int = 0
    #: Handshakes or certificate-less exchanges that outlived their deadline.
    deadlines_missed: int = 0
    #: accept() or thread-start failures the listener backed off from.
    resource_errors: int = 0


class LinkServer:
    """The remote unit's side: accept, authenticate, one receiver per connection.

    A unit id is claimed for the life of its connection; a second connection for the
    same unit is refused with reason "busy" so two writers never interleave.

    `limits` caps the connections (overall and per source network), bounds the TLS
    handshake and the certificate-less exchange by one deadline each, however slowly
    their bytes trickle; after the handshake a session silent for
    `limits.idle_timeout` (`dead_after`) is closed (peers ping every few seconds).
    Out of descriptors or threads, the listener backs off and keeps accepting.
    """

    def __init__(
        self,
        address: tuple[str, int],
        identity: Identity,
        peers: PeerStore,
        config: ReceiverConfig,
        open_sink: Callable[[Hello], WriteSink],
        *,
        handshake_timeout: float | None = None,
        dead_after: float | None = None,
        durable_poll: float = 0.1,
        backups: ConfigBackups | None = None,
        own_backup: Callable[[str], tuple[str, bytes] | None] | None = None,
        recovery: RecoveryLimiter | None = None,
        pairing: PairingPolicy | None = None,
        limits: ListenerLimits | None = None,
        open_failback: Callable[[FailbackStart], FailbackSource] | None = None,
        switchover: Callable[[SwitchoverStart], SwitchoverDone] | None = None,
        relays: Callable[[str], Collection[str]] | None = None,
    ) -> None:
        """`own_backup(peer)` is this unit's own sealed config for the pinned peer
        `peer` (unit id, blob), or None when that peer is not to keep it.

        With `recovery` (and `backups` that can list their units), a client
        without a certificate is let in for the recovery exchange only; with
        `pairing`, also for a PAIR_OFFER (pairing.py).  With `open_failback`, a pinned
        local may pull a promoted unit's image back (FAILBACK_START)."""
        self.address = address
        self.identity = identity
        self.peers = peers
        self.config = config
        self.open_sink = open_sink
        self.open_failback = open_failback
        self.switchover = switchover
        #: The units a pinned peer may relay here (`relays(peer_name)`).
        self.relays = relays
        # `handshake_timeout` and `dead_after`, when given, override `limits`.
        limits = limits or ListenerLimits()
        if handshake_timeout is not None:
            limits = dataclasses.replace(limits, handshake_deadline=handshake_timeout)
        if dead_after is not None:
            limits = dataclasses.replace(limits, idle_timeout=dead_after)
        self.limits = limits
        self.handshake_timeout = limits.handshake_deadline
        self._gate = ConnectionGate(limits)
        self._ratelog = RateLimitedLog(log, limits.log_interval)
        #: A session silent this long is closed (its peer pings every few seconds).
        self.dead_after = limits.idle_timeout
        self.durable_poll = durable_poll
        self.backups = backups
        self.own_backup = own_backup
        self.recovery = recovery if backups is not None and hasattr(backups, "units") \
            else None
        self.pairing = pairing
        self.stats = ServerStats()
        self._listener: socket.socket | None = None
        self._ctx: ssl.SSLContext | None = None
        self._ctx_generation = -1
        self._lock = threading.Lock()
        self._busy: dict[str, str] = {}
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        listener = socket.create_server(self.address, reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="link-server",
                                               daemon=True)
        self._accept_thread.start()
        host, port = listener.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(10)

    def busy_units(self) -> dict[str, str]:
        with self._lock:
            return dict(self._busy)

    def _context(self) -> ssl.SSLContext:
        # Rebuilt when pairing changes the pinned set, so a new unit needs no restart.
        self.peers.refresh()
        with self._lock:
            if self._ctx is None or self._ctx_generation != self.peers.generation:
                self._ctx_generation = self.peers.generation
                self._ctx = server_context(
                    self.identity, self.peers,
                    allow_anonymous=self.recovery is not None or self.pairing is not None)
            return self._ctx

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                raw, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                if not accept_failure_is_transient(exc):
                    log.error("link listener on %s:%d stops: accept failed: %s",
                              *self.address, exc)
                    raise
                self.stats.resource_errors += 1
                self._ratelog.warning("accept", "link listener: accept failed: %s; backing "
                                      "off %.2fs", exc, self.limits.resource_backoff)
                self._stop.wait(self.limits.resource_backoff)
                continue
            self.stats.accepted += 1
            refusal = self._gate.admit(addr[0])
            if refusal is not None:
                self.stats.over_cap += 1
                self._ratelog.warning("cap", "link listener: closed a connection from %s: %s",
                                      addr[0], refusal)
                raw.close()
                continue
            t = threading.Thread(target=self._serve, args=(raw, addr), daemon=True,
                                 name=f"link-conn-{addr[1]}")
            with self._lock:
                self._conns.add(raw)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            try:
                t.start()
            except RuntimeError as exc:  # "can't start new thread": out of threads or memory
                with self._lock:
                    self._conns.discard(raw)
                    self._threads.remove(t)
                raw.close()
                self._gate.release(addr[0])
                self.stats.resource_errors += 1
                self._ratelog.warning("thread", "link listener: closed a connection from %s: "
                                      "%s; backing off %.2fs", addr[0], exc,
                                      self.limits.resource_backoff)
                self._stop.wait(self.limits.resource_backoff)

    @property
    def active_connections(self) -> int:
        """Connections being served (each counted against the caps)."""
        return self._gate.active

    def _handshake(self, sock: ssl.SSLSocket, deadline: float) -> None:
        """The server side of the TLS handshake, done by `deadline` or TimeoutError:
        per-read timeouts alone let a client that trickles a byte at a time stay forever."""
        sock.setblocking(False)
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                want: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([sock], [])
            except ssl.SSLWantWriteError:
                want = ([], [sock])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*want, [], left)[:2]):
                raise TimeoutError(f"TLS handshake not done within "
                                   f"{self.limits.handshake_deadline}s")
        sock.setblocking(True)

    def _serve(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        claimed: list[str] = []
        # wrap_socket detaches `raw`: from then on only the TLS socket owns the fd.
        current: socket.socket = raw
        try:
            deadline = time.monotonic() + self.limits.handshake_deadline
            try:
                sock = self._context().wrap_socket(raw, server_side=True,
                                                   do_handshake_on_connect=False)
                with self._lock:
                    self._conns.discard(raw)
                    self._conns.add(sock)
                current = sock
                try:
                    self._handshake(sock, deadline)
                except TimeoutError as exc:
                    self.stats.deadlines_missed += 1
                    self._ratelog.warning("handshake", "closing connection from %s: %s",
                                          peer, exc)
                    return
                if not sock.getpeercert(binary_form=True) and (
                        self.recovery is not None or self.pairing is not None):
                    self._anonymous(sock, addr[0], peer)
                    return
                unit = peer_identity(sock, self.peers)
            except (ssl.SSLError, PeerNotPinned) as exc:
                self.stats.handshake_failures += 1
                why = describe_handshake_failure(exc) if isinstance(exc, ssl.SSLError) else exc
                self._ratelog.warning("refused", "refused connection from %s before any "
                                      "data: %s", peer, why)
                return
            except OSError as exc:
                log.info("connection from %s ended during the handshake: %s", peer, exc)
                return
            log.info("connection from %s authenticated as unit %s", peer, unit)
            sock.settimeout(self.dead_after)

            def claim_and_open(hello: Hello) -> WriteSink:
                with self._lock:
                    holder = self._busy.get(hello.unit_id)
                    if holder is not None:
                        raise LinkRefused(
                            ERR_BUSY, f"unit {hello.unit_id!r} is already connected from {holder}"
                        )
                    self._busy[hello.unit_id] = peer
                    claimed.append(hello.unit_id)
                return self.open_sink(hello)

            def claim_for_failback(start: FailbackStart) -> FailbackSource:
                assert self.open_failback is not None
                with self._lock:
                    holder = self._busy.get(start.unit_id)
                    if holder is not None:
                        raise LinkRefused(
                            ERR_BUSY, f"unit {start.unit_id!r} is already connected from "
                                      f"{holder}")
                    self._busy[start.unit_id] = peer
                    claimed.append(start.unit_id)
                return self.open_failback(start)

            session = ReceiverSession(
                self.config, claim_and_open, authenticated_unit=unit, backups=self.backups,
                own_backup=self.own_backup(unit) if self.own_backup is not None else None,
                open_failback=claim_for_failback if self.open_failback is not None else None,
                switchover=self.switchover,
                relays=self.relays(unit) if self.relays is not None else ())
            try:
                self._receive(sock, session, peer, unit)
            finally:
                if session.failback is not None:
                    # The local went away before FAILBACK_COMMIT: the unit stays primary.
                    log.warning("failback of unit %s from %s ended before its commit; the "
                                "unit stays the primary", session.failback_unit, peer)
                    session.failback.abort()
        except (OSError, LinkError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                for u in claimed:
                    if self._busy.get(u) == peer:
                        del self._busy[u]
                self._conns.discard(current)
            current.close()
            raw.close()
            self._gate.release(addr[0])

    def _anonymous(self, sock: ssl.SSLSocket, source: str, peer: str) -> None:
        """A client without a certificate: the recovery exchange or a pairing offer,
        and nothing else."""
        log.warning("client without a certificate from %s; only the recovery exchange%s "
                    "is allowed", peer, " or a pairing offer" if self.pairing else "")
        recovery = None
        if self.recovery is not None:
            recovery = RecoveryServerSession(
                self.backups, self.identity.fingerprint, source,  # type: ignore[arg-type]
                self.recovery)
        pairing = None
        if self.pairing is not None:
            pairing = PairingServerSession(self.pairing, self.peers, source)
        session = AnonymousServerSession(source, recovery=recovery, pairing=pairing)
        # One deadline for the whole exchange, not per read: the exchange is a few
        # frames, and a client without a certificate has no business lingering.
        deadline = time.monotonic() + self.limits.exchange_deadline
        while not self._stop.is_set() and not session.is_finished:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stats.deadlines_missed += 1
                self._ratelog.warning("exchange", "%s: closing connection from %s: not done "
                                      "within %ss", session.exchange, peer,
                                      self.limits.exchange_deadline)
                return
            sock.settimeout(left)
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                continue  # the deadline check above closes it
            if not data:
                log.info("%s: %s closed the connection", session.exchange, peer)
                return
            try:
                events = session.receive_data(data)
            except LinkProtocolError as exc:
                self.stats.protocol_errors += 1
                log.warning("%s: closing connection from %s: protocol error: %s",
                            session.exchange, peer, exc.reason)
                sock.sendall(session.data_to_send())
                return
            out = session.data_to_send()
            if out:
                sock.sendall(out)
            for event in events:
                if isinstance(event, PairGranted):
                    log.warning("pairing: %s offered the certificate of unit %s (%s), "
                                "listed in this unit's config: %s", peer, event.unit_id,
                                event.fingerprint,
                                "pinned" if event.new else "already pinned")
                elif isinstance(event, PairDenied):
                    self.stats.refusals += 1
                    log.warning("pairing: refused %s (offer for unit %s, fingerprint %s): "
                                "%s: %s", peer, event.unit_id, event.fingerprint, event.code,
                                event.text)
                elif isinstance(event, RecoveryChallenged):
                    log.warning("recovery: %s asks for unit %s's config backup; challenge "
                                "sent", peer, event.unit_id)
                elif isinstance(event, RecoveryGranted):
                    log.warning("recovery: %s proved the admin password of unit %s; its "
                                "sealed config backup (%d bytes) was handed over", peer,
                                event.unit_id, event.size)
                elif isinstance(event, RecoveryDenied):
                    self.stats.refusals += 1
                    log.warning("recovery: refused %s (unit %s): %s: %s", peer,
                                event.unit_id or "-", event.code, event.text)

    def _receive(self, sock: ssl.SSLSocket, session: ReceiverSession, peer: str,
                 unit: str) -> None:
        last_rx = time.monotonic()
        sent_backup = session.own_backup
        while not self._stop.is_set():
            try:
                readable = sock.pending() > 0 or bool(
                    select.select([sock], [], [], self.durable_poll)[0]
                )
                if readable:
                    data = sock.recv(RECV_SIZE)
                    if not data:
                        log.info("connection from %s closed by peer", peer)
                        return
                    last_rx = time.monotonic()
                    events = session.receive_data(data)
                else:
                    if time.monotonic() - last_rx > self.dead_after:
                        log.warning("connection from %s silent for %ss; closing", peer,
                                    self.dead_after)
                        return
                    events = []
                session.poll_durable()
            except LinkProtocolError as exc:
                self.stats.protocol_errors += 1
                log.warning("closing connection from %s: protocol error: %s", peer, exc.reason)
                sock.sendall(session.data_to_send())
                return
            if self.own_backup is not None and session.state is SessionState.STREAMING:
                # A config change sealed since this session began reaches the peer now.
                own = self.own_backup(unit)
                if own is not None and own != sent_backup:
                    session.put_own_backup(*own)
                    sent_backup = own
            out = session.data_to_send()
            if out:
                sock.sendall(out)
            for event in events:
                if isinstance(event, Refused):
                    self.stats.refusals += 1
                    log.warning("refused %s: %s: %s", peer, event.code, event.text)
                elif isinstance(event, Established):
                    self.stats.sessions += 1
                    log.info("unit %s from %s: v%d, %s, signature=%s, resuming after seq %d",
                             event.unit_id, peer, event.version, event.compression,
                             event.signature, event.durable_seq)
                elif isinstance(event, PeerRefusal):
                    log.warning("unit at %s reported %s: %s", peer, event.code, event.text)
                elif isinstance(event, ResyncStarted):
                    log.warning("unit at %s: %s %d started (local seq %d, %d chunks)", peer,
                                "verify" if event.verify else "checksum resync",
                                event.resync_id, event.seq, event.chunks)
                elif isinstance(event, ResyncFinished):
                    log.warning("unit at %s: %s %d finished at seq %d", peer,
                                "verify" if event.verify else "checksum resync",
                                event.resync_id, event.seq)
                elif isinstance(event, SwitchedOver):
                    log.warning("unit %s from %s: switchover: this unit is the primary from "
                                "seq %d", event.unit_id, peer, event.seq)
                elif isinstance(event, FailbackStarted):
                    log.warning("unit %s from %s: failback started; this unit's host writes "
                                "are stopped; %d chunks changed here since the promotion",
                                event.unit_id, peer, event.chunks_changed)
                elif isinstance(event, FailbackCommitted):
                    log.warning("unit %s from %s: failback committed at seq %d (%d chunks, "
                                "%d bytes sent); this unit follows the local again",
                                event.unit_id, peer, event.seq, event.chunks_sent,
                                event.bytes_sent)
                elif isinstance(event, ConfigReceived):
                    log.info("unit %s from %s: kept its sealed config backup (%d bytes)",
                             event.unit_id, peer, len(event.blob))
                elif isinstance(event, ConfigServed):
                    log.warning("unit %s from %s: asked for its config backup; %s",
                                event.unit_id, peer,
                                "sent" if event.found else "none is kept here")
            if session.is_finished:
                return


@contextlib.contextmanager
def _short_connection(address: tuple[str, int], ctx: ssl.SSLContext,
                      timeout: float) -> Iterator[ssl.SSLSocket]:
    """A TLS connection for one short exchange (backup fetch, recovery, pairing)."""
    with socket.create_connection(address, timeout=timeout) as raw:
        try:
            sock = ctx.wrap_socket(raw)
        except ssl.SSLError as exc:
            raise LinkClosed(f"TLS handshake: {describe_handshake_failure(exc)}") from None
        with sock:
            sock.settimeout(timeout)
            yield sock


_Exchange = ConfigFetchSession | RecoveryClientSession | PairOfferSession \
    | FailbackClientSession | SwitchoverClientSession


def _run_exchange(sock: ssl.SSLSocket, session: _Exchange) -> None:
    """Move a short exchange's bytes until it finishes; LinkClosed if the peer
    closes first (its refusals and protocol errors come from the session)."""
    while True:
        out = session.data_to_send()
        if out:
            sock.sendall(out)
        if session.is_finished:
            return
        try:
            data = sock.recv(RECV_SIZE)
        except ssl.SSLError as exc:
            raise LinkClosed(describe_handshake_failure(exc)) from None
        if not data:
            raise LinkClosed("the peer closed the connection without an answer")
        session.receive_data(data)


def fetch_config_backup(address: tuple[str, int], identity: Identity, peers: PeerStore,
                        remote_name: str, unit_id: str, timeout: float = 15.0) -> bytes | None:
    """Ask the pinned peer `remote_name` at `address` for unit `unit_id`'s sealed
    config backup (CONFIG_GET before any HELLO).  None if it keeps none; raises
    `LinkError` (or `OSError`) if it cannot be reached or refuses."""
    peers.refresh()
    with _short_connection(address, client_context(identity, peers, remote_name),
                           timeout) as sock:
        peer_identity(sock, peers, expected=remote_name)
        session = ConfigFetchSession(unit_id)
        _run_exchange(sock, session)
    return session.result


def switchover_exchange(address: tuple[str, int], identity: Identity, peers: PeerStore,
                        remote_name: str, session: SwitchoverClientSession,
                        timeout: float = 60.0) -> SwitchoverDone:
    """Ask the pinned peer `remote_name` to become the primary (SWITCHOVER_START)."""
    peers.refresh()
    with _short_connection(address, client_context(identity, peers, remote_name),
                           timeout) as sock:
        peer_identity(sock, peers, expected=remote_name)
        _run_exchange(sock, session)
    return session.result


def failback_exchange(address: tuple[str, int], identity: Identity, peers: PeerStore,
                      remote_name: str, session: FailbackClientSession,
                      timeout: float = 60.0) -> FailbackResult:
    """Run a failback (FAILBACK_START .. RESYNC_DONE) with the pinned peer
    `remote_name` at `address` on a connection of its own.  Raises `LinkRefused` when
    the peer refuses, `LinkError` or `OSError` when it cannot be reached or the
    connection ends first (the peer then stays the primary)."""
    peers.refresh()
    with _short_connection(address, client_context(identity, peers, remote_name),
                           timeout) as sock:
        peer_identity(sock, peers, expected=remote_name)
        _run_exchange(sock, session)
    return session.result


@dataclass(frozen=True)
class RecoveryOutcome:
    """What a recovery exchange brought back."""

    unit_id: str
    #: The peer's certificate (DER), whose fingerprint was the one expected.
    peer_cert: bytes
    #: The sealed backup; None when only the challenge was asked for.
    blob: bytes | None


def recovery_exchange(address: tuple[str, int], peer_fingerprint: str,
                      unit_id: str | None,
                      prove: Callable[[RecoverChallenge], bytes] | None,
                      timeout: float = 15.0) -> RecoveryOutcome:
    """Recover a sealed config backup from the peer at `address` without a
    certificate of our own.  The peer's certificate must have `peer_fingerprint`
    (checked before anything is sent).  `prove` turns the challenge into the proof
    (see recovery.py); without it the exchange stops after the challenge, which
    tells that the peer is reachable, genuine, and keeps a backup.

    Raises `PeerNotPinned` for another fingerprint, `LinkRefused` when the peer
    refuses (code `no-backup`, `wrong-password`, `rate-limited`, ...), `LinkError`
    or `OSError` when it cannot be reached."""
    with _short_connection(address, anonymous_client_context(), timeout) as sock:
        der = check_fingerprint(sock, peer_fingerprint)
        session = RecoveryClientSession(unit_id, prove)
        _run_exchange(sock, session)
    unit, blob = session.result
    return RecoveryOutcome(unit, der, blob)


def pair_offer_exchange(address: tuple[str, int], peer_fingerprint: str, unit_id: str,
                        cert_der: bytes, timeout: float = 15.0) -> str:
    """Offer our certificate to the peer at `address` (whose certificate must have
    `peer_fingerprint`, checked before anything is sent) on a connection without a
    client certificate; the name it pinned us under.  Raises `LinkRefused` when it
    refuses (`unknown-fingerprint`, `unit-mismatch`, `pinned-otherwise`,
    `rate-limited`, ...), `PeerNotPinned` for another peer, `LinkError` or
    `OSError` when it cannot be reached."""
    with _short_connection(address, anonymous_client_context(), timeout) as sock:
        check_fingerprint(sock, peer_fingerprint)
        session = PairOfferSession(unit_id, cert_der)
        _run_exchange(sock, session)
    return session.result
