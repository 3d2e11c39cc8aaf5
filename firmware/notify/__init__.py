"""Event notifications: SNMP traps and e-mail when the mirror is at risk."""

from .daemon import Notifier
from .events import Event, EventDetector, EventKind, RateLimiter, Severity
from .senders import EmailSender, NotifyError, SnmpTrapSender, build_senders, deliver

__all__ = ["EmailSender", "Event", "EventDetector", "EventKind", "Notifier", "NotifyError",
           "RateLimiter", "Severity", "SnmpTrapSender", "build_senders", "deliver"]
