"""The peers and pairing screen: this unit's fingerprint and the paired peers."""

from __future__ import annotations

import curses
from typing import Any

from ..base import DOWN_KEYS, ENTER_KEYS, ESC, UP_KEYS
from ..forms import FormField, Forms


def colon_fp(fp: str) -> str:
    return ":".join(fp[i:i + 2] for i in range(0, len(fp), 2)).upper()


PEER_FIELDS = [
    FormField("name", "Peer name"), FormField("address", "Address host:port"),
    FormField("fingerprint", "SHA-256 fingerprint"),
]


class PeersScreen(Forms):
    """Adding, editing and removing peers."""

    def peers_screen(self) -> None:
        sel = 0
        while True:
            cfg = self.config()
            if cfg is None:
                return
            peers: list[dict[str, Any]] = [dict(p) for p in cfg["peers"]]
            self.frame("peers and pairing",
                       "a: add   e/Enter: edit   d: delete   arrows: move   Esc: back")
            st, _ = self.unit_status()
            own = self.s.own_fingerprint
            link = st.get("link") if st is not None else None
            if link is not None:
                own = link["fingerprint"]
            self.put(2, 1, "This unit's certificate fingerprint (SHA-256):")
            self.put(3, 3, colon_fp(own) if own else "not available (no link service)")
            self.put(5, 1, "Paired peers:" if peers else "No peers paired.")
            for i, p in enumerate(peers):
                self.put(6 + 2 * i, 3, f"{p['name']:<16} {p['address']}",
                         curses.A_REVERSE if i == sel else 0)
                self.put(7 + 2 * i, 5, colon_fp(p["fingerprint"]))
            self.scr.refresh()
            k = self.key()
            if k in (ESC, ord("q")):
                return
            if k in UP_KEYS and peers:
                sel = (sel - 1) % len(peers)
            elif k in DOWN_KEYS and peers:
                sel = (sel + 1) % len(peers)
            elif k == ord("d") and peers:
                if self.confirm(f"Remove peer {peers[sel]['name']}?"):
                    del peers[sel]
                    self.save({"peers": peers})
                    sel = 0
            elif k == ord("a") or (k in (ord("e"), *ENTER_KEYS) and peers):
                editing = k != ord("a")
                base = peers[sel] if editing else {"name": "", "address": "",
                                                   "fingerprint": ""}
                raw = {f.key for f in PEER_FIELDS}
                vals = self.edit_form("peer", PEER_FIELDS, dict(base), raw_keys=raw)
                if vals is None:
                    continue
                entry = {**base, **vals}
                new = list(peers)
                if editing:
                    new[sel] = entry
                else:
                    new.append(entry)
                self.save({"peers": new})
