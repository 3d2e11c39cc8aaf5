"""`mirrorunit`: one command, a sub-command per role and per operator task.  Each app
(firmware/apps) adds its own; this module only puts them under one parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import COPYRIGHT, LICENSE, __version__


def build_parser() -> argparse.ArgumentParser:
    from .apps import (
        appliance,
        config,
        console,
        gadget,
        link,
        local,
        notify,
        panel,
        remote,
        role,
        ssh,
        ups,
    )

    p = argparse.ArgumentParser(prog="mirrorunit", description="Remote data-mirroring unit.",
                                # keeps the --version lines as written
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"mirrorunit {__version__}\n{COPYRIGHT}\n"
                           f"Licensed under the {LICENSE} licence (see LICENSE); "
                           "no warranty.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    # the order of `mirrorunit --help`
    for app in (local, gadget, link, role, remote, config, ups, console, panel, notify,
                appliance, ssh):
        app.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .apps import run_parser

    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
