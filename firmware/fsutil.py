"""Small files that must survive a power cut whole: written beside, synced, renamed;
where a sparse file holds data (SEEK_DATA / SEEK_HOLE); and the conflict image, a
sparse copy of the writes a unit gives up, with the listing of what it holds.

Keys, pinned peers, sealed backups and settings files are replaced atomically: after a
cut the old file or the new one is there, never a torn one, and a private file has its
mode from the first byte (no window where a key is world-readable).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: write a temporary file beside it with `mode`, fsync it,
    rename it over `path`, fsync the directory."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.unlink()  # left by a cut during an earlier write
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)  # the umask may have narrowed what O_CREAT set
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    fsync_dir(p.parent)


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]] | None:
    """The (offset, length) extents of [offset, offset + length) of the regular file
    open as `fd` that may hold data, in order; the rest is holes, which read as
    zeroes.  None when the file cannot tell (a block device, a file system without
    SEEK_DATA): the caller reads everything.

    Only pread/pwrite may share `fd`: lseek moves its file position."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    try:
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data at or after pos (or past the end)
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            out.append((start, stop - start))
            pos = stop
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
            return None
        raise
    return out


class WritableFile(Protocol):
    def pwrite(self, offset: int, data: bytes) -> None: ...

    def truncate(self, size: int) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class Files(Protocol):
    """The file operations write_conflict_image needs: the local passes OsFiles, the
    remote store its own file operations (which crash tests replace)."""

    def open(self, path: str, create: bool = False) -> WritableFile: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace `dst` (durable after fsync_dir)."""
        ...

    def fsync_dir(self, path: str) -> None: ...


class _OsFile:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pwrite(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class OsFiles:
    """Files on the real file system, with plain os calls."""

    def open(self, path: str, create: bool = False) -> WritableFile:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return _OsFile(os.open(path, flags, 0o600))

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fsync_dir(path)


def write_conflict_image(files: Files, image: str, size: int,
                         extents: Iterable[tuple[int, int]],
                         read: Callable[[int, int], bytes],
                         listing: str, listing_data: bytes) -> None:
    """Keep writes a copy is about to lose: `image`, a sparse file of `size` bytes,
    holds `read(offset, length)` at each (offset, length) of `extents` and zeroes
    everywhere else; then `listing` (what the image holds, `listing_data`) replaces
    any older one atomically beside it.  The image is durable before the listing
    names it, and both before this returns: a listing found after a power cut
    speaks of a whole image."""
    h = files.open(image, create=True)
    try:
        h.truncate(0)  # nothing of an older image may remain outside `extents`
        h.truncate(size)
        for offset, length in extents:
            h.pwrite(offset, read(offset, length))
        h.sync()
    finally:
        h.close()
    tmp = listing + ".tmp"
    h = files.open(tmp, create=True)
    try:
        h.truncate(0)
        h.pwrite(0, listing_data)
        h.sync()
    finally:
        h.close()
    files.rename(tmp, listing)
    files.fsync_dir(os.path.dirname(listing) or ".")
