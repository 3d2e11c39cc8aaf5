"""`mirrorunit notify` (the notifier process) and `mirrorunit notify test`."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...config import StoreState
from ...notify.daemon import DEFAULT_RATE_LIMIT_S, Notifier, test_event
from ...notify.senders import build_senders, deliver
from .. import DEFAULT_CONTROL, standalone


@dataclass(frozen=True, slots=True)
class NotifySettings:
    #: the unit's control socket; None: the local's or the remote's, by the config's role
    control: str | None = None
    #: the UPS monitor's socket, when it runs as its own process
    ups_control: str | None = None
    #: the config partition (None: the default one)
    config: str | None = None
    rate_limit_s: float = DEFAULT_RATE_LIMIT_S


def settings_from_args(args: argparse.Namespace) -> NotifySettings:
    return NotifySettings(control=args.control, ups_control=args.ups_control,
                          config=args.config, rate_limit_s=args.rate_limit)


def register(sub: Any) -> None:
    configure(sub.add_parser(
        "notify", help="send SNMP traps and e-mail when the mirror is at risk"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit notify", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", default=None, metavar="SOCKET",
                   help="the unit's control socket (default: the local's, or the "
                        "remote's when the config's role is remote)")
    p.add_argument("--ups-control", default=None, metavar="SOCKET",
                   help="the UPS monitor's socket, when it runs as its own process")
    p.add_argument("--config", default=None, metavar="PATH", help="config partition")
    p.add_argument("--rate-limit", type=float, default=DEFAULT_RATE_LIMIT_S, metavar="S",
                   help="at most one message per event and peer in S seconds")
    p.set_defaults(func=cmd_run)
    ps = p.add_subparsers(dest="notify_command")
    t = ps.add_parser("test", help="send a test event to every configured target")
    t.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH")
    t.set_defaults(func=cmd_test)


def cmd_run(args: argparse.Namespace) -> int:
    return run(settings_from_args(args))


def default_control(store: Any) -> str:
    """The control socket of the role the config names (a remote reports its own
    events, e.g. guess lockouts); the local's when the config cannot be read."""
    from ...control import REMOTE_SOCKET

    try:
        loaded = store.load()
    except Exception:  # noqa: BLE001 - an unreadable partition: the notifier says so later
        return DEFAULT_CONTROL
    if loaded.state is StoreState.OK and loaded.config is not None \
            and loaded.config["role"] == "remote":
        return REMOTE_SOCKET
    return DEFAULT_CONTROL


def run(s: NotifySettings) -> int:
    from ...config.store import open_store

    store = open_store(s.config)
    notifier = Notifier(store, s.control or default_control(store),
                        ups_control=s.ups_control, rate_limit_s=s.rate_limit_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: notifier.stop())
    notifier.run()
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from ...config.store import open_store

    loaded = open_store(args.config).load()
    if loaded.state is not StoreState.OK or loaded.config is None:
        print(f"mirrorunit notify: {loaded.describe()}", file=sys.stderr)
        return 1
    cfg = loaded.config
    senders = build_senders(cfg)
    if not senders:
        print("mirrorunit notify: no targets configured (notify.snmp, "
              "notify.email.recipients)", file=sys.stderr)
        return 1
    results = deliver(senders, test_event(cfg), cfg["unit.name"])
    for target, result in results:
        print(f"{target}: {result}")
    return 0 if all(r == "sent" for _, r in results) else 1
