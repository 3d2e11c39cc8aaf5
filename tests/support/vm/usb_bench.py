"""USB throughput in the guest: the kernel's f_mass_storage against our gadget, one boot.

    .venv/bin/python -m tests.support.vm.usb_bench [--size-mib 64]

Both serve a file on the guest's tmpfs over the same dummy_hcd link; the host
reads and writes the whole disk with O_DIRECT.  Under TCG the absolute numbers
mostly measure the emulator, so the ratio is the figure to watch.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from tests.support import REPO

from .harness import GuestVM, VMConfig

_WAIT = r"""
wait_disk() {
    for i in $(seq 600); do
        for b in /sys/block/sd*; do
            [ -e "$b/device/vendor" ] || continue
            [ "$(tr -d ' ' < "$b/device/vendor")" = "$1" ] || continue
            [ "$(cat "$b/size")" -gt 0 ] && { echo "/dev/${b##*/}"; return 0; }
        done
        sleep 0.1
    done
    return 1
}
"""

_DD = """
DEV=$(wait_disk {vendor}) || exit 1
echo "read $(dd if=$DEV of=/dev/null bs=1M iflag=direct 2>&1 | tail -1)"
echo "write $(dd if=/dev/zero of=$DEV bs=1M count={mib} oflag=direct 2>&1 | tail -1)"
"""


def _rates(output: str) -> dict[str, float]:
    rates = {}
    for line in output.splitlines():
        m = re.match(r"(read|write) (\d+) bytes .* copied, ([0-9.]+) s", line)
        if m:
            rates[m.group(1)] = int(m.group(2)) / float(m.group(3)) / 1e6
    return rates


def measure(workdir: Path, size_mib: int = 64) -> dict[str, dict[str, float]]:
    size = size_mib << 20
    with GuestVM(workdir, VMConfig()) as vm:
        kernel = vm.run(
            _WAIT
            + f"""
truncate -s {size} /tmp/base.img
G=/sys/kernel/config/usb_gadget/bench; mkdir $G; cd $G
echo 0x1d6b > idVendor; echo 0x0104 > idProduct
mkdir functions/mass_storage.0 configs/c.1
echo /tmp/base.img > functions/mass_storage.0/lun.0/file
ln -s functions/mass_storage.0 configs/c.1/
echo dummy_udc.0 > UDC
"""
            + _DD.format(vendor="Linux", mib=size_mib)
            + """
echo "" > UDC; rm configs/c.1/mass_storage.0; rmdir configs/c.1 functions/mass_storage.0
cd /; rmdir $G; rm /tmp/base.img
""",
            timeout=600,
        ).check()
        ours = vm.run(
            _WAIT
            + f"""
cd {REPO}
{sys.executable} tests/support/vm/guest_gadget.py /tmp/ours.img {size} > /tmp/ours.log 2>&1 &
pid=$!
"""
            + _DD.format(vendor="MirrorUn", mib=size_mib)
            + "kill -TERM $pid; wait $pid\n",
            timeout=600,
        ).check()
        return {
            "boot_seconds": {"wall": vm.boot_seconds},
            "kernel": _rates(kernel.output),
            "ours": _rates(ours.output),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mu-usb-bench-") as tmp:
        result = measure(Path(tmp), args.size_mib)
    print(f"guest boot: {result['boot_seconds']['wall']:.1f} s")
    print(f"{'':6} {'kernel MB/s':>12} {'ours MB/s':>10} {'ours/kernel':>12}")
    for op in ("read", "write"):
        k, o = result["kernel"].get(op, 0.0), result["ours"].get(op, 0.0)
        print(f"{op:6} {k:12.1f} {o:10.1f} {o / k if k else 0:12.2f}")


if __name__ == "__main__":
    main()
