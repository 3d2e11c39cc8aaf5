"""The status screen: the running unit's volume, buffer, links and UPS, refreshed."""

from __future__ import annotations

import curses
import time

from ... import COPYRIGHT, LICENSE, __version__
from ...config.schema import format_size
from ...notify.events import _links
from ..base import ESC, ConsoleBase

_ABOUT = f"MirrorUnit {__version__}  {COPYRIGHT}  ({LICENSE})"


class StatusScreen(ConsoleBase):
    """What the unit is doing, read from its control socket."""

    def status_lines(self) -> list[str]:
        st, err = self.unit_status()
        cfg = self.config()
        serial = (cfg["unit.serial"] if cfg else "") or "-"
        name = cfg["unit.name"] if cfg else "-"
        if st is None:
            return [f"Unit        {name}   serial {serial}   console {__version__}", "",
                    "*** LOCAL UNIT NOT RUNNING ***", f"  {err}", "",
                    "The host sees no disk and nothing is mirrored until it starts.", "",
                    _ABOUT]
        v, q = st.get("volume", {}), st.get("cbq", {})
        lines = [f"Role        {st.get('role', '?'):<10} version {st.get('version', '?'):<10}"
                 f" serial {serial}   name {name}"]
        if v:
            lines.append(f"Volume      {format_size(int(v.get('size', 0)))}B, "
                         f"{v.get('state')}, mode {v.get('cache_mode')}, "
                         f"{v.get('cache_bytes', 0)} bytes in RAM cache")
        if q:
            lines.append(f"Buffer      {q.get('fill', 0):.1%} full, mode {q.get('mode')}, "
                         f"{q.get('queued_blocks', 0)} blocks in buffer, last seq "
                         f"{q.get('last_seq')}"
                         + ("  LINK PAUSED" if q.get("dequeue_paused") else ""))
        links = dict(_links(st))
        for peer, c in (q.get("consumers") or {}).items():
            if str(peer).startswith("@"):
                continue
            link = links.get(peer, {})
            lag = link.get("lag_seconds")
            if lag is None and q.get("oldest_queued_ns"):
                lag = max(0.0, time.time() - q["oldest_queued_ns"] / 1e9)
            lines.append(f"Peer {peer:<7}sent {c.get('sent_seq')}, acked by remote "
                         f"{c.get('acked_seq')}, lag {c.get('pending_records', 0)} writes"
                         f" / {0.0 if lag is None else lag:.1f} s"
                         + (", NEEDS RESYNC" if c.get("needs_resync") else ""))
            lines.append(f"  link      {link.get('state', 'no link service running')}"
                         + (f" ({link['last_error']})" if link.get("last_error") else ""))
        ups = st.get("ups")
        if isinstance(ups, dict):
            charge = ups.get("charge_percent")
            lines.append(f"UPS         {ups.get('status')}, charge "
                         f"{'unknown' if charge is None else f'{charge:.0f}%'}, runtime "
                         f"{ups.get('runtime', 'unknown')}, policy "
                         f"{(ups.get('policy') or {}).get('state', '-')}")
        else:
            lines.append("UPS         not monitored")
        return lines + ["", _ABOUT]

    def status_screen(self) -> None:
        while True:
            self.frame("status", "Esc: back   (refreshes every few seconds)")
            for i, line in enumerate(self.status_lines()):
                self.put(2 + i, 1, line,
                         curses.A_BOLD if line.startswith("***") else 0)
            self.scr.refresh()
            k = self.key(int(self.s.refresh_s * 1000))
            if k in (ESC, ord("q")):
                return
