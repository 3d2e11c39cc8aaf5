"""Hole-aware chunk digests: a chunk inside a hole of the file is the zero chunk and
is never read; a chunk with any data in it (even a few bytes next to holes, or a
write still in the local volume's RAM cache) is read and compared like before."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.cbq import CircularBufferQueue
from firmware.cbq.superblock import create
from firmware.fsutil import data_extents
from firmware.link.digests import sparse_chunk_digests, zero_chunk_digest
from firmware.link.frames import chunk_digest
from firmware.remote.store import RemoteStore
from firmware.storage import FileStorage
from firmware.volume.volume import CacheMode, Volume

CHUNK = 64 * 1024
SIZE = 64 * CHUNK


def _sparse(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def _plain(path: Path) -> dict[int, bytes]:
    image = path.read_bytes()
    return {c: chunk_digest(image[c * CHUNK:(c + 1) * CHUNK]) for c in range(SIZE // CHUNK)}


class CountingReads:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return os.pread(self.fd, length, offset)

    @property
    def chunks_read(self) -> list[int]:
        return sorted(c for o, n in self.reads for c in range(o // CHUNK, (o + n) // CHUNK))

    def extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        return data_extents(self.fd, offset, length)


@pytest.fixture
def writes() -> dict[int, bytes]:
    # 4 KiB in the middle of chunk 5, one byte at the very end of chunk 9 and at the
    # very start of chunk 10 (data right next to a hole, on either side of a chunk
    # boundary), and all of chunk 40.
    return {5 * CHUNK + 8192: b"\x11" * 4096, 10 * CHUNK - 1: b"\x22\x33",
            40 * CHUNK: os.urandom(CHUNK)}


def test_data_extents_name_the_written_blocks_and_nothing_far_from_them(
        tmp_path: Path, writes: dict[int, bytes]) -> None:
    path = tmp_path / "sparse.img"
    _sparse(path, writes)
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = data_extents(fd, 0, SIZE)
        assert ext is not None
        # every written byte lies in an extent (the file system may round to its block)
        for off, data in writes.items():
            for b in (off, off + len(data) - 1):
                assert any(o <= b < o + n for o, n in ext), (b, ext)
        # a whole hole chunk is no extent's
        for c in (0, 20, 63):
            assert not any(o < (c + 1) * CHUNK and c * CHUNK < o + n for o, n in ext)
        assert data_extents(fd, 20 * CHUNK, CHUNK) == []
    finally:
        os.close(fd)


def test_a_device_that_cannot_tell_reads_everything() -> None:
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        assert data_extents(fd, 0, CHUNK) is None
    finally:
        os.close(fd)


def test_chunks_next_to_holes_compare_right_and_holes_are_not_read(
        tmp_path: Path, writes: dict[int, bytes]) -> None:
    path = tmp_path / "sparse.img"
    _sparse(path, writes)
    reads = CountingReads(path)
    hinted: list[tuple[int, int]] = []
    got = sparse_chunk_digests(range(SIZE // CHUNK), CHUNK, SIZE, reads.read, reads.extents,
                               lambda o, n: hinted.append((o, n)))
    assert got == _plain(path)
    assert reads.chunks_read == [5, 9, 10, 40]
    # read-ahead is asked for the data only, never for the holes around it
    assert hinted and sorted({c for o, n in hinted
                              for c in range(o // CHUNK, (o + n - 1) // CHUNK + 1)}) == \
        [5, 9, 10, 40]
    assert got[0] == zero_chunk_digest(CHUNK) == chunk_digest(bytes(CHUNK))
    # a chunk whose data differs from the other side's is seen as different
    _sparse(tmp_path / "other.img", {**writes, 10 * CHUNK - 1: b"\x22\x34"})
    other = CountingReads(tmp_path / "other.img")
    theirs = sparse_chunk_digests(range(SIZE // CHUNK), CHUNK, SIZE, other.read,
                                  other.extents)
    assert [c for c in got if got[c] != theirs[c]] == [10]
    # without extents (a block device) every chunk is read, with the same digests
    everything = CountingReads(path)
    assert sparse_chunk_digests(range(SIZE // CHUNK), CHUNK, SIZE, everything.read,
                                None) == got
    assert everything.chunks_read == list(range(SIZE // CHUNK))


def test_the_remote_store_digests_its_mirror_without_reading_holes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RemoteStore(tmp_path / "store")
    unit = store.open_unit("u", SIZE, 512)
    data = os.urandom(CHUNK)
    unit.write_chunk(7, data)
    unit.resync_complete(0)
    from firmware.remote.fileio import OsFile
    read: list[int] = []
    real = OsFile.pread

    def counting(self: OsFile, offset: int, length: int) -> bytes:
        read.append(offset)
        return real(self, offset, length)

    monkeypatch.setattr(OsFile, "pread", counting)
    got = unit.chunk_digests(range(SIZE // CHUNK))
    store.close()
    assert got[7] == chunk_digest(data)
    assert all(got[c] == zero_chunk_digest(CHUNK) for c in got if c != 7)
    assert read == [7 * CHUNK]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    storage = FileStorage(tmp_path / "cbq.img", size=4 << 20, create=True)
    create(storage, volume_blocks=SIZE // 512, block_size=512, consumers=("peer",))
    q = CircularBufferQueue(storage)
    vol = Volume(FileStorage(tmp_path / "mirror.img", size=SIZE, create=True), q,
                 cache_mode=CacheMode.WRITE_BACK, cache_limit=8 << 20)
    yield vol
    vol.close()
    q.close()


def test_a_write_still_in_the_ram_cache_is_data_not_a_hole(volume: Volume) -> None:
    volume.pwrite(3 * CHUNK + 512, b"\x44" * 512)
    # not on the mirror file yet: its chunk is a hole there
    assert volume.mirror.pread(3 * CHUNK, CHUNK) == bytes(CHUNK)
    got = sparse_chunk_digests(range(SIZE // CHUNK), CHUNK, SIZE, volume.pread,
                               volume.data_extents)
    assert got[3] == chunk_digest(volume.pread(3 * CHUNK, CHUNK)) != zero_chunk_digest(CHUNK)
    assert got[2] == got[4] == zero_chunk_digest(CHUNK)
    volume.flush()
    assert sparse_chunk_digests([3], CHUNK, SIZE, volume.pread, volume.data_extents) == {
        3: got[3]}
