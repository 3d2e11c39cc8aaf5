"""Run inside the test guest on a mounted file system: a SQLite database written by
Python's sqlite3 (default rollback journal, synchronous=FULL), one transaction of ROWS
inserts at a time, and next to each commit a file of random bytes written and fsynced.

    python -m tests.support.vm.sqlite_workload DIR TRANSACTIONS ROWS OUT.json

OUT.json lists, in order, each commit with the row count it left and the wall time
(time.time_ns, the clock the local unit stamps barriers with) at which the commit and
the file's fsync had both returned, the file's name and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path


def main() -> None:
    root, txns, rows, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    db = sqlite3.connect(root / "app.db", isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
    (root / "files").mkdir()
    commits = []
    total = 0
    for k in range(txns):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                       [(k, os.urandom(200)) for _ in range(rows)])
        db.execute("COMMIT")
        total += rows
        data = os.urandom(3000 + 997 * k)
        name = f"files/f{k:03d}"
        with open(root / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        commits.append({"rows": total, "t_done": time.time_ns(), "file": name,
                        "sha256": hashlib.sha256(data).hexdigest()})
    db.close()
    Path(out).write_text(json.dumps(commits))
    print(f"{txns} transactions, {total} rows")


if __name__ == "__main__":
    main()
