"""Control socket: length-prefixed CBOR maps over a unix stream socket.

Request:  {"op": "<name>", "args": {...}}
Response: {"ok": true, "result": ...} or {"ok": false, "error": "<message>"}

Each frame is a 4-byte big-endian length and a CBOR map of at most MAX_FRAME
bytes.  A malformed request gets an error response and the connection closes;
the unit carries on.  A handler refuses with a `MirrorUnitError` (or a ValueError
from converting its arguments), whose message is the answer; anything else it raises
is a bug, logged with its traceback and answered as an internal error.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import cbor2

from .. import cbor_strict
from ..errors import MirrorUnitError
from ..limits import RateLimitedLog, accept_failure_is_transient

log = logging.getLogger("mirrorunit.control")

FRAME_LENGTH = struct.Struct(">I")
assert FRAME_LENGTH.size == 4
MAX_FRAME = 1 << 20
#: Connections served at once; the socket is owner-only, so this only guards
#: against a runaway tool, not an attacker.
MAX_CONNECTIONS = 64
#: Pause after accept() or a thread start failed for want of descriptors or memory.
RESOURCE_BACKOFF = 0.1

Handler = Callable[..., Any]


class ControlError(MirrorUnitError):
    """A request failed; the message is meant for the operator."""


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None if not buf else bytes(buf)
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> Any:
    head = _recv_exact(sock, FRAME_LENGTH.size)
    if head is None:
        return None
    if len(head) < FRAME_LENGTH.size:
        raise ControlError("truncated frame header")
    (length,) = FRAME_LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ControlError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exact(sock, length)
    if body is None or len(body) < length:
        raise ControlError("truncated frame")
    try:
        # Strict: a request is untrusted input (floats carry settings such as high_water).
        return cbor_strict.loads(body, floats=True)
    except cbor_strict.CborDecodeError as e:
        raise ControlError(f"undecodable CBOR: {e}") from e


def _write_frame(sock: socket.socket, obj: Any) -> None:
    body = cbor2.dumps(obj)
    sock.sendall(FRAME_LENGTH.pack(len(body)) + body)


class ControlServer:
    """Serves `handlers` (op name -> callable taking keyword arguments) on a unix socket."""

    def __init__(self, path: str | os.PathLike[str], handlers: dict[str, Handler]) -> None:
        self.path = os.fspath(path)
        self.handlers = handlers
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._active = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._ratelog = RateLimitedLog(log, 10.0)
        #: accept() or thread-start failures the loop backed off from.
        self.resource_errors = 0

    def start(self) -> None:
        if os.path.exists(self.path):
            # A socket left by a unit that died; refuse if something still answers.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)
            else:
                probe.close()
                raise ControlError(f"{self.path}: another unit is already serving here")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket gives control of the unit: owner only
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if self._stopping.is_set() or not accept_failure_is_transient(e):
                    return
                self._back_off(f"accept failed: {e}")
                continue
            if not self._active.acquire(blocking=False):
                self._ratelog.warning("cap", "control: closed a connection: %d already served",
                                      MAX_CONNECTIONS)
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-conn",
                                 daemon=True).start()
            except RuntimeError as e:  # "can't start new thread"
                conn.close()
                self._active.release()
                self._back_off(f"cannot start a thread: {e}")

    def _back_off(self, why: str) -> None:
        # Out of descriptors or threads is usually brief (a flood, a burst of tools):
        # pause so the loop does not spin, then keep accepting.
        self.resource_errors += 1
        self._ratelog.warning("resource", "control: %s; backing off %.2fs", why,
                              RESOURCE_BACKOFF)
        self._stopping.wait(RESOURCE_BACKOFF)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        finally:
            self._active.release()

    def _converse(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30.0)
            while True:
                try:
                    req = _read_frame(conn)
                except (ControlError, OSError) as e:
                    log.warning("control: bad request: %s", e)
                    try:
                        _write_frame(conn, {"ok": False, "error": f"bad request: {e}"})
                    except OSError:
                        pass
                    return
                if req is None:
                    return
                resp = self.dispatch(req)
                try:
                    body = cbor2.dumps(resp)
                except cbor2.CBOREncodeError as e:
                    log.exception("control: %s returned what CBOR cannot carry", req["op"])
                    body = cbor2.dumps({"ok": False,
                                        "error": f"{req['op']}: internal error: {e}"})
                conn.sendall(FRAME_LENGTH.pack(len(body)) + body)

    def dispatch(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "request must be a map with a string 'op'"}
        args = req.get("args") or {}
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            return {"ok": False, "error": "'args' must be a map with string keys"}
        handler = self.handlers.get(req["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown operation {req['op']!r}; known: "
                                          + ", ".join(sorted(self.handlers))}
        try:
            inspect.signature(handler).bind(**args)
        except TypeError as e:
            return {"ok": False, "error": f"{req['op']}: bad arguments: {e}"}
        try:
            return {"ok": True, "result": handler(**args)}
        except (MirrorUnitError, ValueError) as e:
            # ValueError: a handler's own conversion of the operator's input refused it
            # (CacheMode(mode), int(seq)).
            log.warning("control: %s refused: %s", req["op"], e)
            return {"ok": False, "error": f"{req['op']}: {e}"}
        except Exception as e:  # a bug in the handler: loud in the log, the unit keeps serving
            log.exception("control: %s failed", req["op"])
            return {"ok": False, "error": f"{req['op']}: internal error: "
                                          f"{type(e).__name__}: {e}"}

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def wait_ready(path: str | os.PathLike[str], proc: Any = None, timeout: float = 30.0,
               interval: float = 0.05) -> None:
    """Poll until the unit behind `path` answers `status`.

    `proc` (a Popen) is the process expected to serve it: if it exits first, this
    raises ControlError at once instead of waiting out the timeout.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ControlError(f"the unit exited with status {proc.returncode}")
        try:
            call(path, "status")
            return
        except ControlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def call(path: str | os.PathLike[str], op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request; return its result or raise ControlError with the unit's message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            raise ControlError(f"cannot reach the unit at {os.fspath(path)}: "
                               f"{e.strerror or e}") from e
        _write_frame(sock, {"op": op, "args": args})
        resp = _read_frame(sock)
    finally:
        sock.close()
    if not isinstance(resp, dict):
        raise ControlError("the unit closed the connection without answering")
    if not resp.get("ok"):
        raise ControlError(str(resp.get("error")))
    return resp.get("result")
