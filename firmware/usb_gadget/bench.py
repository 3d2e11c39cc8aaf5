"""USB disk throughput and latency: our gadget against the kernel's f_mass_storage.

`run(workdir)` (called by `make bench`) boots one QEMU guest (tests/support/vm harness)
and, in rounds, serves a tmpfs-backed disk three ways over the same dummy_hcd
link to the guest's own usb-storage:

* ``kernel``: f_mass_storage over a plain file;
* ``file``: our gadget (FunctionFS + BOT + SCSI target) over a plain file;
* ``sync`` (only with ``--with-sync``): the same with synchronous endpoint I/O
  instead of native AIO, to see what AIO changes in the same run;
* ``unit``: `mirrorunit local --frontend usb`, the whole local unit (write-back
  cache, mirror file and CBQ, every write journaled).

Each round measures sequential 1 MiB O_DIRECT write and read with dd, and the
latency of 4 KiB O_DIRECT|O_DSYNC writes at queue depth 1.  The three run back
to back in each round, so the per-round ratios compare like with like on a
shared, noisy machine; the report gives their median.  Under TCG the absolute
numbers measure the emulator as much as the code: read the ratios.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("kernel", "file", "unit")
OPTIONAL_CONFIGS = ("sync",)
#: host settings measured: usb-storage's default, and 1 MiB commands
VARIANTS = {"default": "", "large": "2048"}
DISK_MIB = 64
TRANSFER_MIB = 32
LATENCY_WRITES = 200

_HELPERS = r"""
set -u
wait_disk() {
    i=0
    while :; do
        for b in /sys/block/sd*; do
            [ -e "$b/device/vendor" ] || continue
            [ "$(tr -d ' ' < "$b/device/vendor")" = "$1" ] || continue
            [ "$(cat "$b/size")" -gt 0 ] 2>/dev/null && { echo "/dev/${b##*/}"; return 0; }
        done
        i=$((i+1)); [ $i -gt 600 ] && return 1
        sleep 0.1
    done
}
gone() {
    i=0
    while [ -n "$(ls /sys/class/scsi_disk 2>/dev/null)" ] && [ $i -lt 100 ]; do
        i=$((i+1)); sleep 0.1
    done
}
measure() {
    # usb-storage caps a command at 240 sectors on a high-speed link; a variant
    # lifts the cap (sysfs max_sectors) so a 1 MiB dd is one command
    [ -n "$MAXSEC" ] && echo $MAXSEC > /sys/block/${1#/dev/}/device/max_sectors
    echo "write $(dd if=/dev/zero of=$1 bs=1M count=@MIB@ oflag=direct 2>&1 | tail -1)"
    echo "read $(dd if=$1 of=/dev/null bs=1M count=@MIB@ iflag=direct 2>&1 | tail -1)"
    echo "lat4k $(dd if=/dev/zero of=$1 bs=4k count=@LAT@ oflag=direct,dsync 2>&1 | tail -1)"
}
""".replace("@MIB@", str(TRANSFER_MIB)).replace("@LAT@", str(LATENCY_WRITES))

_SCRIPTS = {
    "kernel": """
truncate -s {size} /tmp/kb.img
G=/sys/kernel/config/usb_gadget/kbench; mkdir $G; cd $G
echo 0x1d6b > idVendor; echo 0x0104 > idProduct
mkdir functions/mass_storage.0 configs/c.1
echo /tmp/kb.img > functions/mass_storage.0/lun.0/file
ln -s functions/mass_storage.0 configs/c.1/
echo dummy_udc.0 > UDC
DEV=$(wait_disk Linux) || exit 1
measure $DEV
echo "" > UDC; rm configs/c.1/mass_storage.0; rmdir configs/c.1 functions/mass_storage.0
cd /; rmdir $G; rm /tmp/kb.img; gone
""",
    "file": """
cd {repo}
{python} tests/support/vm/guest_gadget.py /tmp/fb.img {size} --udc dummy_udc.0 > /tmp/fb.log 2>&1 &
pid=$!
DEV=$(wait_disk MirrorUn) || {{ cat /tmp/fb.log; exit 1; }}
measure $DEV
kill -TERM $pid; wait $pid; rm /tmp/fb.img; gone
""",
    "sync": """
cd {repo}
{python} tests/support/vm/guest_gadget.py /tmp/fb.img {size} --udc dummy_udc.0 --sync \\
    > /tmp/fb.log 2>&1 &
pid=$!
DEV=$(wait_disk MirrorUn) || {{ cat /tmp/fb.log; exit 1; }}
measure $DEV
kill -TERM $pid; wait $pid; rm /tmp/fb.img; gone
""",
    "unit": """
mkdir -p /tmp/ub; cd {repo}
{python} -m firmware local --disk /tmp/ub/disk.img --size {size} --buffer /tmp/ub/cbq.img \
    --buffer-size 96M --control /tmp/ub/control.sock --nbd '' --frontend usb \
    --usb-udc dummy_udc.0 > /tmp/ub/unit.log 2>&1 &
pid=$!
DEV=$(wait_disk MirrorUn) || {{ cat /tmp/ub/unit.log; exit 1; }}
measure $DEV
kill -TERM $pid; wait $pid; rm -rf /tmp/ub; gone
""",
}


def parse_round(output: str) -> dict[str, float]:
    """MB/s of 'write'/'read' and microseconds per 4 KiB write from one measure()."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        m = re.match(r"(write|read|lat4k) (\d+) bytes .* copied, ([0-9.]+) s", line)
        if not m:
            continue
        kind, nbytes, secs = m.group(1), int(m.group(2)), float(m.group(3))
        if kind == "lat4k":
            out["lat4k_us"] = secs / (nbytes // 4096) * 1e6
        else:
            out[kind] = nbytes / secs / 1e6
    return out


def _configs(rounds: list[dict[str, dict[str, float]]]) -> list[str]:
    return [c for c in (*CONFIGS, *OPTIONAL_CONFIGS) if any(c in r for r in rounds)]


def summarise(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians per configuration, medians of the per-round ratios to the kernel, and
    their spread (min, max)."""
    report: dict[str, Any] = {"rounds": rounds}
    for config in _configs(rounds):
        report[config] = {
            key: statistics.median(r[config][key] for r in rounds if key in r.get(config, {}))
            for key in ("write", "read", "lat4k_us")
            if any(key in r.get(config, {}) for r in rounds)
        }
    ratios: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, list[float]]] = {}
    for config in _configs(rounds):
        if config == "kernel":
            continue
        ratios[config] = {}
        spread[config] = {}
        for key, name in (("write", "write"), ("read", "read"), ("lat4k_us", "lat4k")):
            per_round = [r[config][key] / r["kernel"][key] for r in rounds
                         if key in r.get(config, {}) and r.get("kernel", {}).get(key)]
            if per_round:
                ratios[config][name] = statistics.median(per_round)
                spread[config][name] = [min(per_round), max(per_round)]
    report["ratios"] = ratios
    report["spread"] = spread
    return report


def measure(workdir: Path, rounds: int = 3, with_sync: bool = False) -> dict[str, Any]:
    """{variant: summarise(...)} for each host variant, plus boot_seconds.  The
    configurations run in a different order each round (alternating), so a load
    that builds up or fades during a round does not favour one of them."""
    sys.path.insert(0, str(REPO))
    from tests.support.vm.harness import GuestVM, VMConfig

    size = DISK_MIB << 20
    results: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in VARIANTS}
    with GuestVM(workdir, VMConfig()) as vm:
        boot = vm.boot_seconds
        configs = [*CONFIGS, *(OPTIONAL_CONFIGS if with_sync else ())]
        for i in range(rounds):
            order = configs if i % 2 == 0 else configs[::-1]
            for variant, max_sectors in VARIANTS.items():
                row: dict[str, dict[str, float]] = {}
                for config in order:
                    script = f"MAXSEC={max_sectors}\n" + _HELPERS + _SCRIPTS[config].format(
                        size=size, repo=REPO, python=sys.executable)
                    row[config] = parse_round(vm.run(script, timeout=300).check().output)
                results[variant].append(row)
    report: dict[str, Any] = {v: summarise(r) for v, r in results.items()}
    report["boot_seconds"] = boot
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    lines = [f"USB disk: {TRANSFER_MIB} MiB dd O_DIRECT, guest boot "
             f"{report['boot_seconds']:.1f} s"]
    for variant in VARIANTS:
        what = ("usb-storage default (120 KiB commands)" if variant == "default"
                else "host max_sectors 2048 (1 MiB commands)")
        lines += [f" {what}, medians of {len(report[variant]['rounds'])} rounds:",
                  *_format_variant(report[variant])]
    return lines


def _format_variant(report: dict[str, Any]) -> list[str]:
    lines = [f"  {'':8} {'write MB/s':>10} {'read MB/s':>10} {'4k dsync us':>12}"]
    for config in _configs(report["rounds"]):
        c = report[config]
        lines.append(f"  {config:8} {c.get('write', 0):10.1f} {c.get('read', 0):10.1f} "
                     f"{c.get('lat4k_us', 0):12.0f}")
    for config, r in report["ratios"].items():
        sp = report.get("spread", {}).get(config, {})

        def span(key: str, sp: dict[str, list[float]] = sp) -> str:
            lo, hi = sp.get(key, (0.0, 0.0))
            return f"[{lo:.2f}-{hi:.2f}]"

        lines.append(f"  {config}/kernel: write {r.get('write', 0):.2f} {span('write')}, read "
                     f"{r.get('read', 0):.2f} {span('read')}, 4k latency "
                     f"x{r.get('lat4k', 0):.2f} {span('lat4k')}")
    return lines


def run(workdir: Path) -> dict[str, Any]:
    """`make bench` entry point: prints its lines, returns the report."""
    sys.path.insert(0, str(REPO))
    from tests.support.vm.harness import missing_requirements

    reason = missing_requirements()
    if reason is not None:
        print(f"usb: skipped, no VM: {reason}")
        return {"skipped": reason}
    print("usb: booting a QEMU guest (kernel f_mass_storage vs our gadget)")
    report = measure(workdir / "vm", rounds=2)
    for line in format_report(report):
        print(line)
    return report


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--with-sync", action="store_true",
                        help="also our gadget with synchronous endpoint I/O")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mu-usb-bench-") as tmp:
        rep = measure(Path(tmp), a.rounds, a.with_sync)
    for text in format_report(rep):
        print(text)
    if a.json:
        print(json.dumps(rep, indent=2))
