"""The local unit end to end: real NBD clients against `mirrorunit local`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from firmware.cbq.format import RECORD_HEADER, align_up
from tests.support.unitproc import LocalProc, need

MiB = 1 << 20


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def qemu_io(url: str, *commands: str) -> str:
    need("qemu-io")
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    res = run(*argv, url)
    assert res.returncode == 0 and "error" not in res.stdout.lower() \
        and "pattern verification failed" not in res.stdout.lower(), res.stdout + res.stderr
    return res.stdout


def test_nbdcopy_256mib_round_trip_and_queue(tmp_path: Path) -> None:
    need("nbdcopy")
    image = tmp_path / "in.img"
    rnd = random.Random(1)
    with open(image, "wb") as f:
        for _ in range(256):
            f.write(rnd.randbytes(MiB))
    with LocalProc(tmp_path, size="256M", buffer_size="400M") as unit:
        res = run("nbdcopy", str(image), unit.url)
        assert res.returncode == 0, res.stderr
        out = tmp_path / "out.img"
        res = run("nbdcopy", unit.url, str(out))
        assert res.returncode == 0, res.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == \
            hashlib.sha256(image.read_bytes()).digest()
        st = unit.call("status")
        q = st["cbq"]
        # Every byte written is queued for the peer, in normal (data) mode.
        assert q["mode"] == "normal"
        assert q["consumers"]["remote"]["pending_bytes"] == 256 * MiB
        assert q["queued_bytes"] == 256 * MiB
        assert st["volume"]["bytes_written"] == 256 * MiB
    # The mirror file itself holds the image once the unit stopped.
    assert hashlib.sha256(unit.disk.read_bytes()).digest() == \
        hashlib.sha256(image.read_bytes()).digest()
    rc = subprocess.run([sys.executable, "-m", "firmware", "cbq", "inspect", str(unit.buffer)],
                        capture_output=True, text=True)
    assert rc.returncode == 0 and "verified: clean" in rc.stdout, rc.stdout + rc.stderr


def test_qemu_img_convert_compare(tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(8 * MiB) + bytes(56 * MiB))
    with LocalProc(tmp_path) as unit:
        res = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), unit.url)
        assert res.returncode == 0, res.stderr
        res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), unit.url)
        assert res.returncode == 0, res.stdout + res.stderr


def test_qemu_io_fua_patterns_survive_kill(tmp_path: Path) -> None:
    unit = LocalProc(tmp_path).start()
    qemu_io(unit.url, "write -P 0x11 0 64k", "write -f -P 0x22 1M 128k",
            "write -P 0x33 2M 4k", "flush", "write -f -P 0x44 3M 512")
    qemu_io(unit.url, "read -P 0x11 0 64k", "read -P 0x22 1M 128k", "read -P 0x33 2M 4k",
            "read -P 0x44 3M 512", "read -P 0 4M 64k")
    # Everything above was flushed or FUA: it survives the unit being killed outright.
    unit.stop(signal.SIGKILL)
    unit = LocalProc(tmp_path).start()
    try:
        qemu_io(unit.url, "read -P 0x11 0 64k", "read -P 0x22 1M 128k", "read -P 0x33 2M 4k",
                "read -P 0x44 3M 512")
        assert unit.call("status")["cbq"]["last_seq"] == 4
        assert unit.call("cbq.verify")["clean"]
    finally:
        unit.stop()


def _writes_in_order(unit: LocalProc, consumer: str = "remote") -> list[dict]:
    got: list[dict] = []
    while True:
        batch = unit.call("cbq.read", consumer=consumer, max_records=8)
        if not batch:
            return got
        got += batch
        unit.call("cbq.ack", consumer=consumer, seq=batch[-1]["seq"])


def test_compact_mode_keeps_write_order_and_overflow_covers_changes(tmp_path: Path) -> None:
    """A 1 MiB queue under a 16 MiB volume: writes push it compact, then into overflow."""
    with LocalProc(tmp_path, size="16M", buffer_size="1M",
                   extra=("--high-water", "50%", "--cache-mode", "write-through")) as unit:
        # 64 KiB writes; the queue goes compact after about half a MiB of data.
        expected: dict[int, bytes] = {}
        for i in range(12):
            qemu_io(unit.url, f"write -P {0x40 + i} {i * 64}k 64k")
        st = unit.call("status")["cbq"]
        assert st["mode"] == "compact", st
        assert any("high-water" in t["why"] for t in st["transitions"])
        # Overwrite blocks still queued as compact records: the queue must still send
        # what was written first (copy-on-overwrite), then the new data, in order.
        qemu_io(unit.url, "write -P 0x99 704k 64k", "write -P 0x98 640k 32k")
        writes = _writes_in_order(unit)
        seqs = [w["seq"] for w in writes]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 14
        for i, w in enumerate(writes[:12]):
            expected[w["seq"]] = bytes([0x40 + i]) * 65536
        expected[13] = b"\x99" * 65536
        expected[14] = b"\x98" * 32768
        assert any(w["compact"] for w in writes), "no compact record was exercised"
        for w in writes:
            assert w["data"] == expected[w["seq"]], f"seq {w['seq']} carries the wrong data"
        # With the peer caught up, a long outage: stop acknowledging and keep writing.
        changed_chunks: set[int] = set()
        rnd = random.Random(3)
        for _ in range(20):
            cmds = []
            for _ in range(50):
                off = rnd.randrange(0, 16 * MiB // 4096) * 4096
                cmds.append(f"write -P 0x77 {off} 8k")
                changed_chunks.update(range(off // 65536, (off + 8191) // 65536 + 1))
            qemu_io(unit.url, *cmds)
            if unit.call("status")["cbq"]["mode"] == "overflow":
                break
        for _ in range(20):  # keep writing in overflow: the dirty map grows
            off = rnd.randrange(0, 16 * MiB // 4096) * 4096
            qemu_io(unit.url, f"write -P 0x78 {off} 4k")
            changed_chunks.add(off // 65536)
        st = unit.call("status")["cbq"]
        assert st["mode"] == "overflow"
        assert st["consumers"]["remote"]["needs_resync"]
        dirty = set(unit.call("cbq.dirty_chunks"))
        assert changed_chunks <= dirty, f"dirty map misses chunks {changed_chunks - dirty}"
    # The dirty map is persisted: it survives a restart.
    with LocalProc(tmp_path, size="16M", buffer_size="1M") as unit:
        assert changed_chunks <= set(unit.call("cbq.dirty_chunks"))
        assert unit.call("status")["cbq"]["mode"] == "overflow"


def test_control_operations(tmp_path: Path) -> None:
    with LocalProc(tmp_path) as unit:
        qemu_io(unit.url, "write -P 1 0 4k", "write -P 2 4k 4k", "write -P 3 8k 4k", "flush")
        unit.call("cbq.pause", side="dequeue")
        assert unit.call("cbq.read", consumer="remote") == []
        unit.call("cbq.resume", side="dequeue")
        unit.call("cbq.discard", first=2, last=2)
        got = unit.call("cbq.read", consumer="remote")
        assert [w["seq"] for w in got] == [1, 3]
        # Enqueue stopped: writes still land on the volume, tracked in the dirty map.
        unit.call("cbq.pause", side="enqueue")
        qemu_io(unit.url, "write -P 4 1M 4k")
        st = unit.call("status")["cbq"]
        assert st["enqueue_paused"] and st["last_seq"] == 3
        assert st["consumers"]["remote"]["needs_resync"]
        assert 16 in unit.call("cbq.dirty_chunks")
        unit.call("cbq.resume", side="enqueue")
        qemu_io(unit.url, "read -P 4 1M 4k")
        # Standby: the size stays visible, data access is refused, promotion restores it.
        unit.call("volume.set_state", state="standby")
        res = run("qemu-io", "-f", "raw", "-c", "read 0 4k", unit.url)
        assert "error" in (res.stdout + res.stderr).lower() or res.returncode != 0
        unit.call("volume.set_state", state="ready")
        qemu_io(unit.url, "read -P 1 0 4k")
        assert unit.call("volume.flush") >= 0
        status = run(sys.executable, "-m", "firmware", "status", "--control", str(unit.control))
        assert "cbq      mode normal" in status.stdout and "discard" not in status.stderr
        js = json.loads(run(sys.executable, "-m", "firmware", "status", "--control",
                            str(unit.control), "--json").stdout)
        assert js["cbq"]["discards"] == [[2, 2]]


def test_bad_control_and_nbd_input_leave_the_unit_serving(tmp_path: Path) -> None:
    with LocalProc(tmp_path) as unit:
        qemu_io(unit.url, "write -P 5 0 4k", "flush")
        for garbage in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xff",
                        os.urandom(64)):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(unit.control))
                s.sendall(garbage)
                s.shutdown(socket.SHUT_WR)
                s.recv(4096)
        for op, args in (("nope", {}), ("cbq.discard", {"first": 9, "last": 1}),
                         ("cbq.ack", {"consumer": "ghost", "seq": 1}),
                         ("volume.set_state", {"state": "sideways"})):
            with pytest.raises(Exception) as e:
                unit.call(op, **args)
            assert str(e.value)
        rnd = random.Random(4)
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", unit.port)) as s:
                s.recv(18)
                s.sendall(rnd.randbytes(rnd.randrange(1, 300)))
                s.shutdown(socket.SHUT_WR)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
        qemu_io(unit.url, "read -P 5 0 4k")
        assert unit.call("cbq.verify")["clean"]


def test_corrupt_and_truncated_cbq_files(tmp_path: Path) -> None:
    # Write-through: each write is its own commit group, starting on a 4 KiB boundary.
    unit = LocalProc(tmp_path, size="16M", buffer_size="4M",
                     extra=("--cache-mode", "write-through")).start()
    qemu_io(unit.url, "write -P 6 0 64k", "write -P 7 64k 64k", "write -P 8 128k 64k", "flush")
    unit.stop()
    mu = [sys.executable, "-m", "firmware"]
    good = unit.buffer.read_bytes()
    res = run(*mu, "cbq", "inspect", str(unit.buffer))
    assert res.returncode == 0 and "data 3" in res.stdout, res.stdout + res.stderr

    # A flipped byte inside the second record's payload is reported with its offset.
    ring = 12288
    bad = bytearray(good)
    second = ring + align_up(RECORD_HEADER.size + 65536, 4096)
    bad[second + RECORD_HEADER.size + 100] ^= 0xFF
    unit.buffer.write_bytes(bytes(bad))
    res = run(*mu, "cbq", "inspect", str(unit.buffer))
    assert res.returncode == 1 and "CORRUPT" in res.stdout and "offset" in res.stdout, res.stdout
    res = run(*mu, "cbq", "inspect", str(unit.buffer), "--json")
    report = json.loads(res.stdout)
    assert report["first_bad"]["offset"] == second
    # The unit still serves its disk (the mirror is intact) and reports the bad record;
    # a peer never gets corrupt data: it is switched to a full checksum resync instead.
    with LocalProc(tmp_path, size="16M", buffer_size="4M") as again:
        qemu_io(again.url, "read -P 7 64k 64k")
        report = again.call("cbq.verify")
        assert not report["clean"] and report["first_bad"]["offset"] == second
        assert again.call("cbq.read", consumer="remote") == []
        st = again.call("status")["cbq"]
        assert st["consumers"]["remote"]["needs_resync"]
        assert len(again.call("cbq.dirty_chunks")) == 16 * MiB // 65536
        assert any("unreadable queued record" in t["why"] for t in st["transitions"])

    # Truncated file and garbage superblocks: clear errors, no traceback.
    unit.buffer.write_bytes(good[:5000])
    res = run(*mu, "cbq", "inspect", str(unit.buffer))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr
    unit.buffer.write_bytes(os.urandom(8192) + good[8192:])
    res = run(*mu, "cbq", "inspect", str(unit.buffer))
    assert res.returncode == 2 and "no valid superblock" in res.stderr, res.stderr
    res = run(*unit.args, timeout=60)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr, res.stderr
    # A missing file and a missing size are explained, not crashed on.
    res = run(*mu, "cbq", "inspect", str(tmp_path / "nope.img"))
    assert res.returncode == 2 and "No such file" in res.stderr
