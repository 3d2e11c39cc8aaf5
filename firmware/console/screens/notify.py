"""The notifications screen: SNMP trap targets and e-mail, and the text form of the
trap targets typed there."""

from __future__ import annotations

from typing import Any

from ...config import ConfigError
from ...config.schema import SCHEMA
from ..forms import FormField, Forms


def snmp_to_text(targets: list[dict[str, Any]]) -> str:
    out = []
    for t in targets:
        who = f"v3:{t['v3_user']}" if "v3_user" in t else t.get("community", "")
        out.append(f"{t['host']} {who}")
    return "; ".join(out)


def snmp_from_text(text: str) -> list[dict[str, Any]]:
    """'host[:port] community; host v3:user' -> notify.snmp entries."""
    targets = []
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        words = part.split()
        if len(words) != 2:
            raise ConfigError(f"notify.snmp[{i}]",
                              "write 'host[:port] community' or 'host[:port] v3:user'")
        host, who = words
        entry = {"host": host, **({"v3_user": who[3:]} if who.startswith("v3:")
                                  else {"community": who})}
        targets.append(entry)
    return SCHEMA["notify.snmp"].type.check("notify.snmp", targets)  # type: ignore[no-any-return]


NOTIFY_FIELDS = [
    FormField("notify.snmp", "SNMP trap targets", to_text=snmp_to_text,
              from_text=snmp_from_text, help="host[:port] community; host v3:user"),
    FormField("notify.email.recipients", "E-mail recipients", help="comma-separated"),
    FormField("notify.email.relay", "SMTP relay", help="host[:port]"),
    FormField("notify.email.from", "Sender address"),
    FormField("notify.poll_interval_s", "Check every (s)"),
]


class NotifyScreen(Forms):
    """Where the unit sends its notifications."""

    def notify_screen(self) -> None:
        self.config_form("notifications", NOTIFY_FIELDS)
