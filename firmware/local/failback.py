"""The local side of a failback: this copy gives up its writes since the remote was
promoted off its generation, keeps them as a conflict image, and takes the remote's image
chunk by chunk (docs/failover.md).

`LocalFailback` is the `FailbackTarget` the link's `FailbackClientSession` drives. While
it runs the host sees the volume NOT READY (STANDBY); the chunks it takes go through the
volume's own durable write path (the queue, then the mirror), so a power cut half way
leaves a copy that replays to a consistent mix and a failback that can simply run again.

The conflict image is a sparse file the size of the volume, `conflict-<generation>.img`
in the state directory, beside `conflict-<generation>.json` which lists the block extents
it holds (only those hold this copy's data; the rest reads as zeros). It is written and
made durable before the first chunk is taken, and a failback that runs again after an
interrupted one keeps the first one's image.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.blockdev import BlockDevice, DeviceState
from firmware.cbq import CircularBufferQueue
from firmware.cbq.format import WRITE_KINDS
from firmware.errors import MirrorUnitError
from firmware.fsutil import OsFiles, write_conflict_image
from firmware.lineage import Lineage, Role
from firmware.lineage import store as lineage_store
from firmware.link.clients import bitmap_chunks
from firmware.link.frames import FailbackPlan, chunk_digest

log = logging.getLogger("mirrorunit.failback")

#: The new lineage of a failback, beside the lineage file until the remote confirms.
PENDING_NAME = "failback.pending"


class FailbackError(MirrorUnitError):
    """A failback this copy cannot do (the plan does not fit it)."""


class OwnVolume(BlockDevice, Protocol):
    """What a failback needs of the local volume: a BlockDevice that can be set NOT
    READY for the host while the failback reads and writes it on its own behalf."""

    def set_state(self, state: DeviceState) -> None: ...

    def flush_cache(self) -> float: ...

    def read_own(self, offset: int, length: int) -> bytes: ...

    def pwrite_own(self, offset: int, data: bytes) -> None: ...


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first block, block count) extents, sorted and merged."""
    out: list[list[int]] = []
    for lbn, n in sorted(extents):
        if out and lbn <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], lbn + n - out[-1][0])
        else:
            out.append([lbn, n])
    return [(a, b) for a, b in out]


@dataclass(frozen=True)
class ConflictImage:
    image: Path
    extents_file: Path
    #: (first block, blocks) of this copy's writes the image holds
    extents: tuple[tuple[int, int], ...]
    block_size: int

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.extents) * self.block_size

    def describe(self) -> dict[str, Any]:
        return {"image": str(self.image), "extents_file": str(self.extents_file),
                "extents": len(self.extents), "bytes": self.bytes}


