"""Run every target for a fixed number of inputs, one at a time, and write a summary
(inputs, coverage edges and features from libFuzzer's last status line, crashes)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("link_frames", "nbd_protocol", "scsi_target", "config_slot", "cbq_reader")
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+).*?exec/s: (\d+)")


def run(target: str, runs: int, artifacts: Path) -> dict[str, object]:
    artifacts.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(HERE / f"{target}.py"), f"-runs={runs}",
         f"-artifact_prefix={artifacts}/{target}-"],
        capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    last = STATUS.findall(proc.stderr)
    inputs, cov, ft, _ = last[-1] if last else ("0", "0", "0", "0")
    crashed = proc.returncode != 0
    return {"target": target, "inputs": int(inputs), "cov": int(cov), "ft": int(ft),
            "seconds": round(elapsed, 1), "exec_s": int(int(inputs) / elapsed) if elapsed else 0,
            "crashes": 1 if crashed else 0, "rc": proc.returncode,
            "tail": proc.stderr[-2000:] if crashed else ""}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=Path("var/fuzz"))
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    args = ap.parse_args()
    lines = [f"{'target':14} {'inputs':>10} {'cov':>6} {'ft':>6} {'exec/s':>8} {'s':>8} crashes"]
    failed = False
    for t in args.targets:
        r = run(t, args.runs, args.out / "artifacts")
        lines.append(f"{t:14} {r['inputs']:>10} {r['cov']:>6} {r['ft']:>6} {r['exec_s']:>8} "
                     f"{r['seconds']:>8} {r['crashes']}")
        if r["crashes"]:
            failed = True
            lines.append(str(r["tail"]))
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
