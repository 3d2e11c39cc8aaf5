"""The CBQ's checkpoint on disk: its geometry, formatting a new queue, reading the newest
valid superblock slot.

Generations alternate between the two superblock slots (see `format`), so a torn
checkpoint leaves the one before it; `read_superblock` picks the newest that checks out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cbor2

from firmware import cbor_strict
from firmware.record import IntegrityError

from .errors import CbqFormatError
from .format import (
    DIRTY_MAP_OFFSET,
    FORMAT_VERSION,
    RECORD_ALIGN,
    SUPERBLOCK_SLOT,
    Mode,
    align_up,
    decode_superblock,
    encode_superblock,
    superblock_version,
)

#: Name of the internal consumer that tracks what the local mirror has made durable.
MIRROR_CONSUMER = "@mirror"


@dataclass(frozen=True)
class Geometry:
    salt: int
    ring_start: int
    ring_size: int
    align: int
    block_size: int
    volume_blocks: int
    chunk_size: int
    dirty_map_bytes: int

    @property
    def chunks(self) -> int:
        return -(-self.volume_blocks * self.block_size // self.chunk_size)

    def to_cbor(self) -> dict[str, int]:
        return dict(self.__dict__)


def slot_offset(generation: int) -> int:
    """Generations alternate between the two slots, so the newest never overwrites its
    predecessor."""
    return (generation % 2) * SUPERBLOCK_SLOT


def create(storage: Any, *, ring_size: int | None = None, block_size: int = 512,
           volume_blocks: int, chunk_size: int = 65536, align: int = 4096,
           consumers: tuple[str, ...] = (), high_water: float = 0.8,
           low_water: float | None = None, salt: int | None = None) -> None:
    """Format `storage` as an empty CBQ."""
    import secrets

    if chunk_size % block_size or align % RECORD_ALIGN or align % 512:
        raise CbqFormatError("chunk size must be a multiple of block size, align of 512")
    chunks = -(-volume_blocks * block_size // chunk_size)
    dm_bytes = align_up(-(-chunks // 8), 4096)
    ring_start = align_up(DIRTY_MAP_OFFSET + dm_bytes, align)
    avail = storage.size - ring_start
    if ring_size is None:
        ring_size = avail // align * align
    if ring_size < 16 * align or ring_size > avail or ring_size % align:
        raise CbqFormatError(
            f"ring of {ring_size} bytes does not fit: storage has {storage.size} bytes, "
            f"ring starts at {ring_start} and must hold at least 16 x {align}")
    if not 0.0 < high_water <= 1.0:
        raise CbqFormatError(f"high-water mark {high_water} must be in (0, 1]")
    geo = Geometry(
        salt=salt if salt is not None else secrets.randbits(32),
        ring_start=ring_start, ring_size=ring_size, align=align, block_size=block_size,
        volume_blocks=volume_blocks, chunk_size=chunk_size, dirty_map_bytes=dm_bytes,
    )
    state = {
        "geometry": geo.to_cbor(),
        "head": {"lin": 0, "seq": 1, "prev_crc": 0, "cum": 0},
        "tail": {"lin": 0, "seq": 1},
        "mode": Mode.NORMAL.value,
        "high_water": high_water,
        "low_water": low_water if low_water is not None else high_water / 2,
        "consumers": {
            name: {"seq": 0, "lin": 0, "cum": 0, "resync": False}
            for name in (MIRROR_CONSUMER, *consumers)
        },
        "compact_from": None,
        "discards": [],
        "dirty_active": False,
        "paused": {"enqueue": False, "dequeue": False},
        "time_ns": time.time_ns(),
    }
    storage.pwrite(DIRTY_MAP_OFFSET, bytes(dm_bytes))
    storage.pwrite(slot_offset(0), bytes(SUPERBLOCK_SLOT))
    storage.pwrite(slot_offset(1), encode_superblock(1, cbor2.dumps(state)))
    storage.sync()


def older_format_slots(storage: Any) -> bool:
    """True when a superblock slot still holds an older format version than this code
    writes: firmware of that version would open it (and a stale checkpoint) as its own."""
    return any(0 < superblock_version(storage.pread(slot * SUPERBLOCK_SLOT, 32)) < FORMAT_VERSION
               for slot in (0, 1))


def read_superblock(storage: Any) -> tuple[int, dict[str, Any], list[str]]:
    """Return (generation, checkpoint state, problems seen) of the newest valid slot."""
    best: tuple[int, dict[str, Any]] | None = None
    problems: list[str] = []
    for slot in (0, 1):
        raw = storage.pread(slot * SUPERBLOCK_SLOT, SUPERBLOCK_SLOT)
        try:
            gen, body = decode_superblock(raw, slot * SUPERBLOCK_SLOT)
        except IntegrityError as e:
            if any(raw):
                problems.append(f"superblock slot {slot}: {e}")
            continue
        try:
            state = cbor_strict.loads(body, floats=True)
            if not isinstance(state, dict) or "geometry" not in state:
                raise ValueError("not a checkpoint map")
        except Exception as e:  # cbor2 raises several types on garbage
            problems.append(f"superblock slot {slot}: undecodable body ({e})")
            continue
        if best is None or gen > best[0]:
            best = (gen, state)
    if best is None:
        raise CbqFormatError("no valid superblock: " + ("; ".join(problems) or "blank storage"))
    return best[0], best[1], problems
