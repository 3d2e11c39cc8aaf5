"""Delivering events: SNMP traps (v2c and v3, pysnmp) and e-mail (smtplib).

Trap layout (no MIB file needed to read it; see docs/notifications.md):
snmpTrapOID = TRAP_BASE.0.<event number>, varbinds under TRAP_BASE.1:
.1 unit name, .2 text, .3 severity, .4 subject (peer), .5 event name, .6 repeats
dropped by the rate limiter.  TRAP_BASE sits in the experimental arc until the
product has an enterprise number.
"""

from __future__ import annotations

import asyncio
import email.message
import email.utils
import hashlib
import logging
import smtplib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from firmware.errors import MirrorUnitError

from ..config.schema import split_host_port
from .events import TRAP_NUMBER, Event

log = logging.getLogger("mirrorunit.notify")

TRAP_BASE = "1.3.6.1.3.8472"
SEND_TIMEOUT_S = 10.0


class NotifyError(MirrorUnitError):
    """An event could not be delivered to one target."""


class Sender(Protocol):
    @property
    def target(self) -> str: ...

    def send(self, event: Event, unit_name: str) -> None: ...


def engine_id_for(unit_name: str, serial: str) -> bytes:
    """A stable SNMPv3 engine ID (RFC 3411: enterprise with the top bit set, format 4 =
    text), so the trap receiver's user entry survives restarts of the notifier."""
    tag = hashlib.sha256(f"{unit_name}/{serial}".encode()).hexdigest()[:16]
    return bytes.fromhex("80001f88") + b"\x04" + f"mu{tag}".encode()


@dataclass
class SnmpTrapSender:
    host: str
    port: int
    community: str | None = None
    v3_user: str | None = None
    auth_key: str = ""
    priv_key: str = ""
    engine_id: bytes = b""
    timeout_s: float = SEND_TIMEOUT_S

    @property
    def target(self) -> str:
        who = f"v3 user {self.v3_user}" if self.v3_user else "v2c"
        return f"snmp {self.host}:{self.port} ({who})"

    def send(self, event: Event, unit_name: str) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._send(event, unit_name), self.timeout_s))
        except (OSError, TimeoutError) as e:
            raise NotifyError(f"{self.target}: {e or 'timed out'}") from e

    async def _send(self, event: Event, unit_name: str) -> None:
        from pysnmp.hlapi.v3arch import asyncio as snmp
        from pysnmp.proto.rfc1902 import Integer32, OctetString

        engine = snmp.SnmpEngine(OctetString(self.engine_id) if self.engine_id else None)
        auth: Any
        if self.v3_user:
            auth = snmp.UsmUserData(
                self.v3_user, authKey=self.auth_key or None, privKey=self.priv_key or None,
                authProtocol=snmp.usmHMACSHAAuthProtocol if self.auth_key
                else snmp.usmNoAuthProtocol,
                privProtocol=snmp.usmAesCfb128Protocol if self.priv_key
                else snmp.usmNoPrivProtocol)
        else:
            auth = snmp.CommunityData(self.community or "public", mpModel=1)
        target = await snmp.UdpTransportTarget.create((self.host, self.port), timeout=2,
                                                      retries=0)
        n = TRAP_NUMBER[event.kind]
        notification = snmp.NotificationType(
            snmp.ObjectIdentity(f"{TRAP_BASE}.0.{n}")).add_varbinds(
            (f"{TRAP_BASE}.1.1", OctetString(unit_name)),
            (f"{TRAP_BASE}.1.2", OctetString(event.text)),
            (f"{TRAP_BASE}.1.3", OctetString(event.severity.value)),
            (f"{TRAP_BASE}.1.4", OctetString(event.subject)),
            (f"{TRAP_BASE}.1.5", OctetString(event.kind.value)),
            (f"{TRAP_BASE}.1.6", Integer32(event.suppressed)))
        try:
            error, status, _index, _binds = await snmp.send_notification(
                engine, auth, target, snmp.ContextData(), "trap", notification)
        finally:
            engine.close_dispatcher()
        if error or status:
            raise NotifyError(f"{self.target}: {error or status}")


@dataclass
class EmailSender:
    relay: str
    sender: str
    recipients: list[str]
    timeout_s: float = SEND_TIMEOUT_S

    @property
    def target(self) -> str:
        return f"e-mail via {self.relay} to {', '.join(self.recipients)}"

    def message(self, event: Event, unit_name: str) -> email.message.EmailMessage:
        msg = email.message.EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Subject"] = f"[{unit_name}] {event.severity.value.upper()}: {event.title}"
        msg["Date"] = email.utils.formatdate(event.time or None, localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain=socket.getfqdn() or "localhost")
        body = [event.text, "", f"Unit:     {unit_name}", f"Event:    {event.kind.value}",
                f"Severity: {event.severity.value}"]
        if event.subject:
            body.append(f"Peer:     {event.subject}")
        body.append(f"Time:     {email.utils.formatdate(event.time or None, localtime=True)}")
        if event.suppressed:
            body.append(f"({event.suppressed} earlier repeats of this event were not sent)")
        msg.set_content("\n".join(body) + "\n")
        return msg

    def send(self, event: Event, unit_name: str) -> None:
        host, port = split_host_port("notify.email.relay", self.relay, 25)
        try:
            with smtplib.SMTP(host, port, timeout=self.timeout_s) as smtp:
                smtp.send_message(self.message(event, unit_name))
        except (OSError, smtplib.SMTPException) as e:
            raise NotifyError(f"{self.target}: {e}") from e


def build_senders(cfg: Mapping[str, Any]) -> list[Sender]:
    """The targets of a Config's notify.* fields."""
    senders: list[Sender] = []
    engine = engine_id_for(cfg["unit.name"], cfg["unit.serial"])
    for t in cfg["notify.snmp"]:
        host, port = split_host_port("notify.snmp", t["host"], 162)
        senders.append(SnmpTrapSender(
            host, int(t.get("port", port)), community=t.get("community"),
            v3_user=t.get("v3_user"), auth_key=cfg["notify.snmp_v3_auth_key"],
            priv_key=cfg["notify.snmp_v3_priv_key"], engine_id=engine))
    if cfg["notify.email.recipients"]:
        senders.append(EmailSender(cfg["notify.email.relay"], cfg["notify.email.from"],
                                   list(cfg["notify.email.recipients"])))
    return senders


def deliver(senders: list[Sender], event: Event, unit_name: str) -> list[tuple[str, str]]:
    """Send to every target; one failing target does not stop the others.
    Returns (target, "sent" or the error)."""
    results = []
    for s in senders:
        try:
            s.send(event, unit_name)
        except NotifyError as e:
            log.error("notify: %s not delivered: %s", event.title, e)
            results.append((s.target, f"failed: {e}"))
        else:
            log.info("notify: %s sent to %s", event.title, s.target)
            results.append((s.target, "sent"))
    return results
