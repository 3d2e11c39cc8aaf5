"""Start `mirrorunit` processes for tests and talk to them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import pytest

from firmware.control import ControlError, call, wait_ready
from tests.support import REPO as ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_until_closed(sock: Any, timeout: float = 10.0) -> bytes:
    """Everything a peer sends on `sock` until it closes (or errors, or `timeout`)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except OSError:  # ssl.SSLError included
            break
        if not data:
            break
        out += data
    return out


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: libnbd-bin / qemu-utils)")
    return path




class UnitProc:
    """A `mirrorunit` subprocess with a control socket; subclasses set `args`,
    `control`, `log` and `role`."""

    role = "unit"
    args: list[str]
    control: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Self:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(self.control, self.proc, timeout)
        except ControlError as e:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.role} exited with {self.proc.returncode}:\n"
                                     + self.log.read_text()) from e
            raise
        return self

    def call(self, op: str, **args: Any) -> Any:
        return call(self.control, op, **args)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        if sig == signal.SIGKILL and self.control.exists():
            os.unlink(self.control)
        return rc

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class LocalProc(UnitProc):
    """A `mirrorunit local` subprocess on files under `workdir`."""

    def __init__(self, workdir: Path, *, size: str = "64M", buffer_size: str = "16M",
                 extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.disk = workdir / "disk.img"
        self.buffer = workdir / "cbq.img"
        self.control = workdir / "local.sock"
        self.port = free_port()
        self.log = workdir / "local.log"
        self.args = [sys.executable, "-m", "firmware", "local", "--disk", str(self.disk),
                     "--size", size, "--buffer", str(self.buffer), "--buffer-size",
                     buffer_size, "--nbd", f"127.0.0.1:{self.port}", "--control",
                     str(self.control), *extra]
        self.proc = None

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/mirrorunit"
