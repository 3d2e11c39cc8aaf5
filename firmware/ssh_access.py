"""SSH access to the appliance: off unless turned on at the console, keys only.

The card image ships no host keys and no passwords (docs/image.md).  The ssh service
runs only when the config partition holds `ssh/enabled` and a host key; sshd reads the
host key and the administrators' public keys from there.  This module writes those
files: a fresh Ed25519 host key per unit, the authorized keys checked line by line,
then the flag, each file written atomically, with the partition read-write only while
it writes.  `mirrorunit ssh status|enable|disable` (firmware/apps/ssh) and the
console's action use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware.errors import MirrorUnitError

from .fsutil import fsync_dir, write_atomic

log = logging.getLogger("mirrorunit.ssh")

DEFAULT_CONFIG_DIR = "/config"
HOST_KEY = "ssh_host_ed25519_key"
AUTHORIZED_KEYS = "authorized_keys"
ENABLED = "enabled"
MAX_KEYS = 16
#: Key types sshd accepts here; DSA is gone from OpenSSH and short RSA keys are refused.
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "ssh-rsa", "sk-ssh-ed25519@openssh.com")
MIN_RSA_BITS = 2048

Runner = Callable[[Sequence[str]], None]
Remount = Callable[[bool], None]


class SshSetupError(MirrorUnitError):
    """Refused input or a failed write; the message says which."""


@dataclass(frozen=True)
class SshState:
    enabled: bool
    host_key_fingerprint: str | None
    authorized_keys: int

    def describe(self) -> str:
        if not self.enabled:
            return "SSH off"
        return (f"SSH on, {self.authorized_keys} authorized key(s), host key "
                f"{self.host_key_fingerprint or 'missing'}")


def parse_authorized_keys(text: str) -> list[str]:
    """Plain `type base64 [comment]` lines, each a public key sshd can use.  Options
    (`from=`, `command=`) are refused rather than half understood."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    keys: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if parts[0] not in KEY_TYPES:
            raise SshSetupError(f"line {n}: {parts[0][:40]!r} is not a supported public key "
                                f"type (options before the key are not accepted)")
        if len(parts) < 2:
            raise SshSetupError(f"line {n}: the key data is missing")
        if parts[0].startswith("sk-"):
            keys.append(" ".join(parts[:3]))
            continue
        try:
            key = load_ssh_public_key(f"{parts[0]} {parts[1]}".encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise SshSetupError(f"line {n}: the {parts[0]} key data is damaged") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise SshSetupError(f"line {n}: RSA key of {key.key_size} bits; at least "
                                f"{MIN_RSA_BITS} are needed")
        comment = " ".join(parts[2:3])
        keys.append(f"{parts[0]} {parts[1]}" + (f" {comment}" if comment else ""))
    if not keys:
        raise SshSetupError("no public key given: SSH allows keys only, no passwords")
    if len(keys) > MAX_KEYS:
        raise SshSetupError(f"{len(keys)} keys; at most {MAX_KEYS}")
    return keys


def _host_key() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b" mirrorunit host key\n"


def host_key_fingerprint(config_dir: Path) -> str | None:
    """OpenSSH's `SHA256:...` form, what a client shows on first connection."""
    import base64
    import hashlib

    try:
        pub = (config_dir / "ssh" / (HOST_KEY + ".pub")).read_text(encoding="ascii").split()
        blob = base64.b64decode(pub[1], validate=True)
    except (OSError, IndexError, ValueError, UnicodeDecodeError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def state(config_dir: Path) -> SshState:
    ssh = config_dir / "ssh"
    try:
        keys = len(parse_authorized_keys((ssh / AUTHORIZED_KEYS).read_text(encoding="utf-8")))
    except (OSError, SshSetupError, UnicodeDecodeError):
        keys = 0
    enabled = (ssh / ENABLED).exists() and (ssh / HOST_KEY).exists()
    return SshState(enabled, host_key_fingerprint(config_dir), keys)


def _systemctl(runner: Runner | None, verb: str) -> None:
    if runner is None:
        return
    try:
        runner(["systemctl", verb, "ssh.service"])
    except (OSError, RuntimeError) as e:
        log.warning("systemctl %s ssh.service: %s", verb, e)


def enable(config_dir: Path, authorized_keys: str, *, remount: Remount | None = None,
           runner: Runner | None = None) -> SshState:
    """Turn SSH on with these public keys.  The input is checked before anything is
    written; an existing host key is kept (clients already trust it)."""
    keys = parse_authorized_keys(authorized_keys)
    ssh = config_dir / "ssh"
    if remount is not None:
        remount(True)
    try:
        ssh.mkdir(mode=0o700, exist_ok=True)
        if not (ssh / HOST_KEY).exists() or not (ssh / (HOST_KEY + ".pub")).exists():
            private, public = _host_key()
            write_atomic(ssh / (HOST_KEY + ".pub"), public, 0o644)
            write_atomic(ssh / HOST_KEY, private, 0o600)
        write_atomic(ssh / AUTHORIZED_KEYS, ("\n".join(keys) + "\n").encode("ascii"), 0o600)
        write_atomic(ssh / ENABLED, b"", 0o644)
    except OSError as e:
        raise SshSetupError(f"cannot write {ssh}: {e.strerror or e}") from None
    finally:
        if remount is not None:
            remount(False)
    log.warning("SSH enabled with %d authorized key(s)", len(keys))
    _systemctl(runner, "restart")
    return state(config_dir)


def disable(config_dir: Path, *, remount: Remount | None = None,
            runner: Runner | None = None) -> SshState:
    """Turn SSH off: the flag goes; keys stay so turning it on again keeps the host key."""
    flag = config_dir / "ssh" / ENABLED
    if flag.exists():
        if remount is not None:
            remount(True)
        try:
            flag.unlink()
            fsync_dir(flag.parent)
        except OSError as e:
            raise SshSetupError(f"cannot remove {flag}: {e.strerror or e}") from None
        finally:
            if remount is not None:
                remount(False)
        log.warning("SSH disabled")
    _systemctl(runner, "stop")
    return state(config_dir)
