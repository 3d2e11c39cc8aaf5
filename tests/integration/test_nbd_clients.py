"""Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io) against NbdServer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from firmware.blockdev import DeviceState, FileBlockDevice, MediumError
from firmware.nbd import protocol as p
from firmware.nbd.client import NbdClient, NbdClientError
from firmware.nbd.server import NbdServer, parse_hostport

MiB = 1 << 20


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: libnbd-bin / qemu-utils)")
    return path


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class RecordingDevice:
    """A BlockDevice filter that logs every call reaching the device."""

    inner: FileBlockDevice
    calls: list[tuple[str, int, int, bool]] = field(default_factory=list)
    fail_reads_at: int | None = None

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def state(self) -> DeviceState:
        return self.inner.state

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def write_cache_enabled(self) -> bool:
        return True

    @property
    def supports_trim(self) -> bool:
        return True

    def pread(self, offset: int, length: int) -> bytes:
        self.calls.append(("pread", offset, length, False))
        if self.fail_reads_at is not None and offset <= self.fail_reads_at < offset + length:
            raise MediumError("injected unrecoverable read error")
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.calls.append(("pwrite", offset, len(data), fua))
        self.inner.pwrite(offset, data, fua)

    def flush(self) -> None:
        self.calls.append(("flush", 0, 0, False))
        self.inner.flush()

    def trim(self, offset: int, length: int) -> None:
        self.calls.append(("trim", offset, length, False))
        self.inner.trim(offset, length)


@dataclass
class Served:
    server: NbdServer
    device: RecordingDevice
    path: Path

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.server.port}/mirrorunit"

    def backing(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def serve(tmp_path: Path, size: int, read_only: bool = False) -> Iterator[Served]:
    path = tmp_path / "backing.img"
    FileBlockDevice(path, size=size, create=True).close()
    dev = FileBlockDevice(path, read_only=read_only)
    recording = RecordingDevice(dev)
    with NbdServer(recording, "127.0.0.1", 0) as server:
        yield Served(server, recording, path)
    dev.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path, 64 * MiB)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --- nbdinfo -----------------------------------------------------------------


def test_nbdinfo_reports_size_flags_and_block_sizes(served: Served) -> None:
    need("nbdinfo")
    res = run("nbdinfo", "--json", served.url)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["protocol"] == "newstyle-fixed"
    [exp] = info["exports"]
    assert exp["export-name"] == "mirrorunit"
    assert exp["export-size"] == 64 * MiB
    assert exp["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero"):
        assert exp[flag] is True, flag
    assert exp["can_multi_conn"] is False
    assert exp["block_size_minimum"] == 512
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB


def test_nbdinfo_read_only_export(tmp_path: Path) -> None:
    need("nbdinfo")
    for s in serve(tmp_path, 8 * MiB, read_only=True):
        res = run("nbdinfo", "--json", s.url)
        assert res.returncode == 0, res.stderr
        [exp] = json.loads(res.stdout)["exports"]
        assert exp["is_read_only"] is True
        assert exp["can_trim"] is False and exp["can_zero"] is False


def test_nbdinfo_list_uses_opt_list(served: Served) -> None:
    need("nbdinfo")
    res = run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{served.server.port}")
    assert res.returncode == 0, res.stderr
    names = [e["export-name"] for e in json.loads(res.stdout)["exports"]]
    assert names == ["mirrorunit"]


def test_unknown_export_is_refused(served: Served) -> None:
    need("nbdinfo")
    res = run("nbdinfo", "--json", f"nbd://127.0.0.1:{served.server.port}/nosuch")
    assert res.returncode != 0
    # ...and the server still serves the real export afterwards.
    assert run("nbdinfo", "--size", served.url).stdout.strip() == str(64 * MiB)


# --- nbdcopy -------------------------------------------------------------------


def test_nbdcopy_256mib_in_and_out(tmp_path: Path) -> None:
    need("nbdcopy")
    size = 256 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    for s in serve(tmp_path, size):
        t0 = time.monotonic()
        res = run("nbdcopy", str(src), s.url, timeout=300)
        t_in = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert sha256_file(s.path) == sha256_file(src)
        out = tmp_path / "out.img"
        t0 = time.monotonic()
        res = run("nbdcopy", s.url, str(out), timeout=300)
        t_out = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert sha256_file(out) == sha256_file(src)
        # Payloads arrive whole, not per sector: the device sees large writes.
        writes = [n for op, _, n, _ in s.device.calls if op == "pwrite"]
        assert sum(writes) == size
        assert max(writes) >= 256 * 1024
        print(
            f"nbdcopy 256 MiB: in {size / MiB / t_in:.0f} MiB/s, out {size / MiB / t_out:.0f} MiB/s"
        )


# --- qemu-img ------------------------------------------------------------------


def test_qemu_img_convert_and_compare(served: Served, tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.img"
    # Data, a zero run and a sparse tail so convert uses both writes and zeroing.
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB))
        f.write(bytes(8 * MiB))
        f.write(os.urandom(3 * MiB + 512))
        f.truncate(64 * MiB)
    # Junk in the backing file proves the zero runs were really written.
    with open(served.path, "r+b") as f:
        f.write(b"\xff" * 64 * MiB)
    res = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.url)
    assert res.returncode == 0, res.stderr
    assert sha256_file(served.path) == sha256_file(src)
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.url)
    assert res.returncode == 0, res.stdout + res.stderr
    # Change one byte behind the server's back: compare must notice.
    with open(served.path, "r+b") as f:
        f.seek(12345)
        original = f.read(1)[0]
        f.seek(12345)
        f.write(bytes([original ^ 0xFF]))  # always a different byte
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.url)
    assert res.returncode == 1, res.stdout + res.stderr


# --- qemu-io -------------------------------------------------------------------


def qemu_io(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(*args, url)


def assert_qemu_io_ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fail" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def test_qemu_io_patterns_fua_zeroes_discard_flush(served: Served) -> None:
    need("qemu-io")
    with open(served.path, "r+b") as f:
        f.write(b"\xee" * 8 * MiB)
    res = qemu_io(
        served.url,
        "write -P 0xa5 0 64k",
        "read -P 0xa5 0 64k",
        "write -f -P 0x5a 1M 128k",  # -f: Force Unit Access
        "read -P 0x5a 1M 128k",
        "write -z 1M 64k",
        "read -P 0 1M 64k",
        "read -P 0x5a 1088k 64k",
        "write -P 0x77 2M 1M",
        "discard 2M 512k",
        "flush",
        "write -P 0x3c 3000 5000",  # unaligned: the client read-modify-writes
        "read -P 0x3c 3000 5000",
        "read -P 0xa5 8000 192",
        "read -P 0xee 64k 4k",
    )
    assert_qemu_io_ok(res)
    # The backing file, read directly, holds what the commands wrote.
    assert served.backing(0, 3000) == b"\xa5" * 3000
    assert served.backing(3000, 5000) == b"\x3c" * 5000
    assert served.backing(8000, 64 * 1024 - 8000) == b"\xa5" * (64 * 1024 - 8000)
    assert served.backing(64 * 1024, 4096) == b"\xee" * 4096
    assert served.backing(MiB, 64 * 1024) == bytes(64 * 1024)
    assert served.backing(MiB + 64 * 1024, 64 * 1024) == b"\x5a" * 64 * 1024
    assert served.backing(2 * MiB + 512 * 1024, 512 * 1024) == b"\x77" * 512 * 1024
    calls = served.device.calls
    # FUA reached the device as FUA, flush as flush, discard as trim.
    assert ("pwrite", MiB, 128 * 1024, True) in calls
    assert ("flush", 0, 0, False) in calls
    assert ("trim", 2 * MiB, 512 * 1024, False) in calls


def test_qemu_io_sees_device_errors(served: Served) -> None:
    need("qemu-io")
    served.device.fail_reads_at = 5 * MiB
    res = qemu_io(served.url, "read 5M 4k")
    assert "Input/output error" in res.stdout + res.stderr
    res = qemu_io(served.url, "read -P 0 6M 4k")
    assert_qemu_io_ok(res)


def test_qemu_io_write_to_read_only_export(tmp_path: Path) -> None:
    need("qemu-io")
    for s in serve(tmp_path, 8 * MiB, read_only=True):
        before = sha256_file(s.path)
        # qemu honours NBD_FLAG_READ_ONLY and refuses a read-write open.
        res = qemu_io(s.url, "write -P 0x11 0 4k")
        assert res.returncode != 0
        assert "Permission denied" in res.stderr
        assert sha256_file(s.path) == before
        assert_qemu_io_ok(run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", s.url))


# --- the package's own client: error mapping and byte-granular access ----------


def test_misaligned_requests_without_block_size_negotiation(served: Served) -> None:
    with open(served.path, "r+b") as f:
        f.write(b"\x11" * 4096)
    with NbdClient("127.0.0.1", served.server.port, "mirrorunit", use_go=False) as c:
        assert c.size == 64 * MiB
        c.write(1, b"abc")
        c.write(510, b"XYZW")  # straddles a block boundary
        assert c.read(0, 8) == b"\x11abc\x11\x11\x11\x11"
        assert c.read(509, 6) == b"\x11XYZW\x11"
        c.write_zeroes(1000, 100)
        c.trim(100, 300)  # inside one block: a legal no-op
    assert served.backing(0, 8) == b"\x11abc\x11\x11\x11\x11"
    assert served.backing(508, 8) == b"\x11\x11XYZW\x11\x11"
    assert served.backing(999, 102) == b"\x11" + bytes(100) + b"\x11"
    assert served.backing(100, 300) == b"\x11" * 300


def test_misaligned_requests_after_negotiation_are_einval(served: Served) -> None:
    with NbdClient("127.0.0.1", served.server.port, "mirrorunit") as c:
        assert c.block_sizes == (512, 4096, 32 * MiB)
        with pytest.raises(NbdClientError) as err:
            c.write(1, b"abc")
        assert err.value.errno == p.NBD_EINVAL
        assert c.read(0, 512) == bytes(512)  # still in sync
    assert served.backing(0, 4) == bytes(4)


@pytest.mark.parametrize(
    ("state", "error"),
    [(DeviceState.OFFLINE, p.NBD_ESHUTDOWN), (DeviceState.STANDBY, p.NBD_ESHUTDOWN)],
)
def test_not_ready_device(served: Served, state: DeviceState, error: int) -> None:
    with NbdClient("127.0.0.1", served.server.port, "mirrorunit") as c:
        served.device.inner.state = state
        assert c.raw(p.NBD_CMD_READ, 0, 512) == error
        assert c.raw(p.NBD_CMD_WRITE, 0, 512, data=bytes(512)) == error
        served.device.inner.state = DeviceState.READY
        assert c.read(0, 512) == bytes(512)


def test_write_beyond_end_and_read_only(tmp_path: Path) -> None:
    for s in serve(tmp_path, 4 * MiB):
        with NbdClient("127.0.0.1", s.server.port, "mirrorunit") as c:
            assert c.raw(p.NBD_CMD_WRITE, 4 * MiB, 512, data=bytes(512)) == p.NBD_ENOSPC
            assert c.raw(p.NBD_CMD_READ, 4 * MiB - 512, 1024) == p.NBD_EINVAL
            c.write(4 * MiB - 512, b"\x42" * 512, fua=True)
            assert c.read(4 * MiB - 512, 512) == b"\x42" * 512
    ro = tmp_path / "ro"
    ro.mkdir()
    for s in serve(ro, 4 * MiB, read_only=True):
        with NbdClient("127.0.0.1", s.server.port, "mirrorunit") as c:
            assert c.transmission_flags & p.NBD_FLAG_READ_ONLY
            assert c.raw(p.NBD_CMD_WRITE, 0, 512, data=b"\x01" * 512) == p.NBD_EPERM
            assert c.raw(p.NBD_CMD_TRIM, 0, 512) == p.NBD_EPERM
            assert c.raw(p.NBD_CMD_WRITE_ZEROES, 0, 512) == p.NBD_EPERM
        assert s.backing(0, 512) == bytes(512)


def test_concurrent_clients(served: Served) -> None:
    import threading

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with NbdClient("127.0.0.1", served.server.port, "mirrorunit", use_go=False) as c:
                for j in range(200):
                    # Byte-granular writes sharing blocks with other workers.
                    off = j * 512 + i * 64
                    c.write(off, bytes([i + 1]) * 64)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    data = served.backing(0, 200 * 512)
    expected = b"".join(bytes([i + 1]) * 64 for i in range(8)) * 200
    assert data == expected, "read-modify-write of shared blocks lost an update"


def test_stop_is_idempotent_and_disconnects_clients(tmp_path: Path) -> None:
    path = tmp_path / "img"
    dev = FileBlockDevice(path, size=MiB, create=True)
    server = NbdServer(dev, "127.0.0.1", 0)
    server.start()
    port = server.port
    assert port != 0
    import threading

    t = threading.Thread(target=server.serve_forever)
    t.start()
    c = NbdClient("127.0.0.1", port, "mirrorunit")
    assert c.read(0, 512) == bytes(512)
    server.stop()
    server.stop()
    t.join(10)
    assert not t.is_alive()
    with pytest.raises((NbdClientError, OSError)):
        c.read(0, 512)
    c.sock.close()
    with pytest.raises(OSError):
        NbdClient("127.0.0.1", port, "mirrorunit", timeout=2)
    dev.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:1234", ("::1", 1234)),
        ("[::1]", ("::1", 10809)),
        ("example.org", ("example.org", 10809)),
        (":5000", ("", 5000)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:abc", "host:70000", "::1:5", "[::1", "[]:5"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_stop_from_a_signal_handler_in_the_serving_thread(tmp_path: Path) -> None:
    import signal

    from firmware.nbd.server import ServerStopped

    dev = FileBlockDevice(tmp_path / "img", size=MiB, create=True)
    server = NbdServer(dev, "127.0.0.1", 0)
    server.start()
    port = server.port

    def on_alarm(signum: int, frame: object) -> None:
        server.stop()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        started = time.monotonic()
        server.serve_forever()  # returns once the handler has stopped it
        assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert server.port == port
    with pytest.raises(OSError):
        NbdClient("127.0.0.1", port, "mirrorunit", timeout=2)
    with pytest.raises(ServerStopped):
        server.start()
    server.serve_forever()  # a stopped server returns at once
    dev.close()


def test_stop_before_the_accept_loop_runs(tmp_path: Path) -> None:
    dev = FileBlockDevice(tmp_path / "img", size=MiB, create=True)
    for _ in range(20):
        with NbdServer(dev, "127.0.0.1", 0):
            pass
    dev.close()
