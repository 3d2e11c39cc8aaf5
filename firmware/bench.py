"""`make bench`: figures measured side by side in one run, reported as ratios.

1. CBQ append with group commit vs raw writes of the same bytes with the same
   fsync cadence to the same file system.
2. Sequential 64 KiB writes through the whole local unit (NBD, volume, CBQ)
   vs the same client writing a raw file.
3. Recovery time of a 1 GiB CBQ filled to its high-water mark, cut without a
   clean close.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
BENCH_EXTENSIONS = ("firmware.usb_gadget.bench", "firmware.apps.link.bench",
                    "firmware.remote.bench",
                    "firmware.apps.role.bench",
                    "firmware.config.bench")


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _prealloc(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def bench_append(workdir: Path, total: int = 256 * MiB, record: int = 64 * 1024,
                 group: int = 16, rounds: int = 3) -> dict[str, Any]:
    """Rounds alternate raw and CBQ on fresh preallocated files; medians are reported."""
    import statistics

    from .cbq import MIRROR_CONSUMER, CircularBufferQueue, create
    from .storage import FileStorage

    payload = os.urandom(record)
    n = total // record
    lbns = (1 << 30) // 512 - record // 512
    raw_times: list[float] = []
    cbq_times: list[float] = []
    for _ in range(rounds):
        raw_path = workdir / "raw.bin"
        _prealloc(raw_path, total + 64 * MiB)
        fd = os.open(raw_path, os.O_RDWR)
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, payload, i * record)
            if (i + 1) % group == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        raw_times.append(time.perf_counter() - t0)
        os.close(fd)
        raw_path.unlink()

        cbq_path = workdir / "cbq.bin"
        _prealloc(cbq_path, total + 64 * MiB)
        st = FileStorage(cbq_path)
        create(st, volume_blocks=(1 << 30) // 512, consumers=(), high_water=1.0)
        q = CircularBufferQueue(st)
        t0 = time.perf_counter()
        for i in range(n):
            q.append_write((i * (record // 512)) % lbns, payload)
            if (i + 1) % group == 0:
                q.ack(MIRROR_CONSUMER, q.sync())
        q.sync()
        cbq_times.append(time.perf_counter() - t0)
        q.close()
        st.close()
        cbq_path.unlink()
    raw_s, cbq_s = statistics.median(raw_times), statistics.median(cbq_times)
    return {"bytes": total, "record_bytes": record, "records_per_fsync": group,
            "rounds": rounds, "raw_MiBps": total / MiB / raw_s,
            "cbq_MiBps": total / MiB / cbq_s, "ratio": raw_s / cbq_s,
            "ratios_per_round": [r / c for r, c in zip(raw_times, cbq_times, strict=True)]}


def bench_nbd(workdir: Path, total: int = 256 * MiB) -> dict[str, Any]:
    if not shutil.which("nbdcopy"):
        return {"skipped": "nbdcopy not installed (libnbd-bin)"}
    src = workdir / "src.img"
    with open(src, "wb") as f:
        for _ in range(total // MiB):
            f.write(os.urandom(MiB))
    args = ["nbdcopy", "--flush", "--request-size=65536", "--requests=16"]
    raw = workdir / "raw.img"
    _prealloc(raw, total)
    t0 = time.perf_counter()
    subprocess.run([*args, str(src), str(raw)], check=True)
    raw_s = time.perf_counter() - t0

    port = _free_port()
    ctl = workdir / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware", "local", "--disk", str(workdir / "disk.img"),
         "--size", str(total), "--buffer", str(workdir / "q.img"), "--buffer-size",
         str(total + 128 * MiB), "--nbd", f"127.0.0.1:{port}", "--control", str(ctl)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from .control import call, wait_ready

        wait_ready(ctl, proc)
        t0 = time.perf_counter()
        subprocess.run([*args, str(src), f"nbd://127.0.0.1:{port}/mirrorunit"], check=True)
        ours_s = time.perf_counter() - t0
        status = call(ctl, "status")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"bytes": total, "request_bytes": 65536, "raw_MiBps": total / MiB / raw_s,
            "unit_MiBps": total / MiB / ours_s, "ratio": raw_s / ours_s,
            "queued_bytes": status["cbq"]["queued_bytes"]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_recovery(workdir: Path, size: int = 1 << 30) -> dict[str, Any]:
    from .cbq import MIRROR_CONSUMER, CircularBufferQueue, create
    from .storage import FileStorage

    path = workdir / "full.cbq"
    _prealloc(path, size)
    st = FileStorage(path)
    create(st, volume_blocks=(4 << 30) // 512, consumers=("remote",))
    q = CircularBufferQueue(st)
    payload = os.urandom(64 * 1024)
    i = 0
    while q.mode.value == "normal":
        q.append_write((i * 128) % ((4 << 30) // 512 - 128), payload)
        i += 1
        if i % 16 == 0:
            q.ack(MIRROR_CONSUMER, q.sync())
    q.sync()
    fill = q.stats()["fill"]
    # The cut: no clean close, no final checkpoint.
    st.close()
    results: dict[str, Any] = {"ring_bytes": q.geo.ring_size, "fill": fill, "records": i}
    for label in ("warm", "cold"):
        if label == "cold" and not _drop_caches():
            results["cold"] = "skipped (cannot drop the page cache without root)"
            continue
        st = FileStorage(path)
        t0 = time.perf_counter()
        q2 = CircularBufferQueue(st)
        results[f"{label}_seconds"] = time.perf_counter() - t0
        results["walked_past_checkpoint"] = q2.recovered_records
        assert q2.last_seq == i
        st.close()
    return results


def main() -> int:
    base = Path(os.environ.get("BENCH_DIR", "var/bench"))
    base.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(dir=base) as d:
        work = Path(d)
        print("CBQ append (group commit) vs raw writes with the same fsync cadence ...")
        report["cbq_append"] = r = bench_append(work)
        print(f"  raw {r['raw_MiBps']:.0f} MiB/s, CBQ {r['cbq_MiBps']:.0f} MiB/s, "
              f"ratio {r['ratio']:.2f} (goal >= 0.8)")
        for p in work.iterdir():
            p.unlink()
        print("NBD sequential 64 KiB writes through the local unit vs a raw file ...")
        report["nbd_write"] = r = bench_nbd(work)
        if "skipped" in r:
            print(f"  skipped: {r['skipped']}")
        else:
            print(f"  raw {r['raw_MiBps']:.0f} MiB/s, unit {r['unit_MiBps']:.0f} MiB/s, "
                  f"ratio {r['ratio']:.2f}")
        for p in work.iterdir():
            p.unlink()
        print("Recovery of a 1 GiB CBQ filled to its high-water mark, after a cut ...")
        report["recovery"] = r = bench_recovery(work)
        print(f"  fill {r['fill']:.0%}, {r['records']} records; warm "
              f"{r['warm_seconds']:.3f} s; cold "
              + (f"{r['cold_seconds']:.3f} s" if "cold_seconds" in r else str(r.get("cold")))
              + " (goal < 1 s)")
    # Each subsystem with figures of its own adds a module with `run(workdir) -> dict`
    # that prints its lines and returns what goes into the report.
    import importlib

    for name in BENCH_EXTENSIONS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name + ".").startswith(e.name + "."):
                continue
            raise
        with tempfile.TemporaryDirectory(dir=base) as d:
            report[name.rsplit(".", 2)[-2]] = mod.run(Path(d))
    out = base / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
