"""The control socket every tool talks to: a unix socket carrying CBOR requests."""

from pathlib import Path

from .socket import ControlError, ControlServer, call, wait_ready

#: Where the appliance's roles put their control sockets (`socket_path`); the one home of
#: the defaults every command and service uses.
RUN_DIR = Path("/run/mirrorunit")


def socket_path(role: str, run_dir: Path | str = RUN_DIR) -> Path:
    """The control socket of a role ("local", "remote", "ups") under `run_dir`."""
    return Path(run_dir) / f"{role}.sock"


LOCAL_SOCKET = str(socket_path("local"))
REMOTE_SOCKET = str(socket_path("remote"))
UPS_SOCKET = str(socket_path("ups"))

__all__ = ["LOCAL_SOCKET", "REMOTE_SOCKET", "RUN_DIR", "UPS_SOCKET", "ControlError",
           "ControlServer", "call", "socket_path", "wait_ready"]
