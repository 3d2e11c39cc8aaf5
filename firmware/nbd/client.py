"""A small blocking NBD client: probes, tests and export verification.

Deliberately minimal (simple replies, one request at a time) so it can drive a
server into corners the production clients avoid: byte-granular requests
without block-size negotiation, NBD_OPT_EXPORT_NAME, raw frames.
"""

from __future__ import annotations

import socket
import struct

from firmware.nbd.protocol import (
    EXPORT_NAME_REPLY,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPTION_REPLY_MAGIC,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    OPTION_REPLY_HEADER,
    SERVER_GREETING,
    SIMPLE_REPLY,
    NbdError,
    build_info_request,
    build_option,
    build_request,
)


class NbdClientError(NbdError):
    """The server refused a request (``errno`` is the NBD error value)."""

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


class NbdClient:
    def __init__(
        self,
        host: str,
        port: int,
        export_name: str = "",
        use_go: bool = True,
        request_block_size: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._next_handle = 1
        self.size = 0
        self.transmission_flags = 0
        self.block_sizes: tuple[int, int, int] | None = None
        try:
            self._handshake(export_name, use_go, request_block_size)
        except BaseException:
            self.sock.close()
            raise

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise NbdClientError(f"server closed the connection ({got}/{n} bytes)")
            got += k
        return bytes(buf)

    def _handshake(self, name: str, use_go: bool, request_block_size: bool) -> None:
        magic, opt_magic, flags = SERVER_GREETING.unpack(self._recv_exact(SERVER_GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdClientError("not a fixed-newstyle NBD server")
        no_zeroes = bool(flags & NBD_FLAG_NO_ZEROES)
        client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
        self.sock.sendall(struct.pack(">I", client_flags))
        if not use_go:
            self.sock.sendall(build_option(NBD_OPT_EXPORT_NAME, name.encode()))
            self.size, self.transmission_flags = EXPORT_NAME_REPLY.unpack(
                self._recv_exact(EXPORT_NAME_REPLY.size)
            )
            if not no_zeroes:
                self._recv_exact(124)
            return
        infos = (NBD_INFO_BLOCK_SIZE,) if request_block_size else ()
        self.sock.sendall(build_info_request(NBD_OPT_GO, name, infos))
        while True:
            magic, _, rtype, length = OPTION_REPLY_HEADER.unpack(
                self._recv_exact(OPTION_REPLY_HEADER.size)
            )
            payload = self._recv_exact(length)
            if magic != NBD_OPTION_REPLY_MAGIC:
                raise NbdClientError("bad option reply magic")
            if rtype == NBD_REP_ACK:
                return
            if rtype & NBD_REP_FLAG_ERROR:
                raise NbdClientError(f"NBD_OPT_GO refused: {rtype:#x} {payload!r}", rtype)
            if rtype == NBD_REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == NBD_INFO_EXPORT and len(payload) == INFO_EXPORT.size:
                    _, self.size, self.transmission_flags = INFO_EXPORT.unpack(payload)
                elif info == NBD_INFO_BLOCK_SIZE and len(payload) == INFO_BLOCK_SIZE.size:
                    _, lo, pref, hi = INFO_BLOCK_SIZE.unpack(payload)
                    self.block_sizes = (lo, pref, hi)

    def _request(
        self, command: int, offset: int, length: int, flags: int, data: bytes = b""
    ) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self.sock.sendall(build_request(command, handle, offset, length, flags) + data)
        return handle

    def _reply(self, handle: int, what: str) -> None:
        magic, error, got = SIMPLE_REPLY.unpack(self._recv_exact(SIMPLE_REPLY.size))
        if magic != NBD_SIMPLE_REPLY_MAGIC or got != handle:
            raise NbdClientError(f"{what}: bad reply (magic {magic:#x}, handle {got})")
        if error:
            raise NbdClientError(f"{what} failed with NBD error {error}", error)

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        handle = self._request(NBD_CMD_READ, offset, length, flags)
        self._reply(handle, f"READ {offset}+{length}")
        return self._recv_exact(length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        flags = NBD_CMD_FLAG_FUA if fua else 0
        handle = self._request(NBD_CMD_WRITE, offset, len(data), flags, data)
        self._reply(handle, f"WRITE {offset}+{len(data)}")

    def flush(self) -> None:
        self._reply(self._request(NBD_CMD_FLUSH, 0, 0, 0), "FLUSH")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        handle = self._request(NBD_CMD_TRIM, offset, length, NBD_CMD_FLAG_FUA if fua else 0)
        self._reply(handle, f"TRIM {offset}+{length}")

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, no_hole: bool = False
    ) -> None:
        flags = (NBD_CMD_FLAG_FUA if fua else 0) | (NBD_CMD_FLAG_NO_HOLE if no_hole else 0)
        handle = self._request(NBD_CMD_WRITE_ZEROES, offset, length, flags)
        self._reply(handle, f"WRITE_ZEROES {offset}+{length}")

    def raw(self, command: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> int:
        """Send any request; returns the error value of its (payload-less) reply."""
        handle = self._request(command, offset, length, flags, data)
        magic, error, got = SIMPLE_REPLY.unpack(self._recv_exact(SIMPLE_REPLY.size))
        if magic != NBD_SIMPLE_REPLY_MAGIC or got != handle:
            raise NbdClientError(f"bad reply (magic {magic:#x}, handle {got})")
        if error == 0 and command == NBD_CMD_READ:
            self._recv_exact(length)
        return int(error)

    def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC), then close the socket."""
        try:
            self.sock.sendall(build_request(NBD_CMD_DISC, 0))
        except OSError:
            pass  # the server may already have gone
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
