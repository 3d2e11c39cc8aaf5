"""`mirrorunit ssh status|enable|disable`: SSH access on the config partition."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...ssh_access import DEFAULT_CONFIG_DIR, SshSetupError, disable, enable, state
from .. import standalone


def _run(argv: Sequence[str]) -> None:
    import subprocess

    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or f"exit {r.returncode}")


def _cmd(args: argparse.Namespace) -> int:
    from ...config.mount import RemountHook

    config_dir = Path(args.config_dir)
    remount = RemountHook(str(config_dir / "ssh"))
    runner = None if args.no_service else _run
    try:
        if args.ssh_command == "enable":
            text = sys.stdin.read() if args.keys == "-" else Path(args.keys).read_text()
            st = enable(config_dir, text, remount=remount, runner=runner)
        elif args.ssh_command == "disable":
            st = disable(config_dir, remount=remount, runner=runner)
        else:
            st = state(config_dir)
    except (SshSetupError, OSError, UnicodeDecodeError) as e:
        print(f"mirrorunit ssh {args.ssh_command}: {e}", file=sys.stderr)
        return 1
    print(st.describe())
    return 0


def register(sub: Any) -> None:
    configure(sub.add_parser("ssh", help="SSH access (off unless enabled; public keys only)"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit ssh", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
                   help="the config partition's mount point")
    p.add_argument("--no-service", action="store_true",
                   help="write the files only; do not start or stop ssh.service")
    s = p.add_subparsers(dest="ssh_command", required=True)
    s.add_parser("status", help="on or off, host key fingerprint, number of keys")
    e = s.add_parser("enable", help="turn SSH on for these public keys")
    e.add_argument("--keys", required=True, metavar="FILE",
                   help="authorized_keys text ('-' for stdin)")
    s.add_parser("disable", help="turn SSH off (the host key is kept)")
    p.set_defaults(func=_cmd)
