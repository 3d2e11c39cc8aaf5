"""Consistent points end to end: qemu-io writes and flushes through a local unit's NBD
front end, the barriers travel with the writes, and the remote lists one point per
flush or FUA write, each exporting exactly the image the host had at that instant."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.support.replication import MakePair, wait_caught_up
from tests.support.unitproc import need

KiB = 1024
#: qemu-io commands, and what the host's image holds at each point.
SCRIPT: list[tuple[str, int, int, int, bool]] = [
    # (kind, offset, length, fill byte, is a barrier)
    ("write", 0, 64 * KiB, 0x11, False),
    ("flush", 0, 0, 0, True),
    ("write", 64 * KiB, 64 * KiB, 0x22, False),
    ("write", 8 * KiB, 4 * KiB, 0x33, False),
    ("flush", 0, 0, 0, True),
    ("fua", 1024 * KiB, 32 * KiB, 0x44, True),
    ("write", 0, 4 * KiB, 0x55, False),
    ("write", 2048 * KiB, 128 * KiB, 0x66, False),
    ("flush", 0, 0, 0, True),
]
SIZE = 8 << 20


def _qemu_io_args() -> list[str]:
    out = []
    for kind, off, length, fill, _ in SCRIPT:
        if kind == "flush":
            out += ["-c", "flush"]
        else:
            fua = " -f" if kind == "fua" else ""
            out += ["-c", f"write{fua} -P {fill:#x} {off} {length}"]
    return out


def _expected_digests() -> list[str]:
    img = bytearray(SIZE)
    digests = []
    for kind, off, length, fill, barrier in SCRIPT:
        if kind != "flush":
            img[off:off + length] = bytes([fill]) * length
        if barrier:
            digests.append(hashlib.sha256(img).hexdigest())
    return digests


def _remote_cli(control: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "firmware", "remote", *args,
                          "--control", str(control)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_one_point_per_flush_each_exporting_its_image(make_pair: MakePair,
                                                      tmp_path: Path) -> None:
    need("qemu-io")
    pair = make_pair(size="8M", buffer_size="4M")
    local, remote = pair.local, pair.remote
    # Write-back: qemu-io in its default write-through mode sends every write with FUA.
    res = subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", *_qemu_io_args(),
                          local.url],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr
    last = wait_caught_up(local, remote, pair.unit_id)
    # The local counted every barrier and recorded all of them.
    vol = local.call("status")["volume"]
    assert vol["barriers"] >= 4 and vol["barriers_unrecorded"] == 0, vol

    points = json.loads(_remote_cli(remote.control, "points", pair.unit_id, "--json"))
    # qemu-io may flush once more on close: the same instant, kept once.
    assert len(points) == 4, json.dumps(points, indent=1)
    seqs = [p["seq"] for p in points]
    assert seqs == sorted(set(seqs)) and seqs[-1] == last
    assert [p["number"] for p in points] == list(range(points[0]["number"],
                                                       points[0]["number"] + 4))
    kinds = [(p["front_end"], p["kind"], p["opcode"]) for p in points]
    assert kinds == [(1, 1, 3), (1, 1, 3), (1, 2, 1), (1, 1, 3)]  # NBD FLUSH / FUA WRITE
    assert all(p["applied"] and not p["in_resync"] for p in points)
    # Bytes since the previous point: what the host wrote between them.
    assert [p["bytes_since"] for p in points] == [64 * KiB, 68 * KiB, 32 * KiB, 132 * KiB]
    text = _remote_cli(remote.control, "points", pair.unit_id)
    assert text.count("nbd flush") == 3 and "nbd fua" in text
    # --from / --to select by time.
    mid = points[1]["ts"]
    within = json.loads(_remote_cli(remote.control, "points", pair.unit_id, "--from",
                                    f"ns:{mid}", "--json"))
    assert [p["number"] for p in within] == [p["number"] for p in points[1:]]

    # Each point exports exactly the host's image at that flush.
    for point, digest in zip(points, _expected_digests(), strict=True):
        out = tmp_path / f"point-{point['number']}.img"
        _remote_cli(remote.control, "export", "--unit", pair.unit_id, "--point",
                    str(point["number"]), "--output", str(out))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest, point
        out.unlink()
    # A point the unit does not keep is refused by name.
    res = subprocess.run([sys.executable, "-m", "firmware", "remote", "export", "--unit",
                          pair.unit_id, "--point", "999", "--output", str(tmp_path / "x"),
                          "--control", str(remote.control)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and "no point 999" in res.stderr
    # Replaying the recorded stream from the first point to the last (the target starts
    # as the image at the first) ends at the last point's image.
    start = tmp_path / "replayed.img"
    out = json.loads(_remote_cli(remote.control, "replay", pair.unit_id, "--from",
                                 str(points[0]["seq"]), "--to", str(points[-1]["seq"]),
                                 "--target", str(start), "--json"))
    assert out["barriers"] == 3 and out["writes"] == last - points[0]["seq"], out
    assert hashlib.sha256(start.read_bytes()).hexdigest() == _expected_digests()[-1]
    status = remote.unit(pair.unit_id)
    assert status["points"] == 4 and status["newest_point"]["number"] == points[-1]["number"]

    # With the daemon stopped, the same list comes from the store directory itself.
    pair.close()
    res = subprocess.run([sys.executable, "-m", "firmware", "remote", "points", pair.unit_id,
                          "--json", "--store", str(remote.store),
                          "--control", str(remote.control)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == points
