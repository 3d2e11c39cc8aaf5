"""Records, images and clocks for the remote store's tests."""

from __future__ import annotations

import random
from pathlib import Path

from firmware.link.frames import WriteRecord
from firmware.remote import UnitStore

BS = 512
S = 1_000_000_000  # ns per second
T0 = 1_700_000_000 * S


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_records(rng: random.Random, n: int, blocks: int, first_seq: int = 1,
                 t0: int = T0, step: int = S, max_blocks: int = 4) -> list[WriteRecord]:
    out = []
    for i in range(n):
        nb = rng.randint(1, max_blocks)
        lbn = rng.randrange(0, blocks - nb + 1)
        data = rng.randbytes(nb * BS)
        out.append(WriteRecord(seq=first_seq + i, lbn=lbn, data=data, ts=t0 + i * step))
    return out


def model(records: list[WriteRecord], size: int, base: bytes | None = None,
          skip: frozenset[int] = frozenset()) -> bytes:
    """The image after applying `records` in order (except seqs in `skip`)."""
    img = bytearray(size if base is None else base)
    for r in records:
        if r.seq not in skip:
            img[r.lbn * BS:r.lbn * BS + len(r.data)] = r.data
    return bytes(img)




def open_unit(path: Path | str, size: int = 64 * 1024, **kw: object) -> UnitStore:
    return UnitStore(str(path), "unit-a", size, BS, **kw)  # type: ignore[arg-type]
