"""Shell functions for guest scripts that drive a unit: find_disk and wait_disk (the
first sd* disk with a vendor string), sg_of (its SCSI generic node) and mu (our CLI,
run from the repository the guest shares with the host)."""

from __future__ import annotations

import sys

from tests.support import REPO

PYTHON = sys.executable


PRELUDE = rf"""
set -u
find_disk() {{
    for b in /sys/block/sd*; do
        [ -e "$b/device/vendor" ] || continue
        [ "$(tr -d ' ' < "$b/device/vendor")" = "$1" ] || continue
        [ "$(cat "$b/size")" -gt 0 ] 2>/dev/null || continue
        echo "/dev/${{b##*/}}"; return 0
    done
    return 1
}}
wait_disk() {{
    i=0
    while ! find_disk "$1" >/dev/null; do
        i=$((i+1)); [ $i -gt 600 ] && {{ echo "no disk from $1" >&2; return 1; }}
        sleep 0.1
    done
    find_disk "$1"
}}
sg_of() {{ echo "/dev/$(ls "/sys/block/${{1#/dev/}}/device/scsi_generic/")"; }}
mu() {{ (cd {REPO} && {PYTHON} -m firmware "$@"); }}
"""
