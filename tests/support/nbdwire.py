"""Raw NBD wire helpers for tests that talk to a server byte by byte."""

from __future__ import annotations

import socket
import struct

from firmware.nbd import protocol as p
from firmware.nbd.protocol import build_info_request

NAME = "mirrorunit"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"server closed after {len(buf)}/{n} bytes"
        buf += chunk
    return buf


def go(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    sock.sendall(build_info_request(p.NBD_OPT_GO, NAME, (p.NBD_INFO_BLOCK_SIZE,)))
    while True:
        _, _, rtype, length = p.OPTION_REPLY_HEADER.unpack(
            recv_exact(sock, p.OPTION_REPLY_HEADER.size)
        )
        recv_exact(sock, length)
        if rtype == p.NBD_REP_ACK:
            return
        assert rtype == p.NBD_REP_INFO
