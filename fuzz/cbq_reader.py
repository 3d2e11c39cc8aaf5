"""The CBQ on corrupt files: a real queue with a few records, then the input flips bytes
at chosen offsets (superblocks, checkpoints, ring records) and the queue is opened, read
and verified.  Only CbqError and IntegrityError (both MirrorUnitError) may escape."""

from __future__ import annotations

import logging

import atheris

with atheris.instrument_imports():
    from _common import main

    from firmware.cbq import CircularBufferQueue
    from firmware.cbq.errors import CbqError
    from firmware.cbq.superblock import create
    from firmware.record import IntegrityError
    from firmware.storage import CrashSimStorage

BS = 512
PEER = "a"


def _base_image() -> bytes:
    storage = CrashSimStorage(2 * 4096 + 4096 + 32 * 1024)
    create(storage, volume_blocks=64, block_size=BS, chunk_size=1024, align=512,
           consumers=(PEER,), high_water=0.7, low_water=0.3)
    q = CircularBufferQueue(storage, current_reader=lambda lbn, n: bytes(n * BS))
    for i in range(6):
        q.append_write(i * 3, bytes([i + 1]) * (BS * (1 + i % 2)))
    q.sync()
    q.close()
    return bytes(storage.durable)


BASE = _base_image()
# Every corrupt open logs what it found; a million of those lines say nothing new.
logging.disable(logging.CRITICAL)


def one_input(data: bytes) -> None:
    image = bytearray(BASE)
    # Each 3 bytes: a 16-bit offset scaled over the image and a byte to XOR in.
    for i in range(0, len(data) - 2, 3):
        off = int.from_bytes(data[i:i + 2], "little") * len(image) // 65536
        image[off] ^= data[i + 2] or 0xFF
    storage = CrashSimStorage.from_image(bytes(image))
    try:
        q = CircularBufferQueue(storage, current_reader=lambda lbn, n: bytes(n * BS),
                                read_only=True)
        try:
            q.read(PEER, max_records=64)
            q.verify()
        finally:
            q.close()
    except (CbqError, IntegrityError):
        pass


if __name__ == "__main__":
    main("cbq_reader", one_input)
