"""Boot the host's kernel in QEMU (TCG) and run shell scripts in the guest.

The guest sees the host's root read-only over 9p (with a tmpfs overlay), so a
script can use the repository, its venv, sg3_utils and e2fsprogs at the same
paths as on the host.  A second 9p share, the exchange directory, is writable
and carries scripts in and their output out; the control line on the second
serial port only says which script to run and when it finished.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO as REPO_ROOT

from .initramfs import KernelImage, KernelNotFound, build_initramfs, find_kernel

DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "vm"


class VMError(Exception):
    """The guest failed to boot or stopped answering."""


class VMTimeout(VMError):
    pass


@dataclass(frozen=True)
class ScriptResult:
    status: int
    output: str
    seconds: float

    def check(self) -> ScriptResult:
        if self.status != 0:
            raise AssertionError(f"guest script exited {self.status}:\n{self.output}")
        return self


@dataclass
class VMConfig:
    memory_mib: int = 1024
    cpus: int = 2
    boot_timeout: float = 120.0
    build_dir: Path = DEFAULT_BUILD_DIR
    qemu: str = "qemu-system-x86_64"
    extra_cmdline: tuple[str, ...] = ()
    kernel: KernelImage | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: more QEMU arguments (a disk, a device to unplug later)
    extra_args: tuple[str, ...] = ()
    #: open a QMP socket (GuestVM.qmp_path) for device_add / device_del at run time
    qmp: bool = False


def missing_requirements(config: VMConfig | None = None) -> str | None:
    """Why a VM cannot be booted here, or None when it can."""
    config = config or VMConfig()
    if shutil.which(config.qemu) is None:
        return f"{config.qemu} not installed (Debian package qemu-system-x86)"
    try:
        find_kernel()
    except KernelNotFound as exc:
        return f"no guest kernel: {exc} (Debian package linux-image-amd64)"
    if not Path("/bin/busybox").is_file():
        return "busybox-static not installed"
    return None


class GuestVM:
    """One running guest.  Use as a context manager; scripts run one at a time."""

    def __init__(self, workdir: Path, config: VMConfig | None = None) -> None:
        self.config = config or VMConfig()
        self.workdir = workdir.resolve()
        self.xchg = self.workdir / "xchg"
        self.console_log = self.workdir / "console.log"
        self.qmp_path = self.workdir / "qmp.sock"
        #: wall time from starting QEMU to the agent's first line
        self.boot_seconds = 0.0
        #: time.monotonic() when QEMU was started
        self.started_at = 0.0
        #: the guest kernel's own uptime at that moment
        self.guest_uptime_at_ready = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        kernel = self.config.kernel or find_kernel()
        initramfs = build_initramfs(self.config.build_dir, kernel)
        self.xchg.mkdir(parents=True, exist_ok=True)
        cmdline = " ".join(
            (
                "console=ttyS0,115200",
                "panic=-1",
                "rdinit=/init",
                "mitigations=off",
                "loglevel=5",
                f"mu.xchg={self.xchg}",
                *self.config.extra_cmdline,
            )
        )
        argv = [
            self.config.qemu,
            "-accel", "tcg",
            "-machine", "pc",
            "-cpu", "max",
            "-m", str(self.config.memory_mib),
            "-smp", str(self.config.cpus),
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(kernel.vmlinuz),
            "-initrd", str(initramfs),
            "-append", cmdline,
            "-serial", f"file:{self.console_log}",
            "-serial", "stdio",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=xchg,path={self.xchg},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=xchg,mount_tag=xchg",
            *(("-qmp", f"unix:{self.qmp_path},server=on,wait=off") if self.config.qmp else ()),
            *self.config.extra_args,
        ]
        started = self.started_at = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "qemu.stderr", "wb"),  # noqa: SIM115
        )
        ready = self._await_line(b"MU-READY", self.config.boot_timeout, "boot")
        self.boot_seconds = time.monotonic() - started
        self.guest_uptime_at_ready = float(ready.split()[1])

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b"POWEROFF\n")
                proc.stdin.flush()
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()

    def __enter__(self) -> GuestVM:
        try:
            self.start()
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    # -- running scripts ---------------------------------------------------
    def run(self, script: str, timeout: float = 60.0) -> ScriptResult:
        """Run `script` with /bin/sh in the guest; returns its status and output."""
        if self._proc is None or self._proc.poll() is not None:
            raise VMError("guest is not running" + self._console_tail())
        self._next_id += 1
        sid = f"s{self._next_id}"
        (self.xchg / f"{sid}.sh").write_text(script)
        started = time.monotonic()
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"RUN {sid}\n".encode())
        self._proc.stdin.flush()
        line = self._await_line(f"MU-DONE {sid} ".encode(), timeout, f"script {sid}")
        status = int(line.split()[2])
        output = (self.xchg / f"{sid}.out").read_text(errors="replace")
        return ScriptResult(status, output, time.monotonic() - started)

    def path_in_guest(self, name: str) -> Path:
        """A path in the exchange directory; the same path names it in the guest."""
        return self.xchg / name

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _console_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.console().splitlines()[-lines:])
        return f"\n--- guest console (last {lines} lines) ---\n{tail}"

    def _await_line(self, prefix: bytes, timeout: float, what: str) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                line = line.strip()
                if line.startswith(prefix):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A guest that missed its deadline is in an unknown state.
                self._kill()
                raise VMTimeout(f"{what}: no answer within {timeout:.0f}s" + self._console_tail())
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._kill()
                    raise VMError(f"{what}: QEMU exited" + self._console_tail())
                self._buffer += chunk