class LocalFailback:
    """One failback of the local copy from remote `peer`."""

    def __init__(self, *, volume: OwnVolume, cbq: CircularBufferQueue, consumer: str,
                 lineage: Lineage, state_dir: Path) -> None:
        self.volume = volume
        self.cbq = cbq
        self.consumer = consumer
        self.lineage = lineage
        self.state_dir = state_dir
        self.plan: FailbackPlan | None = None
        self.conflict: ConflictImage | None = None
        self.new_lineage: Lineage | None = None
        #: chunks overwritten with the remote's data so far
        self.chunks_taken = 0
        self._previous_state: DeviceState | None = None

    # -- before the exchange

    def stop_host(self) -> None:
        """The host sees NOT READY from now on; every write it made is in the queue."""
        self._previous_state = self.volume.state
        self.volume.set_state(DeviceState.STANDBY)
        self.volume.flush_cache()

    def resume_host(self) -> None:
        """The failback did not happen: serve the host as before."""
        if self._previous_state is not None:
            self.volume.set_state(self._previous_state)

    # -- FailbackTarget

    def prepare(self, plan: FailbackPlan) -> set[int]:
        vol = self.volume
        if plan.chunk_count != -(-vol.size // plan.chunk_size):
            raise FailbackError(f"the remote's unit has {plan.chunk_count} chunks of "
                                f"{plan.chunk_size} bytes; this volume of {vol.size} bytes "
                                "does not")
        fork = self._fork_of(plan.lineage)
        self.plan = plan
        extents = self._own_extents(fork.fork_seq)
        bs = vol.block_size
        # The remote's image also lacks this copy's writes it received after the fork and
        # dropped (or undid) when promoted; those are kept too, whole chunks.
        per_chunk = plan.chunk_size // bs
        for c in bitmap_chunks(plan.dropped, plan.chunk_count):
            extents.append((c * per_chunk, min(per_chunk, vol.size // bs - c * per_chunk)))
        merged = merge_extents(extents)
        self.conflict = self._keep_conflict(fork.generation, merged)
        chunks: set[int] = set()
        for lbn, n in merged:
            first = lbn * bs // plan.chunk_size
            last = ((lbn + n) * bs - 1) // plan.chunk_size
            chunks.update(range(first, last + 1))
        log.warning("failback: this copy wrote %d bytes in %d extents since seq %d, the "
                    "remote's promotion; kept as the conflict image %s", self.conflict.bytes,
                    len(merged), fork.fork_seq, self.conflict.image)
        return chunks

    def chunk_length(self, chunk: int) -> int:
        assert self.plan is not None
        size = self.plan.chunk_size
        return min(size, self.volume.size - chunk * size)

    def chunk_digests(self, chunks: Sequence[int]) -> dict[int, bytes]:
        assert self.plan is not None
        size = self.plan.chunk_size
        return {c: chunk_digest(self.volume.read_own(c * size, self.chunk_length(c)))
                for c in chunks}

    def take_chunk(self, chunk: int, data: bytes) -> None:
        assert self.plan is not None
        self.volume.pwrite_own(chunk * self.plan.chunk_size, data)
        self.chunks_taken += 1

    def commit_point(self, plan: FailbackPlan) -> tuple[int, Lineage]:
        # Every chunk taken is in the queue; from its newest seq the remote follows this
        # copy, which is the primary of a generation forked off the remote's there.
        self.volume.flush_cache()
        seq = self.cbq.last_seq
        lineage = self.lineage.adopt(plan.lineage).fork(
            Role.PRIMARY, seq, time.time(), False, random.SystemRandom())
        # Recorded as pending until the remote confirms: if its answer is lost, the
        # next failback learns from it that it already followed, and completes this.
        lineage_store.save(self.pending_path, lineage)
        self.new_lineage = lineage
        return seq, lineage

    @property
    def pending_path(self) -> Path:
        return self.state_dir / PENDING_NAME

    def pending(self) -> Lineage | None:
        """The lineage of a failback whose commit the remote may have taken."""
        return lineage_store.load(self.pending_path)

    def committed(self, seq: int, lineage: Lineage) -> None:
        # The remote holds every seq up to `seq`: this copy's refused writes and the
        # chunks just taken (both now in the conflict image or the remote's image).
        os.replace(self.pending_path, self.state_dir / lineage_store.FILE_NAME)
        fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.cbq.ack(self.consumer, seq)
        self.volume.set_state(DeviceState.READY)
        log.warning("failback done: this copy is the primary again (generation %016x) "
                    "from seq %d; the remote follows it", lineage.generation, seq)

    # -- internals

    def _fork_of(self, remote: Lineage) -> Any:
        """The remote's promotion off this copy's generation."""
        mine = self.lineage.generation
        if remote.generation == mine and not self.lineage.writer:
            # This copy is the remote's standby since a switchover: it wrote nothing of
            # its own in that generation, which began at the switchover's seq.
            return remote.current
        for g in (*remote.history, remote.current):
            if g.parent == mine and g.role is Role.PRIMARY:
                return g
        raise FailbackError(f"the remote's line (generation {remote.generation:016x}) was "
                            f"not promoted off this copy's generation {mine:016x}")

    def _own_extents(self, fork_seq: int) -> list[tuple[int, int]]:
        extents = [(h.lbn, h.nblocks) for _, h, _ in self.cbq.replay(self.consumer)
                   if h.kind in WRITE_KINDS and h.seq > fork_seq]
        c = self.cbq.consumers[self.consumer]
        if c.needs_resync:
            # The queue overflowed: its dirty map stands in for the writes it dropped.
            per = self.cbq.geo.chunk_size // self.volume.block_size
            extents += [(ch * per, per) for ch in self.cbq.dirty_chunks()]
        total = self.volume.size // self.volume.block_size
        return [(lbn, min(n, total - lbn)) for lbn, n in extents if lbn < total]

    def _keep_conflict(self, generation: int, extents: list[tuple[int, int]]
                       ) -> ConflictImage:
        name = f"conflict-{generation:016x}"
        image = self.state_dir / f"{name}.img"
        listing = self.state_dir / f"{name}.json"
        bs = self.volume.block_size
        if listing.exists():
            # An interrupted failback kept them already; its chunks taken since are the
            # remote's data, not this copy's.
            kept = json.loads(listing.read_text())
            return ConflictImage(image, listing, tuple((a, b) for a, b in kept["extents"]),
                                 bs)
        write_conflict_image(
            OsFiles(), str(image), self.volume.size,
            [(lbn * bs, n * bs) for lbn, n in extents], self.volume.read_own,
            str(listing), json.dumps({
                "generation": f"{generation:016x}", "block_size": bs,
                "volume_size": self.volume.size, "extents": [list(e) for e in extents],
            }, indent=1).encode())
        return ConflictImage(image, listing, tuple(extents), bs)
