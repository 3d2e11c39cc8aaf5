"""`mirrorunit panel --device /dev/ttyACM0`: serves the front-panel controller
(board/panel) over its serial line: status to its screen, its menu's actions to the
unit through the control socket with the console's admin-password check."""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import DEFAULT_CONTROL, standalone

DEFAULT_DEVICE = "/dev/ttyACM0"


@dataclass(frozen=True, slots=True)
class PanelSettings:
    device: str = DEFAULT_DEVICE
    baud: int = 115200
    control: str = DEFAULT_CONTROL
    ups_control: str | None = None
    #: the config partition (None: the default one)
    config: str | None = None
    cert: str | None = None
    poweroff: tuple[str, ...] = ("systemctl", "poweroff")
    heartbeat_s: float = 1.0
    #: how long a switchover waits for the peers to acknowledge every write
    switchover_wait_s: float = 60.0
    #: applies network.* to this machine; None stores them only (see `config set`)
    apply_network: Callable[[Any], str] | None = None


def register(sub: Any) -> None:
    configure(sub.add_parser("panel", help="serve the front-panel controller (display, "
                                           "buttons, LEDs) on its serial line"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit panel", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DEFAULT_DEVICE, metavar="TTY",
                   help="the controller's serial port (USB CDC or UART)")
    p.add_argument("--baud", type=int, default=115200,
                   choices=(9600, 19200, 38400, 57600, 115200, 230400))
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="SOCKET",
                   help="the local unit's control socket")
    p.add_argument("--ups-control", default=None, metavar="SOCKET",
                   help="the UPS monitor's socket, when it runs as its own process")
    p.add_argument("--config", default=None, metavar="PATH", help="config partition")
    p.add_argument("--cert", default=None, metavar="PEM",
                   help="this unit's certificate, to show its fingerprint (default: the "
                        "link identity beside the config partition)")
    p.add_argument("--poweroff-command", default="systemctl poweroff")
    p.add_argument("--heartbeat", type=float, default=1.0, metavar="S",
                   help="heartbeat and status interval")
    p.add_argument("--switchover-wait", type=float, default=60.0, metavar="S",
                   help="how long a switchover waits for the peers to have every write")
    from ..config import add_network_options

    add_network_options(p)
    p.set_defaults(func=cmd_panel)


def settings_from_args(args: argparse.Namespace) -> PanelSettings:
    from ..config import network_hook

    return PanelSettings(device=args.device, baud=args.baud, control=args.control,
                         ups_control=args.ups_control, config=args.config, cert=args.cert,
                         poweroff=tuple(shlex.split(args.poweroff_command)),
                         heartbeat_s=args.heartbeat, switchover_wait_s=args.switchover_wait,
                         apply_network=network_hook(args))


def cmd_panel(args: argparse.Namespace) -> int:
    return run(settings_from_args(args))


def run(s: PanelSettings) -> int:
    from ...config.store import open_store
    from ...link.tls import CERT_FILE
    from ...panel.actions import ActionSettings, PanelActions
    from ...panel.service import LinkSettings, PanelLink
    from ..appliance.prepare import link_dir_of
    from ..console.cli import _fingerprint

    store = open_store(s.config)
    cert = s.cert or str(link_dir_of(store.settings.path) / CERT_FILE)
    actions = PanelActions(ActionSettings(
        control=s.control, store=store, ups_control=s.ups_control,
        fingerprint=_fingerprint(cert), apply_network=s.apply_network,
        poweroff=s.poweroff), switchover_wait_s=s.switchover_wait_s)
    link = PanelLink(LinkSettings(device=s.device, baud=s.baud, heartbeat_s=s.heartbeat_s),
                     actions)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: link.stop())
    link.run()
    return 0
