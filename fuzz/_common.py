"""Shared runner for the atheris targets: instrument the firmware, then hand off to libFuzzer."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Per-input limits: an input taking over 1 s is a hang, 2 GiB RSS is unbounded memory.
DEFAULT_FLAGS = ["-timeout=1", "-rss_limit_mb=2048", "-max_len=4096"]


def main(name: str, one_input: Callable[[bytes], None]) -> None:
    argv = [sys.argv[0], *DEFAULT_FLAGS, *sys.argv[1:]]
    if not any(not a.startswith("-") for a in sys.argv[1:]):
        # No corpus directory given: libFuzzer writes new inputs to the first directory,
        # so a scratch one goes first and the committed seeds are only read.
        argv += [tempfile.mkdtemp(prefix=f"fuzz-{name}-"), str(CORPUS / name)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


class MemorySlots:
    """A config partition in memory (the store's SlotDevice), so a target can save and
    load configs through the real ConfigStore without touching a disk."""

    def __init__(self, image: bytes | bytearray = b"") -> None:
        self.image = bytearray(image)

    def opener(self, path: str, writable: bool) -> MemorySlots:
        if not self.image and not writable:
            raise FileNotFoundError(path)  # a partition never written: the store's BLANK
        return self

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset:offset + length]).ljust(length, b"\x00")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if len(self.image) < end:
            self.image.extend(bytes(end - len(self.image)))
        self.image[offset:end] = data

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
