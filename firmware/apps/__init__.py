"""One package per role or operator tool: each builds typed settings (from its command line
or from the unit's Config) and constructs its services explicitly.  `firmware.cli` only
puts their sub-commands under one parser."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from firmware.control import LOCAL_SOCKET

#: The local unit's control socket, where the operator commands and the helper processes
#: (UPS, notifications, console) reach it.
DEFAULT_CONTROL = LOCAL_SOCKET


def run_parser(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv`, set up logging and run the command the parser chose (`func`)."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


def standalone(prog: str, configure: Callable[[argparse.ArgumentParser], None],
               argv: Sequence[str] | None) -> int:
    """One app's sub-command as a program of its own (`main(argv)` of each app)."""
    parser = argparse.ArgumentParser(prog=prog)
    configure(parser)
    return run_parser(parser, argv)
