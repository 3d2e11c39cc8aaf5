"""The file operations the remote store uses, behind one small interface.

The store never calls os.* on its data directly; it goes through a `FileOps`, so
crash tests can substitute a simulated file system that loses unsynced writes,
tears sectors and forgets directory entries that were never fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol

from firmware.fsutil import data_extents


class FileHandle(Protocol):
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes; past the end of the file reads as zeroes."""
        ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def truncate(self, size: int) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class LockHandle(Protocol):
    def release(self) -> None: ...


class FileOps(Protocol):
    def makedirs(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def open(self, path: str, create: bool = False) -> FileHandle: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace `dst` (durable only after fsync_dir)."""
        ...

    def unlink(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def lock(self, path: str) -> LockHandle | None:
        """Take an exclusive lock on `path` without waiting; None if someone holds it."""
        ...


class OsFile:
    def __init__(self, path: str, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self.path = path
        self.fd = os.open(path, flags, 0o600)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                return data + bytes(length - len(data))
            data += more
        return data

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Where [offset, offset + length) may hold data (fsutil.data_extents)."""
        return data_extents(self.fd, offset, length)

    def will_need(self, offset: int, length: int) -> None:
        """Start reading [offset, offset + length) into the page cache, not waiting."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _FlockHandle:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            # Closing the descriptor drops the flock; the file stays for the next owner.
            os.close(self._fd)
            self._fd = -1


class OsFileOps:
    """FileOps on the real file system."""

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def open(self, path: str, create: bool = False) -> FileHandle:
        return OsFile(path, create)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: str) -> LockHandle | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        # The holder's pid, for the message another process gets when refused.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return _FlockHandle(fd)


def lock_holder(path: str) -> str:
    """The pid written by the current holder of the lock at `path`, or '?'."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"
