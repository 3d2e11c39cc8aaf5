"""A short smoke of every fuzz target: 2,000 inputs each, no crash, hang or memory blow-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ("link_frames", "nbd_protocol", "scsi_target", "config_slot", "cbq_reader",
           "console_forms", "panel_frames")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_survives_2000_inputs(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FUZZ / f"{target}.py"), "-runs=2000", "-seed=1",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 2000 runs" in proc.stderr
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
