"""NBD handshake and requests through the sans-IO server connection.  Only NbdError may escape."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.nbd.protocol import ExportInfo, NbdError, NbdServerConnection


def one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] or 1
    conn = NbdServerConnection(ExportInfo(name="mirrorunit", size=1 << 20))
    conn.data_to_send()
    rest = data[1:]
    try:
        for i in range(0, len(rest), step):
            conn.receive_data(rest[i:i + step])
            conn.data_to_send()
        conn.receive_data(b"")
    except NbdError:
        pass


if __name__ == "__main__":
    main("nbd_protocol", one_input)
