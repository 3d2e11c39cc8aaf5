"""Small files that must survive a power cut whole: written beside, synced, renamed;
and where a sparse file holds data (SEEK_DATA / SEEK_HOLE).

Keys, pinned peers, sealed backups and settings files are replaced atomically: after a
cut the old file or the new one is there, never a torn one, and a private file has its
mode from the first byte (no window where a key is world-readable).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


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
