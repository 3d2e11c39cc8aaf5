"""The config's network settings applied to the system through systemd-networkd.

`render_network` is pure: config in, the text of one `.network` file out.  The file
goes to networkd's runtime directory (/run is tmpfs on the card image and the root
is read-only), where `10-` sorts it before the image's catch-all DHCP file, so it
wins for the wired interfaces and Wi-Fi keeps the image's settings.

`apply_network` writes it atomically, then asks networkd to take it up:
`networkctl reload` re-reads the files, and `networkctl reconfigure IFACE...`
re-applies them to links networkd already configured (a link keeps the address it
got until it is reconfigured).  At boot, before networkd starts, only the file is
written (`reload=False`): networkd reads it when it starts.

Every command goes through an injectable runner, so tests need no networkd, and
a failure names the command and what it printed.  The config itself is saved
before any of this runs: a failing `networkctl` never loses a setting, which then
takes effect at the next boot at the latest.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import write_atomic
from .errors import NetworkApplyError

log = logging.getLogger("mirrorunit.config")

DEFAULT_NETWORK_FILE = "/run/systemd/network/10-mirrorunit.network"
#: The wired interfaces: classic (eth0) and predictable (enp1s0, end0) names.
WIRED_PATTERNS: tuple[str, ...] = ("eth*", "en*")
DEFAULT_SYS_CLASS_NET = "/sys/class/net"
COMMAND_TIMEOUT_S = 30.0
#: `MIRRORUNIT_APPLY_NETWORK=1|0` forces the hook on or off (see `apply_by_default`).
ENV_APPLY = "MIRRORUNIT_APPLY_NETWORK"

NETWORK_KEYS = ("network.mode", "network.address", "network.netmask", "network.gateway",
                "network.dns")


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str


#: argv -> its exit status and what it printed (stdout and stderr together).
Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        return CommandResult(127, f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(124, f"no answer within {COMMAND_TIMEOUT_S:.0f} s")
    except OSError as e:
        return CommandResult(126, e.strerror or str(e))
    return CommandResult(r.returncode, (r.stdout + r.stderr).strip())


@dataclass(frozen=True)
class NetworkSettings:
    """Where the file goes and how networkd is driven (every path fakeable)."""

    path: str = DEFAULT_NETWORK_FILE
    networkctl: tuple[str, ...] = ("networkctl",)
    match: tuple[str, ...] = WIRED_PATTERNS
    #: Listed to find the existing links `networkctl reconfigure` must be told about.
    sys_class_net: str = DEFAULT_SYS_CLASS_NET


def render_network(cfg: Mapping[str, Any], match: Sequence[str] = WIRED_PATTERNS) -> str:
    """The `.network` file for `cfg`'s network.* (a validated config)."""
    mode = cfg["network.mode"]
    dns = [str(ipaddress.ip_address(d)) for d in cfg["network.dns"]]
    lines = ["# Written by mirrorunit from the unit's config (network.*): at every boot",
             "# and on every change.  Edit the config, not this file.",
             "[Match]", f"Name={' '.join(match)}", "", "[Network]"]
    if mode == "dhcp":
        lines.append("DHCP=yes")
    elif mode == "static":
        # Re-parsed, not copied: nothing but an address can reach the file.
        iface = ipaddress.ip_interface(f"{cfg['network.address']}/{cfg['network.netmask']}")
        lines += ["DHCP=no", f"Address={iface.with_prefixlen}"]
        if cfg["network.gateway"]:
            lines.append(f"Gateway={ipaddress.ip_address(cfg['network.gateway'])}")
    else:
        raise ValueError(f"network.mode {mode!r} is neither dhcp nor static")
    lines += [f"DNS={d}" for d in dns]
    if mode == "dhcp" and dns:
        # Servers typed at the console replace the ones DHCP offers.
        lines += ["", "[DHCPv4]", "UseDNS=no", "", "[DHCPv6]", "UseDNS=no"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> bool:
    """Replace `path` with `text` (a reader sees the old file or the new one, never
    half of one).  False when it already held exactly that."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o644)
    return True


def wired_links(settings: NetworkSettings) -> list[str]:
    """The existing interfaces the file matches, sorted."""
    try:
        names = os.listdir(settings.sys_class_net)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in settings.match))


@dataclass
class NetworkApplied:
    path: str
    changed: bool
    commands: list[list[str]] = field(default_factory=list)

    def describe(self) -> str:
        if not self.changed:
            return f"{self.path} already up to date"
        if not self.commands:
            return f"written to {self.path}; networkd reads it when it starts"
        return f"networkd reconfigured from {self.path}"


def apply_network(cfg: Mapping[str, Any], settings: NetworkSettings | None = None,
                  runner: Runner = run_command, *, reload: bool = True,
                  force: bool = False) -> NetworkApplied:
    """Write the file for `cfg`, then (with `reload`) have networkd apply it.
    Nothing is run when the file already held the same text unless `force`.
    Raises `NetworkApplyError` naming the step that failed."""
    settings = settings or NetworkSettings()
    path = Path(settings.path)
    text = render_network(cfg, settings.match)
    try:
        changed = write_atomically(path, text)
    except OSError as e:
        raise NetworkApplyError(f"cannot write {path}: {e.strerror or e}") from None
    result = NetworkApplied(str(path), changed)
    if changed:
        log.info("network: wrote %s (%s)", path, cfg["network.mode"])
    if not reload or not (changed or force):
        return result
    commands = [[*settings.networkctl, "reload"]]
    links = wired_links(settings)
    if links:
        commands.append([*settings.networkctl, "reconfigure", *links])
    for argv in commands:
        r = runner(argv)
        result.commands.append(argv)
        if r.returncode != 0:
            why = r.output.splitlines()[-1] if r.output else f"exit status {r.returncode}"
            log.error("network: %s failed (%d): %s", " ".join(argv), r.returncode, r.output)
            shown = " ".join([os.path.basename(argv[0]), *argv[1:]])
            raise NetworkApplyError(f"`{shown}` failed: {why}")
    log.info("network: %s", result.describe())
    return result


def apply_by_default(env: Mapping[str, str] | None = None) -> bool:
    """Whether saving network settings applies them to this machine unless told.

    On the card image yes; on any other machine no, so a config edited on a
    workstation never rewrites the workstation's own network.  `ENV_APPLY`
    overrides either way."""
    from .. import IMAGE_VERSION_FILE

    value = (os.environ if env is None else env).get(ENV_APPLY, "").strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    return IMAGE_VERSION_FILE.exists()


class NetworkHook:
    """`apply_network` bound to settings and a runner: what the console and `config
    set` call with the saved config.  Returns a sentence for the operator."""

    def __init__(self, settings: NetworkSettings | None = None,
                 runner: Runner = run_command) -> None:
        self.settings = settings or NetworkSettings()
        self.runner = runner

    def __call__(self, cfg: Mapping[str, Any]) -> str:
        return apply_network(cfg, self.settings, self.runner, force=True).describe()
