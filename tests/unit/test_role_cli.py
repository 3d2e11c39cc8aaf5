"""`mirrorunit role test-failover` runs until Ctrl-C or SIGTERM, then ends its clone:
also when it was started with SIGINT ignored, as a shell without job control starts a
background job (Python then never raises KeyboardInterrupt for it)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware.control.socket import ControlServer
from tests.support import REPO


@pytest.mark.parametrize("stop, sigint_ignored", [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["sigint", "sigint-started-ignored", "sigterm"])
def test_test_failover_ends_its_clone_on_a_stop_signal(
        tmp_path: Path, stop: signal.Signals, sigint_ignored: bool) -> None:
    calls: list[str] = []

    def start(**args: Any) -> dict[str, Any]:
        calls.append("start")
        return {"seq": 7, "address": "127.0.0.1:10809", "export": "u@test-7",
                "scratch_limit": 4096}

    def end(unit: str) -> list[dict[str, Any]]:
        calls.append(f"end {unit}")
        return [{"key": "u@test-7:10809", "scratch_used": 512}]

    server = ControlServer(tmp_path / "control.sock",
                           {"role.test_failover": start, "role.test_failover_end": end})
    server.start()
    argv = [sys.executable, "-m", "firmware", "role", "test-failover", "u", "--nbd",
            "127.0.0.1:0", "--control", str(tmp_path / "control.sock")]
    if sigint_ignored:
        argv = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "test failover of unit u at seq 7, writable" in line, line
        # At once: a signal landing before the command waits for it is not lost either.
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    assert proc.returncode == 0, err
    assert "ended u@test-7:10809: 512 bytes written to it discarded" in out
    assert calls == ["start", "end u"]
