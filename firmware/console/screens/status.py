"""The status screen: the running unit's volume, buffer, links and UPS, refreshed."""

from __future__ import annotations

import curses
import time

from ... import COPYRIGHT, LICENSE, __version__
from ...config.schema import format_size
from ...control.status import ResyncProgress
from ...notify.events import links
from ..base import ESC, ConsoleBase

_ABOUT = f"MirrorUnit {__version__}  {COPYRIGHT}  ({LICENSE})"


def resync_line(r: ResyncProgress) -> str:
    """A running verify or checksum resync: how far, how fast, how long to go."""
    total = r["chunks"]
    done = r["chunks_done"]
    eta = r["eta_s"]
    return (f"  {r['kind']:<9}{done}/{total} chunks ({done / total if total else 1:.1%}), "
            f"{r['chunks_per_s']:.0f}/s {r['mib_per_s']:.0f} MiB/s, ETA "
            + ("-" if eta is None else f"{eta:.0f} s")
            + (f", {r['chunks_differing']} differ" if r["chunks_differing"] else ""))[:78]


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
        v, q = st["volume"], st["cbq"]
        lines = [f"Role        {st['role']:<10} version {st['version']:<10}"
                 f" serial {serial}   name {name}",
                 f"Volume      {format_size(v['size'])}B, {v['state']}, mode "
                 f"{v['cache_mode']}, {v['cache_bytes']} bytes in RAM cache",
                 f"Buffer      {q['fill']:.1%} full, mode {q['mode']}, "
                 f"{q['queued_blocks']} blocks in buffer, last seq {q['last_seq']}"
                 + ("  LINK PAUSED" if q["dequeue_paused"] else "")]
        lk = st.get("link")
        if lk is not None:
            lines.append(f"Copy        {lk['role']}, generation {lk['generation'] or '-'}")
            if lk["split_brain"]:
                lines += [f"*** SPLIT BRAIN: {lk['split_brain']}"[:78],
                          "    keep the remote's writes: `role failback` here; keep this "
                          "copy's:", "    `role resolve UNIT --give-up-here` on the remote "
                          "(docs/failover.md)"]
            elif lk["fenced"]:
                lines += [f"*** FENCED: {lk['fenced']}"[:78],
                          "    `role failback` takes the remote's image back; this copy's "
                          "writes", "    since are kept as a conflict image "
                          "(docs/failover.md)"]
        link_of = dict(links(st))
        for peer, c in q["consumers"].items():
            if peer.startswith("@"):  # the unit's own consumers, not remotes
                continue
            link = link_of.get(peer)
            if link is not None:
                lag = link["lag_seconds"]
            elif c["oldest_pending_ns"]:
                lag = max(0.0, time.time() - c["oldest_pending_ns"] / 1e9)
            else:
                lag = 0.0
            lines.append(f"Peer {peer:<7}sent {c['sent_seq']}, acked by remote "
                         f"{c['acked_seq']}, lag {c['pending_records']} writes / {lag:.1f} s"
                         + (", NEEDS RESYNC" if c["needs_resync"] else ""))
            if link is None:
                lines.append("  link      no link service running")
            else:
                lines.append(f"  link      {link['state']}"
                             + (f" ({link['last_error']})" if link["last_error"] else ""))
                if link["resync"] is not None:
                    lines.append(resync_line(link["resync"]))
        ups = st.get("ups")
        if ups is not None:
            charge = ups["charge_percent"]
            policy = ups["policy"] if isinstance(ups["policy"], dict) else {}
            lines.append(f"UPS         {ups['status']}, charge "
                         f"{'unknown' if charge is None else f'{charge:.0f}%'}, runtime "
                         f"{ups['runtime']}, policy {policy.get('state', '-')}")
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
