"""State-block detection on real formats written through a local unit's NBD front end:
a SQLite database (Python's sqlite3, rollback journal) whose file is copied onto the
disk after each transaction, with a flush, and a series of ext4 images (mke2fs -d) laid
over each other with a flush each.  The remote, knowing neither format, lists the
SQLite header page and the ext4 superblock among its top state blocks (this test knows
the formats, the product does not); `remote export --without` takes a range out."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

from firmware.nbd.client import NbdClient
from tests.support import REPO as ROOT
from tests.support.replication import MakePair, wait_caught_up
from tests.support.unitproc import need

SIZE = 8 << 20
PAGE = 4096


def _copy_changes(port: int, old: bytes, new: bytes, step: int = PAGE) -> None:
    """The pages of `new` that differ from `old`, then a flush (one consistent point)."""
    with NbdClient("127.0.0.1", port, "mirrorunit") as c:
        for off in range(0, len(new), step):
            if new[off:off + step] != old[off:off + step]:
                c.write(off, new[off:off + step])
        c.flush()


def _state_blocks(remote_control: Path, unit: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "remote", "state-blocks", unit, "--limit", "8",
         "--json", "--control", str(remote_control)],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    r: dict[str, object] = json.loads(out.stdout)
    return r


def _covers(entries: object, offset: int, block_size: int = 512) -> bool:
    assert isinstance(entries, list)
    return any(e["offset"] <= offset < e["offset"] + e["nblocks"] * block_size
               for e in entries)


def test_sqlite_header_page_is_a_top_state_block(make_pair: MakePair, tmp_path: Path) -> None:
    pair = make_pair(size="8M", buffer_size="32M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    db = tmp_path / "ledger.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"PRAGMA page_size={PAGE}")
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount INTEGER, memo BLOB)")
    rng = random.Random(5)
    prev = bytes(SIZE)
    for txn in range(25):
        con.execute("BEGIN")
        for _ in range(rng.randrange(2, 12)):  # bulk: new pages at the end of the file
            con.execute("INSERT INTO ledger (amount, memo) VALUES (?, ?)",
                        (rng.randrange(1000), rng.randbytes(rng.randrange(2000, 9000))))
        con.execute("COMMIT")
        cur = db.read_bytes()
        assert len(cur) < SIZE
        _copy_changes(local.port, prev, cur)
        prev = cur + prev[len(cur):]
        del txn
    con.close()
    wait_caught_up(local, remote, unit)
    r = _state_blocks(remote.control, unit)
    entries = r["state_blocks"]
    assert isinstance(entries, list) and entries
    print("state blocks:", entries[:4])
    # The header page (file change counter, page count) is rewritten at every commit.
    top = entries[:3]
    assert _covers(top, 24), top
    head = next(e for e in entries if e["offset"] <= 24 < e["offset"] + e["nblocks"] * 512)
    assert head["rewrites"] >= 20
    assert head["barrier_affinity"] >= 0.9
    assert len(prev.rstrip(b"\0")) > 40 * PAGE  # the bulk rows did pass by
    good = remote.call("remote.points", unit=unit)[-1]["number"]

    # A burst of random bytes over the database, flushed twice: find-point, preferring
    # the points right after a header-page update, finds the last commit.
    burst = bytearray(prev)
    for _ in range(2):
        off = rng.randrange(0, 8) * PAGE
        burst[off:off + 16 * PAGE] = rng.randbytes(16 * PAGE)
        _copy_changes(local.port, prev, bytes(burst))
        prev = bytes(burst)
    wait_caught_up(local, remote, unit)
    check = tmp_path / "check.py"
    check.write_text(
        "import sqlite3, sys\n"
        "c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro&immutable=1', uri=True)\n"
        "ok = c.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'\n"
        "sys.exit(0 if ok and c.execute('SELECT count(*) FROM ledger').fetchone()[0] "
        "else 1)\n")
    out = subprocess.run(
        [sys.executable, "-m", "firmware", "remote", "find-point", unit, "--check",
         f"{sys.executable} {check} {{image}}", "--json", "--control", str(remote.control)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    print("find-point:", [(t["number"], t["passed"]) for t in found["tries"]],
          found["after_state_update"], "of", found["candidates"])
    assert found["point"]["number"] == good
    assert found["after_state_update"] >= 20


def _ext4(tmp: Path, name: str, files: dict[str, bytes]) -> bytes:
    src = tmp / f"{name}-src"
    src.mkdir()
    for fname, data in files.items():
        (src / fname).write_bytes(data)
    img = tmp / f"{name}.img"
    subprocess.run([need("mke2fs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-U",
                    "0b0c0d0e-0000-4000-8000-000000000001", "-E", "hash_seed="
                    "0b0c0d0e-0000-4000-8000-000000000002", "-d", str(src), str(img),
                    str(SIZE // 4096)], check=True,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
    return img.read_bytes()


def test_ext4_superblock_is_a_top_state_block_and_without_undoes_a_range(
        make_pair: MakePair, tmp_path: Path) -> None:
    need("mke2fs")
    pair = make_pair(size="8M", buffer_size="32M")
    local, remote, unit = pair.local, pair.remote, pair.unit_id
    prev = bytes(SIZE)
    seqs = []
    for v in range(12):
        # A growing ledger (the free counts in the superblock and the group descriptors
        # change each time) and one more data file each version (bulk data passing by).
        files = {"ledger.txt": f"version {v}\n".encode() * (1 + v * 600)}
        files.update({f"data-{i}.bin": random.Random(i).randbytes(96 * 1024)
                      for i in range(v + 1)})
        cur = _ext4(tmp_path, f"v{v}", files)
        _copy_changes(local.port, prev, cur)
        prev = cur
        wait_caught_up(local, remote, unit)
        seqs.append(remote.call("remote.points", unit=unit)[-1]["seq"])
    r = _state_blocks(remote.control, unit)
    entries = r["state_blocks"]
    print("state blocks:", entries)
    assert isinstance(entries, list)
    sb = [e for e in entries if e["offset"] <= 1024 < e["offset"] + e["nblocks"] * 512]
    assert sb, entries  # the primary superblock is among the top entries
    assert sb[0]["rewrites"] >= 11 and sb[0]["barrier_affinity"] >= 0.9

    # Undo the last version's writes: what no later write covers comes back as it was
    # at the version before (nothing later here, so the image is that version's).
    out = tmp_path / "without.img"
    run = subprocess.run(
        [sys.executable, "-m", "firmware", "remote", "export", "--unit", unit, "--without",
         f"{seqs[-2] + 1}..{seqs[-1]}", "--output", str(out), "--control",
         str(remote.control)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    want = tmp_path / "want.img"
    subprocess.run([sys.executable, "-m", "firmware", "remote", "export", "--unit", unit,
                    "--seq", str(seqs[-2]), "--output", str(want), "--control",
                    str(remote.control)], check=True, cwd=ROOT, timeout=60)
    assert out.read_bytes() == want.read_bytes()
    listing = json.loads(Path(str(out) + ".conflicts.json").read_text())
    assert listing["conflicts"] == [] and listing["first_seq"] == seqs[-2] + 1
    subprocess.run([need("e2fsck"), "-fn", str(out)], check=True, capture_output=True)
