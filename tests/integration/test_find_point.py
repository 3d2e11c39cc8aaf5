"""find-point on a ransomware drill: a real ext4 file system written through a local
unit's NBD front end with a flush after each "commit", then random bytes over it; the
remote finds the newest consistent point e2fsck accepts, and the file there is intact."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from firmware.nbd.client import NbdClient
from tests.support import REPO as ROOT
from tests.support.replication import MakePair, wait_caught_up
from tests.support.unitproc import need

SIZE = 8 << 20
BLOCK = 4096


def _ext4(tmp: Path, name: str, text: str) -> bytes:
    src = tmp / f"{name}-src"
    src.mkdir()
    (src / "ledger.txt").write_text(text)
    img = tmp / f"{name}.img"
    subprocess.run([need("mke2fs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-U",
                    "0b0c0d0e-0000-4000-8000-000000000001", "-E", "hash_seed="
                    "0b0c0d0e-0000-4000-8000-000000000002", "-d", str(src), str(img),
                    str(SIZE // BLOCK)], check=True, env={**os.environ, "E2FSPROGS_FAKE_TIME":
                                                          "1700000000"})
    return img.read_bytes()


def _write_image(port: int, old: bytes, new: bytes) -> None:
    """The blocks of `new` that differ from `old`, then a flush (one consistent point)."""
    with NbdClient("127.0.0.1", port, "mirrorunit") as c:
        for off in range(0, SIZE, BLOCK):
            if new[off:off + BLOCK] != old[off:off + BLOCK]:
                c.write(off, new[off:off + BLOCK])
        c.flush()


def _cat(image: Path) -> str:
    out = subprocess.run([need("debugfs"), "-R", "cat /ledger.txt", str(image)],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_find_point_after_a_ransomware_burst(make_pair: MakePair, tmp_path: Path) -> None:
    need("e2fsck")
    pair = make_pair(size="8M", buffer_size="16M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    zero = bytes(SIZE)
    first = _ext4(tmp_path, "v1", "balance 100\n")
    _write_image(local.port, zero, first)
    second = _ext4(tmp_path, "v2", "balance 250\n")
    _write_image(local.port, first, second)  # the last good commit
    wait_caught_up(local, remote, unit)
    good = remote.call("remote.points", unit=unit)[-1]["number"]
    # The drill: random bytes over the start of the disk (the file system's metadata),
    # flushed, twice.
    rng = random.Random(7)
    before = second
    for _ in range(2):
        burst = bytearray(before)
        off = rng.randrange(0, 64) * BLOCK
        burst[off:off + 256 * 1024] = rng.randbytes(256 * 1024)
        burst[0:BLOCK] = rng.randbytes(BLOCK)
        _write_image(local.port, before, bytes(burst))
        before = bytes(burst)
    wait_caught_up(local, remote, unit)
    remote_points = remote.call("remote.points", unit=unit)
    assert len(remote_points) >= 4

    out = subprocess.run(
        [sys.executable, "-m", "firmware", "remote", "find-point", unit, "--check",
         f"{need('e2fsck')} -fn {{image}}", "--json", "--control", str(remote.control)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    print("find-point tries:", [(t["number"], t["passed"], t["blocks_written"])
                                for t in r["tries"]], f"{r['seconds']} s")
    assert r["point"]["number"] == good
    assert r["candidates"] == len(remote_points)
    assert len(r["tries"]) < r["candidates"] + 1
    # only the first try wrote the whole image; the others moved what changed
    assert all(t["blocks_written"] < SIZE // 512 for t in r["tries"][1:])
    assert not list(Path(remote.workdir).rglob("find-point-*.img"))
    # The file at that point is the last good commit's.
    export = tmp_path / "found.img"
    subprocess.run([sys.executable, "-m", "firmware", "remote", "export", "--unit", unit,
                    "--point", str(good), "--output", str(export), "--control",
                    str(remote.control)], check=True, cwd=ROOT, timeout=60)
    assert _cat(export) == "balance 250\n"
