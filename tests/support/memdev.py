"""An in-memory BlockDevice, like nbdkit's memory plugin: a sparse array of blocks
(unwritten blocks read as zeros, so a device of terabytes costs nothing), with an
operation log and read/write fault injection for front-end tests."""

from __future__ import annotations

from firmware.blockdev import DeviceState, MediumError, NotReady, OutOfRange, WriteProtected

BS = 512


class MemoryDevice:
    """Sparse in-memory BlockDevice with fault injection and an operation log."""

    def __init__(
        self,
        size: int = 1 << 20,
        block_size: int = BS,
        *,
        read_only: bool = False,
        write_cache: bool = True,
        trim: bool = True,
    ) -> None:
        self.size = size
        self.block_size = block_size
        self.state = DeviceState.READY
        self.read_only = read_only
        self.write_cache_enabled = write_cache
        self.supports_trim = trim
        self.blocks: dict[int, bytes] = {}
        self.writes: list[tuple[int, int, bool]] = []
        self.trims: list[tuple[int, int]] = []
        self.flushes = 0
        self.fail_read_from: int | None = None
        self.fail_write_from: int | None = None
        #: The bytes as a sliceable buffer, past the checks, faults and logs: lets a
        #: test seed the device or look at it without going through the interface.
        self.data = Contents(self)

    def _check(self, offset: int, length: int) -> None:
        if self.state is not DeviceState.READY:
            raise NotReady(self.state.value)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"{offset}+{length}")
        assert offset % self.block_size == 0 and length % self.block_size == 0

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self.fail_read_from is not None and offset + length > self.fail_read_from:
            raise MediumError("injected read error", 5)
        bs = self.block_size
        zero = bytes(bs)
        first = offset // bs
        return b"".join(self.blocks.get(first + i, zero) for i in range(length // bs))

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check(offset, len(data))
        if self.read_only:
            raise WriteProtected("read-only")
        if self.fail_write_from is not None and offset + len(data) > self.fail_write_from:
            raise MediumError("injected write error", 5)
        self.writes.append((offset, len(data), fua))
        bs = self.block_size
        data = bytes(data)
        for i in range(0, len(data), bs):
            self.blocks[(offset + i) // bs] = data[i : i + bs]

    def flush(self) -> None:
        if self.state is not DeviceState.READY:
            raise NotReady(self.state.value)
        self.flushes += 1

    def trim(self, offset: int, length: int) -> None:
        # A front end must not trim a device that does not offer it.
        assert self.supports_trim, "trim on a device without trim"
        self._check(offset, length)
        self.trims.append((offset, length))
        for lba in range(offset // self.block_size, (offset + length) // self.block_size):
            self.blocks.pop(lba, None)


class Contents:
    """`device.data[a:b]` reads and `device.data[a:b] = bytes` writes, at any byte
    offsets, straight into the sparse blocks."""

    def __init__(self, device: MemoryDevice) -> None:
        self._dev = device

    def _span(self, index: slice) -> tuple[int, int]:
        start, stop, step = index.indices(self._dev.size)
        if step != 1:
            raise ValueError("device contents are sliced with step 1 only")
        return start, max(start, stop)

    def __getitem__(self, index: slice) -> bytes:
        start, stop = self._span(index)
        bs = self._dev.block_size
        first, end = start // bs, -(-stop // bs)
        zero = bytes(bs)
        whole = b"".join(self._dev.blocks.get(lba, zero) for lba in range(first, end))
        return whole[start - first * bs : stop - first * bs]

    def __setitem__(self, index: slice, value: bytes | bytearray | memoryview) -> None:
        start, stop = self._span(index)
        if len(value) != stop - start:
            raise ValueError(f"{len(value)} bytes for a slice of {stop - start}")
        bs = self._dev.block_size
        first = start // bs
        merged = bytearray(self[first * bs : -(-stop // bs) * bs])
        merged[start - first * bs : stop - first * bs] = value
        for i in range(0, len(merged), bs):
            self._dev.blocks[first + i // bs] = bytes(merged[i : i + bs])
