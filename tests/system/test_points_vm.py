"""Every consistent point the remote lists is a state ext4 and SQLite recover from.

One guest: a local unit serves its volume as a USB disk to the guest's own Linux
usb-storage (in the default write-through cache mode; the unit reports WCE so that sd sends
SYNCHRONIZE CACHE at every flush, and each becomes a barrier), replicating to a remote
unit on loopback. The guest makes ext4 on the disk, runs a SQLite workload on it
(Python's sqlite3, one transaction per commit, a fsynced file next to each), unmounts,
and both units stop. The remote's store is then read on the host: for every point of
`remote points --json`, the image at that point passes `e2fsck -fn` (as it is, and again
after the journal replay a mount would do; only mke2fs's own flushes, before it
returned, are instants with no file system yet), and once the first commit had returned,
the database (with its hot journal, if any, as SQLite itself would find it) passes
`PRAGMA integrity_check` (read from the replayed copy: committed ext4 transactions may
still be in the journal only) with a row count that some commit left, never fewer rows
than the commits returned before the point, and every file fsynced before it has its
digest. """

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.vm import GuestVM
from tests.support.vm.prelude import PRELUDE

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

PYTHON = sys.executable
W = "/tmp/mu-points"
SIZE = "40M"
FS_KIB = 32 << 10
TXNS = 24
ROWS = 30


