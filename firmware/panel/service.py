"""The front panel's serial link on the appliance: `mirrorunit panel`.

One thread reads the serial device and answers; a second polls the unit's status every
heartbeat; each request runs on a thread of its own (the password check and a network
change take a while), one at a time.  A device that goes away (a USB CDC port unplugged,
a pty closed) is reopened every `reopen_s`; garbage and half frames are dropped by the
codec, which resynchronises on the next delimiter, so the panel reads the next heartbeat.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import termios
import threading
import time
import tty
from dataclasses import dataclass
from typing import Any

from ..limits import RateLimitedLog
from .actions import PanelActions
from .codec import BadFrame, Frame, FrameDecoder, FrameType, PanelProtocolError, encode_frame

log = logging.getLogger("mirrorunit.panel")

#: A panel is silent after three heartbeats without a valid frame.
SILENT_HEARTBEATS = 3


@dataclass(frozen=True)
class LinkSettings:
    device: str
    baud: int = 115200
    heartbeat_s: float = 1.0
    reopen_s: float = 0.5


_BAUDS = {9600: termios.B9600, 19200: termios.B19200, 38400: termios.B38400,
          57600: termios.B57600, 115200: termios.B115200, 230400: termios.B230400}


def open_serial(path: str, baud: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if os.isatty(fd):
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[4] = attrs[5] = _BAUDS[baud]
            attrs[2] |= termios.CLOCAL  # no modem lines on a panel cable
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except (termios.error, OSError):
        os.close(fd)
        raise
    return fd


class PanelLink:
    def __init__(self, settings: LinkSettings, actions: PanelActions) -> None:
        self.s = settings
        self.actions = actions
        self.boot = int.from_bytes(os.urandom(4), "little") & 0x3FFFFFFF
        self._fd: int | None = None
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._status: dict[str, Any] | None = None
        self._status_changed = threading.Event()
        self._busy = threading.Lock()
        self._ratelog = RateLimitedLog(log, 30.0)
        self.decoder = FrameDecoder()
        self.sent = 0
        self.panel_boot: int | None = None
        self.last_rx = 0.0

    # ------------------------------------------------------------ public

    def run(self) -> None:
        poller = threading.Thread(target=self._poll_status, name="panel-status", daemon=True)
        poller.start()
        try:
            while not self._stopping.is_set():
                try:
                    self._fd = open_serial(self.s.device, self.s.baud)
                except (OSError, termios.error) as e:
                    self._ratelog.warning("open", "panel: cannot open %s: %s", self.s.device,
                                          e)
                    self._stopping.wait(self.s.reopen_s)
                    continue
                log.info("panel: %s open", self.s.device)
                self.decoder = FrameDecoder()  # a half frame from before means nothing
                try:
                    self._converse()
                except OSError as e:
                    log.warning("panel: %s: %s; reopening", self.s.device, e)
                finally:
                    fd, self._fd = self._fd, None
                    if fd is not None:
                        os.close(fd)
                self._stopping.wait(self.s.reopen_s)
        finally:
            self._stopping.set()
            poller.join(timeout=5)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def panel_up(self) -> bool:
        return time.monotonic() - self.last_rx < SILENT_HEARTBEATS * self.s.heartbeat_s

    # ------------------------------------------------------------ the line

    def _converse(self) -> None:
        assert self._fd is not None
        fd = self._fd
        next_beat = time.monotonic()
        heard = False
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_beat or self._status_changed.is_set():
                self._beat()
                next_beat = now + self.s.heartbeat_s
                if heard != self.panel_up:
                    heard = self.panel_up
                    log.info("panel: controller %s", "heard" if heard else "silent")
            wait = max(0.0, min(next_beat - time.monotonic(), 0.1))
            r, _, x = select.select([fd], [], [fd], wait)
            if not r and not x:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not data:
                raise OSError(errno.EIO, "end of file on the serial line")
            for event in self.decoder.feed(data):
                if isinstance(event, BadFrame):
                    self._ratelog.warning("bad", "panel: dropped a frame: %s (%d so far)",
                                          event.reason, self.decoder.errors)
                else:
                    self._on_frame(event)

    def _beat(self) -> None:
        self._status_changed.clear()
        self._send(FrameType.HEARTBEAT, {"boot": self.boot, "n": self.sent,
                                         "bad": self.decoder.errors})
        self.sent += 1
        if self._status is not None:
            self._send(FrameType.STATUS, self._status)

    def _send(self, ftype: FrameType, body: dict[str, Any]) -> None:
        try:
            frame = encode_frame(ftype, body)
        except PanelProtocolError as e:
            log.error("panel: %s", e)
            return
        with self._write_lock:
            fd = self._fd
            if fd is None:
                return
            view = memoryview(frame)
            deadline = time.monotonic() + 2.0
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    # the panel is not reading (a full tty buffer): drop rather than block
                    if time.monotonic() > deadline:
                        self._ratelog.warning("full", "panel: line full, frame dropped")
                        return
                    select.select([], [fd], [], 0.1)
                    continue
                view = view[n:]

    def _on_frame(self, frame: Frame) -> None:
        self.last_rx = time.monotonic()
        if frame.type is FrameType.HEARTBEAT:
            boot = frame.body.get("boot")
            if boot != self.panel_boot:
                log.info("panel: controller %s (boot %s)",
                         "started" if self.panel_boot is None else "restarted", boot)
                self.panel_boot = boot if isinstance(boot, int) else None
                self._status_changed.set()  # show it the status at once
        elif frame.type is FrameType.REQUEST:
            self._start_request(frame.body)
        else:
            self._ratelog.warning("type", "panel: unexpected %s frame", frame.type.name)

    def _start_request(self, body: dict[str, Any]) -> None:
        if not self._busy.acquire(blocking=False):
            self._send(FrameType.REPLY, {"id": body.get("id"), "ok": False,
                                         "msg": "busy with the last action"})
            return

        def work() -> None:
            try:
                reply = self.actions.handle(body)
                self._send(FrameType.REPLY, reply)
                self._status_changed.set()
            finally:
                self._busy.release()
        threading.Thread(target=work, name="panel-action", daemon=True).start()

    # ------------------------------------------------------------ the unit

    def _poll_status(self) -> None:
        while not self._stopping.is_set():
            try:
                status = self.actions.status()
            except Exception:  # a bug in summarising: keep the link and say so loudly
                log.exception("panel: status summary failed")
            else:
                if status != self._status:
                    self._status = status
                    self._status_changed.set()
            self._stopping.wait(self.s.heartbeat_s)
