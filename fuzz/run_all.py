"""Run every target for a fixed number of inputs, one at a time, and write a summary
(inputs, coverage edges and features from libFuzzer's last status line, exec/s, peak RSS,
crashes).  Each target's full libFuzzer output is kept beside the summary."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("link_frames", "nbd_protocol", "scsi_target", "config_slot", "cbq_reader",
           "console_forms", "panel_frames")
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+).*?exec/s: (\d+)")
DONE = re.compile(r"Done (\d+) runs")


def run(target: str, runs: int, out: Path, max_seconds: int) -> dict[str, object]:
    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{target}.log"
    argv = [sys.executable, str(HERE / f"{target}.py"), f"-runs={runs}",
            f"-artifact_prefix={artifacts}/{target}-"]
    if max_seconds:
        argv.append(f"-max_total_time={max_seconds}")
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        # wait4, not wait: the child's own peak RSS, not the largest of every child so far.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    last = STATUS.findall(text)
    done = DONE.findall(text)
    _, cov, ft, _ = last[-1] if last else ("0", "0", "0", "0")
    # "Done N runs" is the exact count; the last status line is the last power of two.
    inputs = int(done[-1]) if done else int(last[-1][0]) if last else 0
    crashed = proc.returncode != 0
    return {"target": target, "inputs": inputs, "cov": int(cov), "ft": int(ft),
            "seconds": round(elapsed, 1), "exec_s": int(inputs / elapsed) if elapsed else 0,
            "rss_mb": usage.ru_maxrss // 1024, "crashes": 1 if crashed else 0,
            "rc": proc.returncode, "tail": text[-2000:] if crashed else ""}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=Path("var/fuzz"))
    ap.add_argument("--max-seconds", type=int, default=0,
                    help="stop a target after this long (libFuzzer -max_total_time)")
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    args = ap.parse_args()
    lines = [f"{'target':14} {'inputs':>10} {'cov':>6} {'ft':>6} {'exec/s':>8} {'s':>8} "
             f"{'rss MB':>7} crashes"]
    print(lines[0], flush=True)
    failed = False
    for t in args.targets:
        r = run(t, args.runs, args.out, args.max_seconds)
        lines.append(f"{t:14} {r['inputs']:>10} {r['cov']:>6} {r['ft']:>6} {r['exec_s']:>8} "
                     f"{r['seconds']:>8} {r['rss_mb']:>7} {r['crashes']}")
        print(lines[-1], flush=True)
        if r["crashes"]:
            failed = True
            lines.append(str(r["tail"]))
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
