"""NBD front end: a fixed-newstyle NBD server over a BlockDevice.

``protocol`` is the sans-IO core, ``server`` the TCP shell, ``client`` a small
blocking client for probes and tests.
"""

from firmware.nbd.protocol import ExportInfo, LocalProtocolError, NbdError, NbdServerConnection
from firmware.nbd.server import NbdServer, export_info_for, parse_hostport

__all__ = [
    "ExportInfo",
    "LocalProtocolError",
    "NbdError",
    "NbdServer",
    "NbdServerConnection",
    "export_info_for",
    "parse_hostport",
]