def _debugfs(image: Path, requests: list[str]) -> str:
    cmd = image.parent / "debugfs.cmd"
    cmd.write_text("\n".join(requests) + "\n")
    r = subprocess.run(["debugfs", "-f", str(cmd), str(image)], capture_output=True,
                       text=True, check=False)
    return r.stdout + r.stderr


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_every_point_passes_e2fsck_and_sqlite(guest_vm: GuestVM, tmp_path: Path) -> None:
    xchg = guest_vm.path_in_guest("store")
    commits_json = guest_vm.path_in_guest("commits.json")
    out = guest_vm.run(PRELUDE + f"""
set -e
ip link set lo up 2>/dev/null || true
mkdir -p {W}
cd {REPO}
{PYTHON} -m tests.support.vm.points_guest start {W} {SIZE} MUPOINTS01
DISK=$(wait_disk MirrorUn)
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 $DISK {FS_KIB}
echo "MKFS-DONE $(date +%s%N)"
mkdir -p /mnt/pts
mount $DISK /mnt/pts
{PYTHON} -m tests.support.vm.sqlite_workload /mnt/pts {TXNS} {ROWS} {commits_json}
sync
umount /mnt/pts
{PYTHON} -m tests.support.vm.points_guest drain {W}
grep -c Traceback {W}/local.log {W}/remote.log || true
cp -a --sparse=always {W}/remote/store {xchg}
echo copied
""", timeout=400).check().output
    assert "replicated" in out and "stopped" in out and "copied" in out, out
    assert f"{W}/local.log:0" in out and f"{W}/remote.log:0" in out, out  # no Traceback
    unit = next(line.split()[1] for line in out.splitlines() if line.startswith("UNIT "))
    mkfs_done = int(next(line.split()[1] for line in out.splitlines()
                         if line.startswith("MKFS-DONE ")))
    commits = json.loads(commits_json.read_text())
    assert len(commits) == TXNS

    t0 = time.monotonic()
    listed = subprocess.run(
        [PYTHON, "-m", "firmware", "remote", "points", unit, "--json", "--store", str(xchg),
         "--control", str(tmp_path / "none.sock")],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed_points = json.loads(listed)
    # mke2fs flushes while it writes the tables: those instants are the host's data
    # durable, not yet a file system; every point once mkfs returned must be one.
    points = [p for p in listed_points if p["ts"] > mkfs_done]
    in_mkfs = len(listed_points) - len(points)
    # mkfs, the journal commits of every fsync, the unmount: far more than ten
    assert len(points) > 2 * TXNS, listed
    assert all(p["applied"] and not p["in_resync"] and p["front_end"] == 2 for p in points)
    assert [p["seq"] for p in points] == sorted({p["seq"] for p in points})

    from firmware.link.tls import PeerStore, unit_identity
    from firmware.remote.findpoint import ImageCursor
    from firmware.remote.server import RemoteServer, default_remote_state_dir

    state_dir = default_remote_state_dir(xchg)
    identity, _ = unit_identity(state_dir)
    server = RemoteServer(store_dir=xchg, listen=("127.0.0.1", 0), identity=identity,
                          peers=PeerStore.in_dir(state_dir))
    image = tmp_path / "point.img"
    scratch = tmp_path / "scratch"
    fsck_failures: list[str] = []
    replay_failures: list[str] = []
    replayed = tmp_path / "replayed.img"
    db_checked = 0
    last_rows = 0
    pending_journal = 0  # as-is failures of images whose journal holds commits
    try:
        cursor = ImageCursor(server.unit(unit), image)
        try:
            for p in points:
                cursor.goto(p["seq"])
                fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True,
                                      text=True, check=False)
                if fsck.returncode != 0:
                    # With committed transactions still in the journal, `-n` checks the
                    # in-place metadata the journal replay would complete (jbd2 may be
                    # mid-checkpoint at a flush): only the replayed check below decides.
                    if "skipping journal recovery" in fsck.stdout:
                        pending_journal += 1
                    else:
                        fsck_failures.append(f"point {p['number']} seq {p['seq']}: "
                                             f"exit {fsck.returncode}\n{fsck.stdout}")
                # What a mount (or e2fsck -p) does first: replay the committed journal
                # transactions, on a copy so the cursor's image stays the point's.
                with open(image, "rb") as src, open(replayed, "wb") as dst:
                    dst.write(src.read(FS_KIB << 10))
                jr = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(replayed)],
                                    capture_output=True, text=True, check=False)
                fsck2 = subprocess.run(["e2fsck", "-fn", str(replayed)], capture_output=True,
                                       text=True, check=False)
                if fsck2.returncode != 0:
                    replay_failures.append(f"point {p['number']} seq {p['seq']}: replay "
                                           f"exit {jr.returncode}, e2fsck -fn exit "
                                           f"{fsck2.returncode}\n{fsck2.stdout}")
                done = [c for c in commits if c["t_done"] <= p["ts"]]
                if not done:
                    continue
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                _debugfs(replayed, [f"dump /app.db {scratch / 'app.db'}",
                                    f"dump /app.db-journal {scratch / 'app.db-journal'}",
                                    *(f"dump /{c['file']} {scratch / c['file'][6:]}"
                                      for c in done)])
                # SQLite rolls a hot journal back on first read, as after a power cut.
                db = sqlite3.connect(scratch / "app.db")
                try:
                    check = db.execute("PRAGMA integrity_check").fetchall()
                    rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
                finally:
                    db.close()
                where = f"point {p['number']} (seq {p['seq']})"
                assert check == [("ok",)], (where, check)
                assert rows in {c["rows"] for c in commits}, (where, rows)
                assert rows >= done[-1]["rows"] and rows >= last_rows, (where, rows, last_rows)
                last_rows = rows
                for c in done:
                    got = hashlib.sha256((scratch / c["file"][6:]).read_bytes()).hexdigest()
                    assert got == c["sha256"], (where, c["file"])
                db_checked += 1
        finally:
            cursor.close()
    finally:
        server.store.close()
    print(f"{len(listed_points)} points listed, {in_mkfs} during mkfs")
    print(f"e2fsck -fn as is: {len(fsck_failures)} of {len(points)} fail with a clean "
          f"journal, {pending_journal} with committed transactions not yet replayed; after "
          f"the journal replay: {len(replay_failures)} fail")
    assert not replay_failures, "\n".join(replay_failures[:3])
    assert not fsck_failures, f"{len(fsck_failures)} of {len(points)} points fail e2fsck -fn:\n" \
        + "\n".join(fsck_failures[:3])
    assert db_checked >= TXNS, db_checked
    # The cursor's image at the last point is the one `remote export --point` writes.
    exported = tmp_path / "export.img"
    subprocess.run([PYTHON, "-m", "firmware", "remote", "export", "--unit", unit, "--point",
                    str(points[-1]["number"]), "--output", str(exported), "--store", str(xchg),
                    "--control", str(tmp_path / "none.sock")],
                   cwd=REPO, capture_output=True, text=True, check=True)
    assert _sha256(exported) == _sha256(image)
    assert last_rows == TXNS * ROWS
    print(f"{len(points)} points checked ({db_checked} with the database) in "
          f"{time.monotonic() - t0:.1f} s")
