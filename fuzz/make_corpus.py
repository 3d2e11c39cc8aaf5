"""Write the fixed seed corpus under fuzz/corpus/<target>/ from real encodings."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cbor2  # noqa: E402

from firmware.config.schema import Config  # noqa: E402
from firmware.config.store import encode_slot  # noqa: E402
from firmware.link.frames import Bye, ErrorFrame, Ping, Pong, encode_frame  # noqa: E402
from firmware.nbd import protocol as p  # noqa: E402


def seeds() -> dict[str, list[bytes]]:
    frames = [encode_frame(f) for f in (Ping(7), Pong(7), Bye(), ErrorFrame("busy", "try later"))]
    link = [b"\x00" + f for f in frames] + [b"\x01" + f[4:] for f in frames]
    link.append(b"\x01" + cbor2.dumps({"type": "pair_offer", "unit": "u1"}))
    link.append(b"\x01" + cbor2.dumps({"type": "recover_hello", "unit": "u1"}))
    flags = struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)
    go = p.build_info_request(p.NBD_OPT_GO, "mirrorunit", (p.NBD_INFO_BLOCK_SIZE,))
    nbd = [
        b"\xff" + flags + go,
        b"\xff" + flags + go + p.build_request(p.NBD_CMD_READ, 1, 0, 4096),
        b"\x07" + flags + go + p.build_request(p.NBD_CMD_WRITE, 2, 0, 512) + bytes(512),
        b"\xff" + flags + p.build_option(p.NBD_OPT_LIST) + p.build_option(p.NBD_OPT_ABORT),
    ]
    scsi = [
        bytes([0, 6, 0x00, 0, 0, 0, 0, 0]),                      # TEST UNIT READY
        bytes([0, 6, 0x12, 0, 0, 0, 36, 0]),                     # INQUIRY
        bytes([0, 10]) + bytes([0x25]) + bytes(9),               # READ CAPACITY(10)
        bytes([0, 10]) + struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0),
        bytes([0, 10]) + struct.pack(">BBIBHB", 0x2A, 0, 1, 0, 1, 0) + bytes(512),
        bytes([0, 6, 0x1A, 0, 0x3F, 0, 192, 0]),                 # MODE SENSE(6)
        bytes([0, 6, 0x03, 0, 0, 0, 18, 0]),                     # REQUEST SENSE
    ]
    real = cbor2.dumps(Config.defaults().to_document(include_secrets=True))
    config = [encode_slot(1, cbor2.dumps({})), encode_slot(2, real),
              b"\x05" + real]  # odd first byte: the target wraps it in a valid header
    # cbq_reader: (16-bit scaled offset, XOR byte) triples: superblock, ring start, ring end.
    cbq = [b"\x00\x00\x01", b"\x00\x40\x80", b"\x00\x60\x01\x00\x70\x02", b""]
    return {"cbq_reader": cbq, "link_frames": link, "nbd_protocol": nbd, "scsi_target": scsi,
            "config_slot": config}


def main() -> None:
    for target, items in seeds().items():
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            (out / f"seed-{i:02d}").write_bytes(item)


if __name__ == "__main__":
    main()
