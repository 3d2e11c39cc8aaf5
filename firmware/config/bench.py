"""Key derivation figures for `make bench` (`run(workdir) -> dict`): the time one
admin-password guess costs against the stored hash and against a sealed blob, at
the parameters units use now and at the scrypt ones they used before (kdf.py;
docs/config.md, "Key derivation", quotes them)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .kdf import PASSWORD_PARAMS, SEAL_KEY_PARAMS, KdfParams, ScryptParams

RUNS = 7
GUESS = b"correct horse battery"
SALT = b"\x5a" * 16


def _times(fn: Callable[[], object], runs: int = RUNS) -> dict[str, float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return {"best_s": round(min(out), 4), "median_s": round(statistics.median(out), 4)}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(workdir: Path) -> dict[str, Any]:
    del workdir
    cases: dict[str, KdfParams] = {
        "admin_hash_argon2id": PASSWORD_PARAMS,
        "seal_argon2id": SEAL_KEY_PARAMS,
        "old_hash_scrypt": ScryptParams(14, 8, 1),
        "old_seal_scrypt": ScryptParams(15, 8, 1),
    }
    report: dict[str, Any] = {"machine": platform.machine(), "cpu": _cpu()}
    print(f"Key derivation, one guess on one core ({report['machine']}, {report['cpu']}) ...")
    for name, params in cases.items():
        def derive(p: KdfParams = params) -> bytes:
            return p.derive(GUESS, SALT, 64)

        r: dict[str, Any] = dict(_times(derive))
        r["memory_MiB"] = params.memory >> 20
        report[name] = r
        print(f"  {name}: {r['memory_MiB']} MiB, best {r['best_s']:.3f} s, "
              f"median {r['median_s']:.3f} s")
    return report
