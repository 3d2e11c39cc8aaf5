"""Link frames, both directions: the incremental stream decoder and the body decoder
(certificate-less pairing and recovery bodies included).  Only LinkProtocolError may escape."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.link.errors import LinkProtocolError
    from firmware.link.frames import FrameDecoder, decode_body, encode_frame


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode & 1:
        try:
            frame = decode_body(rest)
        except LinkProtocolError:
            return
        # A frame we accepted must encode again (the sending direction).
        encode_frame(frame)
        return
    dec = FrameDecoder()
    step = (mode >> 1) or 1
    try:
        for i in range(0, len(rest), step):
            for frame in dec.receive_data(rest[i:i + step]):
                encode_frame(frame)
    except LinkProtocolError:
        pass


if __name__ == "__main__":
    main("link_frames", one_input)
