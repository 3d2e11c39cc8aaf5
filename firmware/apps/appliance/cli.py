"""`mirrorunit appliance local|remote|role-is`: run a role from the unit's own
configuration (what the card image's services start).

The role's settings are built from the Config and run directly; `--dry-run` prints the
equivalent `mirrorunit local` / `mirrorunit remote` command line instead, and the same
line is logged at start.  `role-is ROLE` is the services' ExecCondition.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firmware.control import socket_path

from .. import local, remote, standalone
from ..config import add_config_option
from .prepare import (
    DEFAULT_RUN_DIR,
    DEFAULT_STORAGE_ENV,
    ApplianceError,
    PinKeeper,
    link_dir_of,
    load_config,
    mount_store,
    pin_configured_peers,
    read_storage_env,
    role_of,
    working_state_dir,
)

log = logging.getLogger("mirrorunit.appliance")


def role_settings(args: argparse.Namespace, role: str) -> tuple[
        local.LocalAppSettings | remote.RemoteSettings, PinKeeper]:
    """The role's settings from the config, and the keeper of the pins it adds while it
    runs."""
    from ...config.mount import RemountHook
    from ...config.store import default_config_path

    store_path = args.config or default_config_path()
    cfg = load_config(store_path)
    if cfg["role"] != role:
        raise ApplianceError(f"this unit's role is {cfg['role']!r}, not {role!r}")
    storage = read_storage_env(args.storage_env)
    remount = RemountHook(store_path)
    persistent = link_dir_of(store_path)
    work = working_state_dir(persistent, Path(args.run_dir) / f"{role}-link")
    settings: local.LocalAppSettings | remote.RemoteSettings
    if role == "local":
        peers = pin_configured_peers(cfg, work, persistent, remount=remount)
        try:
            settings = local.settings_from_config(
                cfg, disk=storage.data, buffer=storage.buffer, store_path=store_path,
                state_dir=work, control=str(socket_path("local", args.run_dir)), peers=peers,
                disk_id=storage.data_id, buffer_id=storage.buffer_id)
        except ValueError as e:
            raise ApplianceError(str(e)) from None
    else:
        store_dir = mount_store(storage.data, Path(args.run_dir) / "store")
        settings = remote.settings_from_config(
            cfg, store_path=store_path, state_dir=work, store_dir=store_dir,
            control=str(socket_path("remote", args.run_dir)), listen_port=args.link_port)
    return settings, PinKeeper(work, persistent, remount)


def command_line(settings: local.LocalAppSettings | remote.RemoteSettings) -> list[str]:
    if isinstance(settings, remote.RemoteSettings):
        return remote.command_line(settings)
    return local.command_line(settings)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        settings, keeper = role_settings(args, args.role)
    except ApplianceError as e:
        print(f"mirrorunit appliance {args.role}: {e}", file=sys.stderr)
        return 2
    line = shlex.join(command_line(settings))
    log.info("starting: mirrorunit %s", line)
    if args.dry_run:
        print(line)
        return 0
    keeper.start()
    try:
        if isinstance(settings, remote.RemoteSettings):
            return remote.serve(settings)
        return local.run(settings)
    finally:
        keeper.stop()


def _cmd_role_is(args: argparse.Namespace) -> int:
    from ...config.store import default_config_path

    role = role_of(args.config or default_config_path())
    if role == args.role:
        return 0
    # ExecCondition: 1..254 skips the unit without failing it
    print(f"mirrorunit: this unit's role is {role!r}, not {args.role!r}; skipping",
          file=sys.stderr)
    return 1


def register(sub: Any) -> None:
    configure(sub.add_parser("appliance", help="run a role from the unit's own configuration "
                                               "(what the card image's services start)"))


def main(argv: Sequence[str] | None = None) -> int:
    return standalone("mirrorunit appliance", configure, argv)


def configure(p: argparse.ArgumentParser) -> None:
    asub = p.add_subparsers(dest="appliance_command", required=True)
    for role in ("local", "remote"):
        r = asub.add_parser(role, help=f"run the {role} unit as configured")
        add_config_option(r)
        r.add_argument("--storage-env", default=DEFAULT_STORAGE_ENV, metavar="PATH",
                       help="the storage map first boot wrote")
        r.add_argument("--run-dir", default=DEFAULT_RUN_DIR, metavar="DIR")
        r.add_argument("--link-port", type=int, default=remote.DEFAULT_LINK_PORT,
                       metavar="PORT", help="(remote) journey-link port to listen on")
        r.add_argument("--dry-run", action="store_true",
                       help="print the command it would run and stop")
        r.set_defaults(func=_cmd_run, role=role)
    ri = asub.add_parser("role-is", help="exit 0 if this unit's configured role is ROLE")
    add_config_option(ri)
    ri.add_argument("role", choices=("local", "remote"))
    ri.set_defaults(func=_cmd_role_is)
