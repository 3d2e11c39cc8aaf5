"""`mirrorunit console`: the setup utility (systemd runs it on tty1 and the serial line)."""

from __future__ import annotations

import argparse
import hashlib
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import DEFAULT_CONTROL, standalone

if TYPE_CHECKING:
    from ...console.app import ConsoleSettings


def register(sub: Any) -> None:
    configure(sub.add_parser("console", help="setup utility for the front-panel console"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit console", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="PATH", help="config partition")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="SOCKET",
                   help="the local unit's control socket")
    p.add_argument("--ups-control", default=None, metavar="SOCKET",
                   help="the UPS monitor's socket, when it runs as its own process")
    p.add_argument("--reboot-command", default="systemctl reboot")
    p.add_argument("--poweroff-command", default="systemctl poweroff")
    logs = p.add_mutually_exclusive_group()
    logs.add_argument("--log-command", default="journalctl -n 500 --no-pager -o short",
                      help="command whose output the log screen shows")
    logs.add_argument("--log-file", default=None, help="show this file instead")
    p.add_argument("--backup-file", default=None, metavar="PATH",
                   help="recovery reads the sealed config from this file instead of a peer")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="this unit's link state directory, where recovery restores its "
                        "identity (default: 'link' beside the config partition)")
    p.add_argument("--ssh-dir", default=None, metavar="DIR",
                   help="where SSH access is kept (default: the config partition's "
                        "directory)")
    p.add_argument("--no-ssh-service", action="store_true",
                   help="change the SSH files only; do not start or stop ssh.service")
    p.add_argument("--cert", default=None, metavar="PEM",
                   help="this unit's certificate, to show its fingerprint")
    p.add_argument("--erase-code-file", default=None, metavar="PATH",
                   help="where the one-time code that allows erasing an unreadable config "
                        "is written (default: mirrorunit-erase-code.txt on the boot "
                        "partition)")
    from ..config import add_network_options

    add_network_options(p)
    p.set_defaults(func=cmd_console)


def _fingerprint(path: str | None) -> str | None:
    if not path:
        return None
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    except (OSError, ValueError):
        return None


def _ssh_service(argv: Any) -> None:
    import subprocess

    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or f"exit {r.returncode}")


def settings_from_args(args: argparse.Namespace) -> ConsoleSettings:
    from ...config.backup import file_source
    from ...config.store import open_store
    from ...console.app import ConsoleSettings, command_log, file_log
    from ..config import network_hook

    store = open_store(args.config)
    state_dir = Path(args.state_dir) if args.state_dir else \
        Path(store.settings.path).resolve().parent / "link"
    try:
        from ...recovery import PeerRecovery

        recovery: Any = PeerRecovery(store, state_dir)
    except ImportError:  # a build without the journey link
        recovery = None
    from ...config.mount import RemountHook
    from ...console.presence import DEFAULT_CODE_FILE, PresenceCode

    code_file = args.erase_code_file or DEFAULT_CODE_FILE
    presence = PresenceCode(Path(code_file), remount=RemountHook(code_file))
    return ConsoleSettings(
        presence=presence,
        store=store, control=args.control, ups_control=args.ups_control, peer_recovery=recovery,
        reboot=shlex.split(args.reboot_command), poweroff=shlex.split(args.poweroff_command),
        log_lines=file_log(args.log_file) if args.log_file else command_log(args.log_command),
        backup_source=file_source(args.backup_file) if args.backup_file else None,
        own_fingerprint=_fingerprint(args.cert), apply_network=network_hook(args),
        ssh_dir=Path(args.ssh_dir) if args.ssh_dir else
        Path(store.settings.path).resolve().parent,
        ssh_runner=None if args.no_ssh_service else _ssh_service)


def cmd_console(args: argparse.Namespace) -> int:
    from ...console.app import run_console

    settings = settings_from_args(args)
    try:
        run_console(settings)
    except KeyboardInterrupt:
        return 130
    return 0


